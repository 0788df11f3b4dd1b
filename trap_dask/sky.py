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


def within(ra: np.ndarray, dec: np.ndarray, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Per position (deg): no farther than ``radius`` (deg) from ``centre`` (ra, dec; deg). Every
    position where ``radius`` is 180 or more, or not a number."""
    inside = np.ones(len(ra), bool)
    if not radius < 180.0:
        return inside
    inside &= np.abs(dec - centre[1]) <= radius  # a cheap cut first: most of a sky of many fields
    band = np.flatnonzero(inside)
    inside[band] = haversine(ra[band], dec[band], *centre) <= np.sin(np.deg2rad(radius) / 2.0) ** 2
    return inside


def farthest(ra: np.ndarray, dec: np.ndarray, centre: tuple[float, float]) -> float:
    """The largest distance (deg) of positions (deg) from ``centre`` (ra, dec; deg); 0 for none."""
    if not len(ra):
        return 0.0
    return float(np.rad2deg(2.0 * np.arcsin(np.sqrt(np.clip(haversine(ra, dec, *centre).max(), 0.0, 1.0)))))


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


def unshifted(ra: ArrayLike, dec: ArrayLike, shift_east: ArrayLike, shift_north: ArrayLike,
              centre: tuple[ArrayLike, ArrayLike]) -> tuple[np.ndarray, np.ndarray]:
    """Positions (deg) with an image's coherent shift taken out: the same offset (deg) at every
    position, east and north as at the image's ``centre`` (ra, dec; deg), turned at each position
    as its own east and north turn (:func:`north_turn`): a shifted image moves all its positions
    alike, on a field around a pole as anywhere. Positions beyond TANGENT_REACH stay where they are.
    The shift and centre may also be arrays, one per position (positions of several images)."""
    return _moved(ra, dec, shift_east, shift_north, centre, -1.0)


def shifted(ra: ArrayLike, dec: ArrayLike, shift_east: ArrayLike, shift_north: ArrayLike,
            centre: tuple[ArrayLike, ArrayLike]) -> tuple[np.ndarray, np.ndarray]:
    """Where an image shifted by (``shift_east``, ``shift_north``) shows the sources at ``ra``,
    ``dec`` (deg, the catalogue's): the inverse of :func:`unshifted`."""
    return _moved(ra, dec, shift_east, shift_north, centre, 1.0)


#: Steps of :func:`shifted` towards the position that :func:`unshifted` takes back: each divides the
#: error by about the shift over the distance to the pole (0.1 deg from it, 20" shifts: 0.003").
INVERSE_STEPS = 3


def _moved(ra: ArrayLike, dec: ArrayLike, shift_east: ArrayLike, shift_north: ArrayLike,
           centre: tuple[ArrayLike, ArrayLike], sign: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions moved by ``sign`` times a shift (see :func:`unshifted`); the offset east is taken
    along the parallel of the catalogue's position (the unshifted one), so the two are inverses."""
    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    if not (np.any(shift_east) or np.any(shift_north)):
        return ra, dec
    near = within_reach(ra, dec, centre)
    every = bool(near.all())  # the usual case: no position beyond reach, nothing to pick out

    def pick(value: ArrayLike) -> np.ndarray | float:
        return value if every or np.ndim(value) == 0 else np.broadcast_to(value, ra.shape)[near]

    ra_n, dec_n, east0, north0 = pick(ra), pick(dec), pick(shift_east), pick(shift_north)
    centre_n = (pick(centre[0]), pick(centre[1]))

    def move(turn_at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        east, north = to_local(east0, north0, north_turn(turn_at, centre_n))
        moved_dec = dec_n + sign * north
        parallel = np.deg2rad(moved_dec if sign < 0 else dec_n)
        return (ra_n + sign * east / np.cos(parallel)) % 360.0, moved_dec

    moved_ra, moved_dec = move(ra_n)
    for _ in range(INVERSE_STEPS if sign > 0 else 0):  # the turn is the shifted position's, as unshifted takes it
        moved_ra, moved_dec = move(moved_ra)
    past = np.abs(moved_dec) > 90.0  # moved over a pole: down the meridian opposite
    if past.any():
        moved_ra = (moved_ra + 180.0 * past) % 360.0
        moved_dec = np.where(past, np.copysign(180.0, moved_dec) - moved_dec, moved_dec)
    if every:
        return moved_ra, moved_dec
    out_ra, out_dec = ra.copy(), dec.copy()
    out_ra[near], out_dec[near] = moved_ra, moved_dec
    return out_ra, out_dec
