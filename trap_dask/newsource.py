"""New sources: how significant a first detection is against the earlier images' noise.

A source first detected after its position was already observed is a transient candidate.
Its peak flux divided by the earlier images' noise tells whether it should have been seen
before: if it stands above the detection threshold even against the noisiest earlier image
(``sigma_rms_max``), it is a *likely* transient; otherwise only a *possible* one (it may have
been just below the earlier detection limit).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from trap_dask.association import unit_vectors

#: A position this far outside an edge of an image's extraction region (radians, ~0.2") still
#: counts as inside: the pixel rows of a SIN image are not exactly great circles.
EDGE_TOLERANCE = 1e-6


def covering_images(
    ra: ArrayLike, dec: ArrayLike, img_ra: ArrayLike, img_dec: ArrayLike, img_radius: ArrayLike,
    img_corners: ArrayLike | None = None,
) -> np.ndarray:
    """Which images cover which positions.

    Parameters
    ----------
    ra, dec : positions in deg (n values).
    img_ra, img_dec : image centres in deg (k values).
    img_radius : extraction radius of each image in deg (k values, or one for all).
    img_corners : (k, 4, 2) ra, dec (deg) of the corners of each image's extraction region, in
        order around it (extract.extraction_corners); NaN (or None for all) where not known.

    Returns
    -------
    Boolean array of shape (n, k): True where the great-circle distance from the position to
    the image centre is at most the image's radius (haversine, accurate at all separations) and,
    where the corners are known, the position lies inside them (edges along great circles): the
    radius of an image without a set ``radius`` is its half-diagonal, whose circle reaches well
    beyond the image's sides.
    """
    ra, dec = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (ra, dec))
    img_ra, img_dec, img_radius = (np.atleast_1d(np.asarray(a, dtype=float))
                                   for a in np.broadcast_arrays(img_ra, img_dec, img_radius))
    lat, img_lat = np.deg2rad(dec)[:, None], np.deg2rad(img_dec)
    hav = (
        np.sin(0.5 * (lat - img_lat)) ** 2
        + np.cos(lat) * np.cos(img_lat) * np.sin(0.5 * np.deg2rad(ra[:, None] - img_ra)) ** 2
    )
    inside = hav <= np.sin(0.5 * np.clip(np.deg2rad(img_radius), 0.0, np.pi)) ** 2
    if img_corners is None:
        return inside
    corners = np.asarray(img_corners, dtype=float).reshape(-1, 4, 2)
    known = np.flatnonzero(np.isfinite(corners).all((1, 2)) & inside.any(0))
    if len(known):
        inside[:, known] &= _within_corners(ra, dec, img_ra[known], img_dec[known], corners[known])
    return inside


def _within_corners(ra: np.ndarray, dec: np.ndarray, img_ra: np.ndarray, img_dec: np.ndarray,
                    corners: np.ndarray) -> np.ndarray:
    """(n, k): whether each position (deg) lies inside each quadrilateral of ``corners`` (k, 4, 2;
    deg) whose edges are great circles, on the side of each edge its centre (deg) is on."""
    vertices = unit_vectors(corners[..., 0].ravel(), corners[..., 1].ravel()).reshape(-1, 4, 3)
    normals = np.cross(vertices, np.roll(vertices, -1, axis=1))  # edge i: corner i to i + 1
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals *= np.sign(np.einsum("kij,kj->ki", normals, unit_vectors(img_ra, img_dec)))[..., None]  # inwards
    return (np.einsum("nj,kij->nki", unit_vectors(ra, dec), normals) >= -EDGE_TOLERANCE).all(-1)


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
