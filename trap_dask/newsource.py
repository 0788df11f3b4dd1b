"""New sources: how significant a first detection is against the earlier images' noise.

A source first detected after its position was already observed is a transient candidate.
Its peak flux divided by the earlier images' noise tells whether it should have been seen
before: if it stands above the detection threshold even against the noisiest earlier image
(``sigma_rms_max``), it is a *likely* transient; otherwise only a *possible* one (it may have
been just below the earlier detection limit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from trap_dask.association import unit_vectors
from trap_dask.sky import haversine


class Outlines(NamedTuple):
    """The outlines of k images' extraction regions (extract.extraction_outline), each distinct one
    held once (the images of one pointing share theirs)."""

    shapes: np.ndarray  #: (u, V, 2) ra, dec (deg) of V points around each distinct region
    of: np.ndarray  #: (k,) the shape of each image; -1: not known (the circle alone)

    @classmethod
    def of_rows(cls, outlines: np.ndarray) -> Outlines:
        """From (k, V, 2) outlines (NaN rows: not known)."""
        outlines = np.asarray(outlines, dtype=float)
        known = np.isfinite(outlines).all((1, 2))
        of = np.full(len(outlines), -1)
        if not known.any():
            return cls(np.zeros((0, *outlines.shape[1:])), of)
        shapes, of[known] = np.unique(outlines[known].reshape(int(known.sum()), -1), axis=0, return_inverse=True)
        return cls(shapes.reshape(-1, *outlines.shape[1:]), of)

    def add(self, outline: np.ndarray) -> Outlines:
        """With one more image, of outline (V, 2) (NaN: not known)."""
        if not np.isfinite(outline).all():
            return Outlines(self.shapes, np.append(self.of, -1))
        points = max(self.shapes.shape[1], len(outline))
        shapes, outline = _padded(self.shapes, points), _padded(outline[None], points)[0]
        same = np.flatnonzero((shapes == outline).all((1, 2)))
        if len(same):
            return Outlines(shapes, np.append(self.of, same[0]))
        return Outlines(np.concatenate([shapes, outline[None]]), np.append(self.of, len(shapes)))

    def take(self, images: np.ndarray | int) -> Outlines:
        """Those of the images at ``images`` (indices)."""
        return Outlines(self.shapes, np.atleast_1d(self.of[images]))


def outline_text(outline: np.ndarray | None) -> str | None:
    """An outline (V, 2) as ``images.xtr_outline`` holds it: "ra dec ra dec ..." in deg (None: not known)."""
    if outline is None or not np.isfinite(outline).all():
        return None
    return " ".join(f"{v:.10f}" for v in np.ravel(outline))


def _padded(outlines: np.ndarray, points: int) -> np.ndarray:
    """(k, points, 2): outlines (k, V <= points, 2) with their last point repeated: an edge of no
    length, the same region (outlines of another number of points, from another version, join them)."""
    missing = points - outlines.shape[1]
    if missing <= 0:
        return outlines
    last = outlines[:, -1:] if outlines.shape[1] else np.full((len(outlines), 1, 2), np.nan)
    return np.concatenate([outlines, np.repeat(last, missing, axis=1)], axis=1)


def outline_from_text(texts: Sequence[str | None]) -> np.ndarray:
    """(k, V, 2) outlines of ``images.xtr_outline`` texts (NaN where NULL; shorter ones padded)."""
    parsed = [np.array(text.split(), dtype=float).reshape(1, -1, 2) if text else None for text in texts]
    points = max((p.shape[1] for p in parsed if p is not None), default=1)
    rows = [_padded(p, points) if p is not None else np.full((1, points, 2), np.nan) for p in parsed]
    return np.concatenate(rows).reshape(len(rows), points, 2) if rows else np.zeros((0, points, 2))


def covering_images(
    ra: ArrayLike, dec: ArrayLike, img_ra: ArrayLike, img_dec: ArrayLike, img_radius: ArrayLike,
    outlines: Outlines | None = None,
) -> np.ndarray:
    """Which images cover which positions.

    Parameters
    ----------
    ra, dec : positions in deg (n values).
    img_ra, img_dec : image centres in deg (k values).
    img_radius : extraction radius of each image in deg (k values, or one for all).
    outlines : the outlines of the k images' extraction regions, where known.

    Returns
    -------
    Boolean array of shape (n, k): True where the great-circle distance from the position to
    the image centre is at most the image's radius (haversine, accurate at all separations) and,
    where the image's outline is known, the position lies inside it: the radius of an image
    without a set ``radius`` is its half-diagonal, whose circle reaches well beyond its sides.
    """
    ra, dec = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (ra, dec))
    img_ra, img_dec, img_radius = (np.atleast_1d(np.asarray(a, dtype=float))
                                   for a in np.broadcast_arrays(img_ra, img_dec, img_radius))
    inside = haversine(ra[:, None], dec[:, None], img_ra, img_dec) <= np.sin(
        0.5 * np.clip(np.deg2rad(img_radius), 0.0, np.pi)) ** 2
    if outlines is None:
        return inside
    known = outlines.of >= 0
    position, image = np.nonzero(inside & known)
    if len(position):  # each (position, distinct outline) once: the pairs inside a circle only
        u = len(outlines.shapes)
        position, shape = np.divmod(np.unique(position * u + outlines.of[image]), u)
        within = np.zeros((len(ra), u), dtype=bool)
        within[position, shape] = within_outlines(ra[position], dec[position], outlines.shapes, shape)
        inside[:, known] &= within[:, outlines.of[known]]
    return inside


#: Position-outline pairs tested at once by :func:`within_outlines` (a few tens of MB of work arrays).
_PAIRS_AT_ONCE = 1 << 15


def within_outlines(ra: np.ndarray, dec: np.ndarray, shapes: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Whether each position (deg) lies inside the outline ``shapes[shape]`` (shapes: (u, V, 2) deg),
    its points joined by great circles: a point-in-polygon test (crossing number) on the gnomonic
    projection about the outline's centre, where great circles are straight lines. A position 90 deg
    or more from the centre is outside; an outline reaching that far (a region of a hemisphere) holds
    every position (its image's circle decides)."""
    vertices = unit_vectors(shapes[..., 0].ravel(), shapes[..., 1].ravel()).reshape(*shapes.shape[:2], 3)
    centre = vertices.sum(1)
    centre /= np.linalg.norm(centre, axis=-1, keepdims=True)
    east = np.cross([0.0, 0.0, 1.0], centre)
    east[np.linalg.norm(east, axis=-1) == 0] = [0.0, 1.0, 0.0]  # an outline centred on a pole
    east /= np.linalg.norm(east, axis=-1, keepdims=True)
    north = np.cross(centre, east)
    with np.errstate(divide="ignore", invalid="ignore"):  # a position or a point 90 deg off
        depth = np.einsum("uvj,uj->uv", vertices, centre)
        vx, vy = np.einsum("uvj,uj->uv", vertices, east) / depth, np.einsum("uvj,uj->uv", vertices, north) / depth
        hemisphere = ~(depth > 0).all(-1)
        points, inside = unit_vectors(ra, dec), np.empty(len(ra), dtype=bool)
        for first in range(0, len(ra), _PAIRS_AT_ONCE):
            at, u = slice(first, first + _PAIRS_AT_ONCE), shape[first : first + _PAIRS_AT_ONCE]
            front = np.einsum("nj,nj->n", points[at], centre[u])
            px = (np.einsum("nj,nj->n", points[at], east[u]) / front)[:, None]
            py = (np.einsum("nj,nj->n", points[at], north[u]) / front)[:, None]
            x1, y1 = vx[u], vy[u]
            x2, y2 = np.roll(x1, -1, axis=1), np.roll(y1, -1, axis=1)
            crossing = ((y1 > py) != (y2 > py)) & (px < x1 + (py - y1) * (x2 - x1) / (y2 - y1))
            inside[at] = hemisphere[u] | ((front > 0) & (crossing.sum(-1) % 2 == 1))
    return inside


def earlier_rms_bounds(
    covering: np.ndarray, img_rms_min: ArrayLike, img_rms_max: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Lowest ``rms_min`` and highest ``rms_max`` (Jy/beam) of the images covering each position.

    Parameters
    ----------
    covering : boolean (n, k) from :func:`covering_images` over the earlier images.
    img_rms_min, img_rms_max : each earlier image's minimum and maximum rms (k values).

    Returns
    -------
    prev_rms_min, prev_rms_max : n values each; NaN where no earlier image covers the position.
    """
    covering = np.asarray(covering, dtype=bool)
    seen = covering.any(axis=1)
    lowest = np.min(np.where(covering, img_rms_min, np.inf), axis=1, initial=np.inf)
    highest = np.max(np.where(covering, img_rms_max, -np.inf), axis=1, initial=-np.inf)
    return np.where(seen, lowest, np.nan), np.where(seen, highest, np.nan)


def classify_new_sources(
    peak_flux: ArrayLike,
    detection_threshold: ArrayLike,
    prev_rms_min: ArrayLike,
    prev_rms_max: ArrayLike,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Significance of new sources against the earlier noise, and whether likely transients.

    Parameters
    ----------
    peak_flux : peak flux of each new source's first detection (Jy/beam).
    detection_threshold : detection threshold in units of the rms (scalar or per source).
    prev_rms_min, prev_rms_max : from :func:`earlier_rms_bounds` (Jy/beam); NaN where the
        position was never observed before.

    Returns
    -------
    sigma_rms_min : ``peak_flux / prev_rms_min``, the significance in the quietest earlier image.
    sigma_rms_max : ``peak_flux / prev_rms_max``, the significance in the noisiest earlier image.
    likely : True where ``sigma_rms_max >= detection_threshold`` (a likely transient); False
        for a possible transient or a position never observed before.
    """
    peak_flux = np.asarray(peak_flux, dtype=float)
    sigma_rms_min = peak_flux / np.asarray(prev_rms_min, dtype=float)
    sigma_rms_max = peak_flux / np.asarray(prev_rms_max, dtype=float)
    return sigma_rms_min, sigma_rms_max, sigma_rms_max >= detection_threshold
