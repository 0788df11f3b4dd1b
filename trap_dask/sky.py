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


def to_tangent(ra: ArrayLike, dec: ArrayLike, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Gnomonic (tangent-plane) coordinates (deg) of positions (deg) about the point (ra0, dec0):
    ``xi`` east and ``eta`` north there. For positions less than 90 deg from the point."""
    a, d, d0 = np.deg2rad(np.subtract(ra, ra0)), np.deg2rad(dec), np.deg2rad(dec0)
    cos_c = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a)
    xi = np.cos(d) * np.sin(a) / cos_c
    eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a)) / cos_c
    return np.rad2deg(xi), np.rad2deg(eta)


def from_tangent(xi: ArrayLike, eta: ArrayLike, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions (deg) of gnomonic coordinates (deg) about (ra0, dec0): :func:`to_tangent` undone."""
    x, y, d0 = np.deg2rad(xi), np.deg2rad(eta), np.deg2rad(dec0)
    dec = np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, np.cos(d0) - y * np.sin(d0)))
    ra = ra0 + np.rad2deg(np.arctan2(x, np.cos(d0) - y * np.sin(d0)))
    return ra % 360.0, np.rad2deg(dec)


#: Distance (deg) from an image's centre up to which its coherent shift is a translation in the
#: tangent plane there (the plane stretches without bound towards 90 deg, and beyond maps a
#: position onto its opposite): positions farther out (all-sky images) neither measure it nor move.
TANGENT_REACH = 80.0


def within_reach(ra: ArrayLike, dec: ArrayLike, centre: tuple[float, float]) -> np.ndarray:
    """Per position (deg): within TANGENT_REACH of ``centre`` (ra, dec; deg)."""
    return haversine(ra, dec, *centre) < np.sin(np.deg2rad(TANGENT_REACH) / 2.0) ** 2


def unshifted(ra: np.ndarray, dec: np.ndarray, shift_east: float, shift_north: float,
              centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Positions (deg) with an image's coherent shift taken out: a translation (deg) east and north in
    the tangent plane at the image's ``centre`` (ra, dec; deg), as a shifted image moves its positions
    (on a field around a pole as anywhere: there east and north turn across the field). Positions
    beyond TANGENT_REACH stay where they are."""
    if shift_east == 0.0 and shift_north == 0.0:
        return ra, dec
    near = within_reach(ra, dec, centre)
    xi, eta = to_tangent(ra[near], dec[near], *centre)
    out_ra, out_dec = np.array(ra, dtype=float), np.array(dec, dtype=float)
    out_ra[near], out_dec[near] = from_tangent(xi - shift_east, eta - shift_north, *centre)
    return out_ra, out_dec
