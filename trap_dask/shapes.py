"""Sources' intrinsic shapes on the sky, for forced fits of resolved sources.

A resolved source that an image does not detect is force-fitted with its own shape (the beam
convolved with the source), not the beam's: a beam-shaped fit measures a source several beams
across at a fraction of its integrated flux, which makes its light curve a false variable.

Each blind Gaussian fit adds its intrinsic shape (the fitted covariance less the beam's, which
the extraction takes in pixels and turns onto the sky where the source lies: the
``intrinsic_*`` columns of SOURCE_DTYPE; a fit with the beam's shape adds a point) to running
sums in ``runningcatalog``, weighted by ``(int_flux / int_flux_err)**2 / det(beam)``: the
fitted area's scatter is about that relative error (which holds the fitted axes' errors, so a
fit that the data hardly constrain counts for little) times the area of its image's beam (a
shape measured under a wider beam is the noisier in arcsec**2). A source counts as resolved
where the mean shape widens the beam's area clearly beyond that scatter. Pure arithmetic, no I/O. Covariances are in
arcsec**2 in the local (east, north) frame, as ``(ee, en, nn)``.
"""

from __future__ import annotations

import numpy as np

from trap_dask.extraction.geometry import HALF_FWHM_PER_SIGMA, cov_from_axes
from trap_dask.sources import INTRINSIC_COLUMNS

#: The running sums of ``runningcatalog`` (``acc_shape_<name>``): the weight (arcsec**-4), and the
#: weighted intrinsic covariance (arcsec**2 times the weight).
SHAPE_SUMS = ("weight", "ee", "en", "nn")
#: Std of a point source's fitted area over the beam's, minus 1, over int_flux_err / int_flux
#: (0.9-1.1 from int_flux / int_flux_err 5 to 100 in simulated fields; RESULTS.md, round 21).
AREA_SCATTER = 1.05
#: A source is force-fitted with its own shape where the mean shape widens the beam's area by at
#: least this fraction ...
RESOLVED_MIN_EXCESS = 0.2
#: ... and by at least this many times the scatter of that mean.
RESOLVED_MIN_SIGMA = 5.0


def sky_cov(semimajor: np.ndarray, semiminor: np.ndarray, pa: np.ndarray) -> np.ndarray:
    """(n, 2, 2) covariances (arcsec**2, east-north) of Gaussians of semi-axes (half FWHM, arcsec)
    and position angle (deg east of north)."""
    return cov_from_axes(np.asarray(semimajor, float) / HALF_FWHM_PER_SIGMA,
                         np.asarray(semiminor, float) / HALF_FWHM_PER_SIGMA, np.radians(90.0 - np.asarray(pa, float)))


def beam_cov(smaj: float, smin: float, pa: float) -> np.ndarray:
    """(2, 2) covariance (arcsec**2) of a restoring beam of semi-axes ``smaj``, ``smin`` (deg, half
    FWHM) and position angle ``pa`` (deg east of north)."""
    return sky_cov(np.array([smaj * 3600.0]), np.array([smin * 3600.0]), np.array([pa]))[0]


def intrinsic_from_axes(detections: np.ndarray, beam: np.ndarray) -> np.ndarray:
    """(n, 3) intrinsic shapes (arcsec**2) of detections (SOURCE_DTYPE) from their stored axes less
    the image's ``beam`` (arcsec**2) on the sky: the extraction's own ``intrinsic_*`` columns
    where the pixels are not at hand (an upgraded database); the same unless the beam turns on
    the sky across the image (near a pole, in a wide field)."""
    return as_triples(sky_cov(detections["semimajor_axis"], detections["semiminor_axis"],
                              detections["parallactic_angle"]) - beam)


def intrinsic_shapes(detections: np.ndarray) -> np.ndarray:
    """(n, 3) intrinsic shapes (ee, en, nn; arcsec**2) of detections (SOURCE_DTYPE)."""
    return np.stack([detections[name] for name in INTRINSIC_COLUMNS], -1)


def set_intrinsic_shapes(detections: np.ndarray, shapes: np.ndarray, rows: np.ndarray | slice = slice(None)) -> None:
    """Set the intrinsic shapes (n, 3: ee, en, nn; arcsec**2) of detections (SOURCE_DTYPE) ``rows``, in place."""
    for i, name in enumerate(INTRINSIC_COLUMNS):
        detections[name][rows] = shapes[:, i]


def shape_sum_increments(detections: np.ndarray, beam: np.ndarray) -> dict[str, np.ndarray]:
    """What each detection (SOURCE_DTYPE) adds to the shape sums (SHAPE_SUMS) of its source, from
    its ``intrinsic_*`` columns, in an image of ``beam`` covariance (arcsec**2; (2, 2), or
    (n, 2, 2) one per detection). Only blind Gaussian fits count (forced fits and moment
    estimates add 0); one fitted with the beam's shape (``force_beam``, a pair fit) counts as a
    point source: a light curve mostly measured as a point keeps the beam in its forced fits too."""
    intrinsic = intrinsic_shapes(detections)
    with np.errstate(invalid="ignore", divide="ignore"):
        weight = np.square(detections["int_flux"] / detections["int_flux_err"]) / np.linalg.det(beam)
    counts = (~detections["is_force_fit"] & detections["gaussian_fit"] & (detections["int_flux_err"] > 0)
              & np.isfinite(intrinsic).all(axis=1) & np.isfinite(weight))
    weight = np.where(counts, weight, 0.0)
    intrinsic = np.where(counts[:, None], intrinsic, 0.0)
    return {"weight": weight, **{name: weight * intrinsic[:, i] for i, name in enumerate(SHAPE_SUMS[1:])}}


def as_matrices(shape: np.ndarray) -> np.ndarray:
    """(n, 2, 2) covariances of (n, 3) shapes (ee, en, nn)."""
    return np.stack([shape[:, [0, 1]], shape[:, [1, 2]]], -2)


def as_triples(cov: np.ndarray) -> np.ndarray:
    """(n, 3) shapes (ee, en, nn) of (n, 2, 2) covariances: the inverse of :func:`as_matrices`."""
    return cov[:, [0, 0, 1], [0, 1, 1]]


def variance_across(shape: np.ndarray, east: np.ndarray, north: np.ndarray) -> np.ndarray:
    """The variance (arcsec**2) of shapes (n, 3: ee, en, nn; or one for all, (1, 3)) across the
    directions (``east``, ``north``; any length, not both 0): along (-north, east)."""
    length = np.maximum(np.hypot(east, north), np.finfo(float).tiny)
    ue, un = -north / length, east / length
    return shape[:, 0] * ue * ue + 2.0 * shape[:, 1] * ue * un + shape[:, 2] * un * un


def resolved_shapes(sums: dict[str, np.ndarray], beam: np.ndarray) -> np.ndarray:
    """(n, 3) intrinsic shapes (ee, en, nn; arcsec**2) to force-fit sources of shape ``sums``
    (SHAPE_SUMS) with in an image of ``beam`` covariance (arcsec**2); zeros for those that do not
    count as resolved (RESOLVED_MIN_EXCESS, RESOLVED_MIN_SIGMA): a point source keeps the beam."""
    weight = np.asarray(sums["weight"], float)
    seen = weight > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        ee, en, nn = (np.where(seen, np.asarray(sums[name], float) / weight, 0.0) for name in SHAPE_SUMS[1:])
    ee, en, nn = _positive(ee, en, nn)
    area = (beam[0, 0] + ee) * (beam[1, 1] + nn) - np.square(beam[0, 1] + en)
    excess = np.sqrt(area / np.linalg.det(beam)) - 1.0
    # the weight's inverse is the mean shape's variance over AREA_SCATTER**2, in arcsec**4: as a
    # fraction of this beam's area
    with np.errstate(divide="ignore"):
        scatter = np.where(seen, AREA_SCATTER / np.sqrt(np.where(seen, weight, 1.0) * np.linalg.det(beam)), np.inf)
    resolved = seen & (excess >= RESOLVED_MIN_EXCESS) & (excess >= RESOLVED_MIN_SIGMA * scatter)
    return np.where(resolved[:, None], np.stack([ee, en, nn], -1), 0.0)


def _positive(ee: np.ndarray, en: np.ndarray, nn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric 2x2 matrices (ee, en, nn) with their negative eigenvalue set to 0 (a noisy mean
    shape of a near point may not be positive): ``M - lo I`` scaled by ``hi / (hi - lo)`` where
    ``lo < 0 < hi``, 0 where both are negative."""
    mid, half = 0.5 * (ee + nn), np.hypot(0.5 * (ee - nn), en)
    lo, hi = mid - half, mid + half
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(lo >= 0.0, 1.0, np.where(hi > 0.0, hi / (hi - lo), 0.0))
    shift = np.where(lo >= 0.0, 0.0, np.where(hi > 0.0, lo, 0.0))
    return (ee - shift) * scale, en * scale, (nn - shift) * scale
