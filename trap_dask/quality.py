"""Image quality control: reject images whose noise is absent, undefined or out of bounds, and
those whose restoring beam cannot be theirs.

The noise statistic is TraP's: a kappa-sigma clipped standard deviation of the central
``1/f x 1/f`` region of the image (``f = reduction_factor_for_rms``), in Jy/beam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trap_dask.config import DEFAULTS
from trap_dask.extraction.clipping import clipped_stats

#: Clipping threshold (in standard deviations) and iteration cap of the clipped statistics.
KAPPA = 3.0
MAX_ITERATIONS = 10


@dataclass(frozen=True)
class QualityParams:
    """Quality-control limits (TraP ``[image_quality]`` section).

    rms_min, rms_max : accepted range of the central clipped rms, Jy/beam
    reduction_factor_for_rms : the rms is measured in the central 1/f x 1/f of the image
    """

    rms_min: float = DEFAULTS.rms_min  # defaults: trap_dask.config.Config's (the one source)
    rms_max: float = DEFAULTS.rms_max
    reduction_factor_for_rms: float = DEFAULTS.reduction_factor_for_rms


@dataclass(frozen=True)
class ImageStats:
    """Noise statistics of one image, Jy/beam.

    rms : clipped rms of the central region (what the quality control judges)
    rms_min, rms_max : lowest and highest rms of the noise map in the extraction region (TraP's
        meaning; trap_dask.extraction.extract.noise_range), NaN until the map is made and for an
        image rejected before it was
    """

    rms: float
    rms_min: float = math.nan
    rms_max: float = math.nan


def _central_region(data: np.ndarray, reduction_factor: float) -> np.ndarray:
    """The central ``ny/f x nx/f`` view of a 2-D array (at least one pixel a side)."""
    if reduction_factor < 1:
        raise ValueError(f"reduction_factor_for_rms must be >= 1, got {reduction_factor}")
    ny, nx = data.shape
    hy, hx = max(1, round(ny / reduction_factor)), max(1, round(nx / reduction_factor))
    y0, x0 = (ny - hy) // 2, (nx - hx) // 2
    return data[y0 : y0 + hy, x0 : x0 + hx]


def clipped_rms(values: np.ndarray, kappa: float = KAPPA, max_iterations: int = MAX_ITERATIONS) -> np.ndarray:
    """Kappa-sigma clipped, truncation-corrected standard deviation of each row of a 2-D array
    (in the units of ``values``, e.g. Jy/beam).

    The statistic of :func:`trap_dask.extraction.clipping.clipped_stats` (NaN ignored), so the
    quality control and the noise maps agree. Returns (n_groups,) float64; NaN for a row with
    fewer than two finite values.
    """
    _, sigma, nfinite = clipped_stats(values, kappa, max_iterations)
    return np.where(nfinite >= 2, sigma, np.nan)


def central_rms(data: np.ndarray, reduction_factor: float = 4.0) -> float:
    """Clipped rms (Jy/beam) of the central ``1/f x 1/f`` region of a 2-D image (NaN ignored)."""
    region = _central_region(data, reduction_factor)
    return float(clipped_rms(region.reshape(1, -1))[0])


def beam_problem(smaj: float, smin: float, pixel_scale: float, shape: tuple[int, int]) -> str | None:
    """Why a restoring beam of semi-axes ``smaj``, ``smin`` (deg) cannot be that of an image of
    ``shape`` (ny, nx) pixels of ``pixel_scale`` deg, as a sentence for users; None if it can.

    A beam narrower than a pixel cannot be fitted (a BMAJ in radians looks like one); one wider
    than half the image leaves no room for a source (a BMAJ in arcsec looks like one). Both
    ruin every position error and association that follows, so such an image is rejected.
    """
    major, minor = 7200.0 * smaj, 7200.0 * smin  # FWHM, arcsec
    beam = f"the restoring beam ({major:.3g}\" x {minor:.3g}\" FWHM)"
    if 2.0 * smin < pixel_scale:
        return f"{beam} is narrower than a pixel ({3600.0 * pixel_scale:.3g}\"): BMAJ and BMIN are FWHM in degrees"
    if 2.0 * smaj > 0.5 * min(shape) * pixel_scale:
        return f"{beam} is wider than half the image: BMAJ and BMIN are FWHM in degrees"
    return None


def _told_apart(value: float, limit: float) -> tuple[str, str]:
    """``value`` and ``limit`` with 3 significant digits, or as many more as tell them apart."""
    for digits in (3, 4, 5, 6, 9, 17):
        shown = f"{value:.{digits}g}", f"{limit:.{digits}g}"
        if shown[0] != shown[1]:
            break
    return shown


def check_quality(data: np.ndarray, params: QualityParams = QualityParams()) -> tuple[ImageStats, str | None]:
    """Measure the noise of a 2-D image and decide whether to reject it.

    Returns
    -------
    (stats, reason): ``reason`` is None for an accepted image, else a sentence for users.
    """
    # a finite pixel in the central region (the usual case) spares the scan of the whole image
    factor = params.reduction_factor_for_rms
    central = factor >= 1 and bool(np.isfinite(_central_region(data, factor)).any())
    if not (central or np.isfinite(data).any()):
        return ImageStats(math.nan), "the image has no finite pixels"
    rms = central_rms(data, params.reduction_factor_for_rms)
    stats = ImageStats(rms)
    if not math.isfinite(rms):
        reason = (
            f"the central 1/{params.reduction_factor_for_rms:g} of the image has fewer than two finite pixels,"
            " so its rms is undefined"
        )
    elif rms == 0.0:
        reason = "the central rms is zero: the image is constant"
    elif rms < params.rms_min:
        shown, limit = _told_apart(rms, params.rms_min)
        reason = f"central rms {shown} Jy/beam is below rms_min = {limit} Jy/beam"
    elif rms > params.rms_max:
        shown, limit = _told_apart(rms, params.rms_max)
        reason = f"central rms {shown} Jy/beam is above rms_max = {limit} Jy/beam"
    else:
        reason = None
    return stats, reason
