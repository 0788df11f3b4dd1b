"""Image quality control: reject images whose noise is absent, undefined or out of bounds.

The noise statistic is TraP's: a kappa-sigma clipped standard deviation of the central
``1/f x 1/f`` region of the image (``f = reduction_factor_for_rms``), in Jy/beam.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

#: Clipping threshold (in standard deviations) and iteration cap of the clipped statistics.
KAPPA = 3.0
MAX_ITERATIONS = 10
#: The central region is tiled by BOXES x BOXES boxes for ``rms_min`` / ``rms_max``.
BOXES = 4


@dataclass(frozen=True)
class QualityParams:
    """Quality-control limits (TraP ``[image_quality]`` section).

    rms_min, rms_max : accepted range of the central clipped rms, Jy/beam
    reduction_factor_for_rms : the rms is measured in the central 1/f x 1/f of the image
    """

    rms_min: float = 0.0
    rms_max: float = math.inf
    reduction_factor_for_rms: float = 4.0


@dataclass(frozen=True)
class ImageStats:
    """Noise statistics of one image, Jy/beam.

    rms : clipped rms of the central region
    rms_min, rms_max : smallest and largest clipped rms of the ``BOXES x BOXES`` boxes that
        tile the central region (a cheap stand-in for the extremes of a full noise map)
    """

    rms: float
    rms_min: float
    rms_max: float


def _central_region(data: np.ndarray, reduction_factor: float) -> np.ndarray:
    """The central ``ny/f x nx/f`` view of a 2-D array (at least one pixel a side)."""
    if reduction_factor < 1:
        raise ValueError(f"reduction_factor_for_rms must be >= 1, got {reduction_factor}")
    ny, nx = data.shape
    hy, hx = max(1, round(ny / reduction_factor)), max(1, round(nx / reduction_factor))
    y0, x0 = (ny - hy) // 2, (nx - hx) // 2
    return data[y0 : y0 + hy, x0 : x0 + hx]


def clipped_std(values: np.ndarray, kappa: float = KAPPA, max_iterations: int = MAX_ITERATIONS) -> np.ndarray:
    """Kappa-sigma clipped standard deviation of each row of a 2-D array (NaN ignored).

    Starts from the median and the MAD-based width, then iterates mean and standard deviation
    of the pixels within ``kappa`` standard deviations of the mean until the kept set stops
    changing. Clipping biases the width of Gaussian noise low (0.985 sigma for kappa = 3); the
    result is divided by that factor, so it estimates the noise sigma without bias.

    Parameters
    ----------
    values : (n_groups, n) array
    kappa : clipping threshold in standard deviations

    Returns
    -------
    (n_groups,) float64 array; NaN for a group with fewer than two finite values
    """
    finite = np.isfinite(values)
    x = np.where(finite, values, 0.0).astype(np.float64)
    with warnings.catch_warnings():  # all-NaN rows give NaN, reported by the return value
        warnings.simplefilter("ignore", RuntimeWarning)
        centre = np.nanmedian(values, axis=1, keepdims=True).astype(np.float64)
        width = 1.4826 * np.nanmedian(np.abs(values - centre), axis=1, keepdims=True)
    keep, offset = None, np.empty_like(x)  # offset: reused |x - centre| and (x - centre)**2
    for _ in range(max_iterations):
        np.abs(np.subtract(x, centre, out=offset), out=offset)
        new_keep = (offset <= kappa * width) & finite
        if keep is not None and np.array_equal(new_keep, keep):
            break
        keep = new_keep
        n = keep.sum(axis=1, keepdims=True)
        centre = x.sum(axis=1, keepdims=True, where=keep) / np.maximum(n, 1)
        np.square(np.subtract(x, centre, out=offset), out=offset)
        width = np.sqrt(offset.sum(axis=1, keepdims=True, where=keep) / np.maximum(n - 1, 1))
    return np.where(finite.sum(axis=1) >= 2, width[:, 0] / _clipping_bias(kappa), np.nan)


def _truncated_normal_std(t: float) -> float:
    """Standard deviation of a unit normal distribution truncated at +-t."""
    z = t / math.sqrt(2.0)
    return math.sqrt(1.0 - 2.0 * t * math.exp(-z * z) / (math.sqrt(2.0 * math.pi) * erf(z)))


@functools.lru_cache
def _clipping_bias(kappa: float) -> float:
    """Converged clipped std of unit Gaussian noise: the fixed point of w = std(|x| < kappa w)."""
    width = 1.0
    for _ in range(100):
        width = _truncated_normal_std(kappa * width)
    return width


def central_rms(data: np.ndarray, reduction_factor: float = 4.0) -> float:
    """Clipped rms (Jy/beam) of the central ``1/f x 1/f`` region of a 2-D image (NaN ignored)."""
    region = _central_region(data, reduction_factor)
    return float(clipped_std(region.reshape(1, -1))[0])


def image_stats(data: np.ndarray, reduction_factor: float = 4.0) -> ImageStats:
    """Noise statistics of a 2-D image (Jy/beam); see :class:`ImageStats`."""
    region = _central_region(data, reduction_factor)
    rms = float(clipped_std(region.reshape(1, -1))[0])
    ny, nx = (n // BOXES * BOXES for n in region.shape)
    if ny and nx:
        boxes = region[:ny, :nx].reshape(BOXES, ny // BOXES, BOXES, nx // BOXES).swapaxes(1, 2)
        box_rms = clipped_std(boxes.reshape(BOXES * BOXES, -1))
    else:  # region smaller than the box grid: the region is its only box
        box_rms = np.array([rms])
    finite = box_rms[np.isfinite(box_rms)]
    return ImageStats(
        rms=rms,
        rms_min=float(finite.min()) if finite.size else math.nan,
        rms_max=float(finite.max()) if finite.size else math.nan,
    )


def check_quality(data: np.ndarray, params: QualityParams = QualityParams()) -> tuple[ImageStats, str | None]:
    """Measure the noise of a 2-D image and decide whether to reject it.

    Returns
    -------
    (stats, reason): ``reason`` is None for an accepted image, else a sentence for users.
    """
    if not np.isfinite(data).any():
        return ImageStats(math.nan, math.nan, math.nan), "the image has no finite pixels"
    stats = image_stats(data, params.reduction_factor_for_rms)
    rms = stats.rms
    if not math.isfinite(rms):
        reason = (
            f"the central 1/{params.reduction_factor_for_rms:g} of the image has fewer than two finite pixels,"
            " so its rms is undefined"
        )
    elif rms == 0.0:
        reason = "the central rms is zero: the image is constant"
    elif rms < params.rms_min:
        reason = f"central rms {rms:.3g} Jy/beam is below rms_min = {params.rms_min:.3g} Jy/beam"
    elif rms > params.rms_max:
        reason = f"central rms {rms:.3g} Jy/beam is above rms_max = {params.rms_max:.3g} Jy/beam"
    else:
        reason = None
    return stats, reason
