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


#: Distance (deg) from an image's centre up to which its coherent shift is measured and taken out
#: (:func:`north_turn` holds to 90 deg): positions farther out (all-sky images) neither measure it
#: nor move.
TANGENT_REACH = 80.0


def within_reach(ra: ArrayLike, dec: ArrayLike, centre: tuple[float, float]) -> np.ndarray:
    """Per position (deg): within TANGENT_REACH of ``centre`` (ra, dec; deg)."""
    return haversine(ra, dec, *centre) < np.sin(np.deg2rad(TANGENT_REACH) / 2.0) ** 2


def north_turn(ra: ArrayLike, centre: tuple[float, float]) -> np.ndarray:
    """Angle (rad, towards east) from north at ``centre`` (ra, dec; deg) to north at positions of
    right ascension ``ra`` (deg), as the tangent plane at the centre draws them: how far east and
    north at a position turn from those at the centre (a little across a small field, up to half a
    turn around a pole). For positions less than 90 deg from the centre. The plane draws a
    position's north along (-sin(ra - ra0) sin(dec0), cos(ra - ra0)), whatever its dec (the
    meridians' convergence)."""
    dra, dec0 = np.deg2rad(np.subtract(ra, centre[0])), np.deg2rad(centre[1])
    return np.arctan2(-np.sin(dra) * np.sin(dec0), np.cos(dra))


def to_local(x: ArrayLike, y: ArrayLike, turn: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Offsets along the centre's east and north (``x``, ``y``) as east and north at positions whose
    north is turned by ``turn`` (rad, :func:`north_turn`); :func:`from_local` undoes it."""
    return x * np.cos(turn) - y * np.sin(turn), x * np.sin(turn) + y * np.cos(turn)


def from_local(east: ArrayLike, north: ArrayLike, turn: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Offsets east and north at positions whose north is turned by ``turn`` (rad) as offsets along
    the centre's east and north."""
    return east * np.cos(turn) + north * np.sin(turn), -east * np.sin(turn) + north * np.cos(turn)


def unshifted(ra: np.ndarray, dec: np.ndarray, shift_east: float, shift_north: float,
              centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Positions (deg) with an image's coherent shift taken out: the same offset (deg) at every
    position, east and north as at the image's ``centre`` (ra, dec; deg), turned at each position
    as its own east and north turn (:func:`north_turn`): a shifted image moves all its positions
    alike, on a field around a pole as anywhere. Positions beyond TANGENT_REACH stay where they are."""
    if shift_east == 0.0 and shift_north == 0.0:
        return ra, dec
    near = within_reach(ra, dec, centre)
    east, north = to_local(shift_east, shift_north, north_turn(ra[near], centre))
    out_ra, out_dec = np.array(ra, dtype=float), np.array(dec, dtype=float)
    out_dec[near] = dec[near] - north
    out_ra[near] = (ra[near] - east / np.cos(np.deg2rad(out_dec[near]))) % 360.0
    return out_ra, out_dec
