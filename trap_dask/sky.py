"""Angles on the sky shared by the association, the astrometry and the light curves.

Kept apart from :mod:`trap_dask.association`, so that what needs only these (the export schema,
through the light-curve sums) imports no KD-tree or sparse graph: the results commands read the
database with the schema alone.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def wrap_ra_difference(dra: ArrayLike) -> np.ndarray:
    """Wrap RA differences (deg) to [-180, 180)."""
    return (np.asarray(dra, dtype=float) + 180.0) % 360.0 - 180.0


def haversine(ra1: ArrayLike, dec1: ArrayLike, ra2: ArrayLike, dec2: ArrayLike) -> np.ndarray:
    """``sin**2(d / 2)`` of the great-circle distances ``d`` between positions (deg; broadcast), accurate
    at all separations: ``d = 2 arcsin(sqrt(h))``, and ``d <= r`` is ``h <= sin**2(r / 2)``."""
    lat1, lat2 = np.deg2rad(dec1), np.deg2rad(dec2)
    return (np.sin(0.5 * (lat2 - lat1)) ** 2
            + np.cos(lat1) * np.cos(lat2) * np.sin(0.5 * np.deg2rad(np.subtract(ra2, ra1))) ** 2)


def unshifted(ra: np.ndarray, dec: np.ndarray, shift_ra: float, shift_dec: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (deg) with an image's coherent offset (deg on the sky, east and north) taken out."""
    if shift_ra == 0.0 and shift_dec == 0.0:
        return ra, dec
    dec_out = dec - shift_dec
    return (ra - shift_ra / np.cos(np.deg2rad(dec_out))) % 360.0, dec_out
