"""Background and noise maps from kappa-sigma clipped statistics on a grid of boxes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage, special

#: Boxes with fewer finite pixels than this fraction of the box get their values from neighbours.
MIN_FINITE_FRACTION = 0.2


def clipped_variance_factor(kappa: float) -> float:
    """Variance of a unit Gaussian truncated at +-kappa: corrects the std of a clipped sample."""
    tail = 2.0 * kappa * np.exp(-0.5 * kappa**2) / np.sqrt(2.0 * np.pi)
    return float(1.0 - tail / special.erf(kappa / np.sqrt(2.0)))


def _boxes(
    data: np.ndarray, box_y: int, box_x: int, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut ``data`` into a (gy, gx, npix) stack of near-equal boxes of at most box_y x box_x.

    Only every ``stride``-th pixel along each axis enters the stack. Returns the stack
    (NaN-padded) and the box centres along y and x in pixels of ``data``.
    """
    sub = data[::stride, ::stride]
    ny, nx = sub.shape
    gy = -(-data.shape[0] // max(box_y, 1))
    gx = -(-data.shape[1] // max(box_x, 1))
    gy, gx = min(gy, ny), min(gx, nx)
    by, bx = -(-ny // gy), -(-nx // gx)
    padded = np.full((gy * by, gx * bx), np.nan, dtype=np.float32)
    padded[:ny, :nx] = sub
    stack = padded.reshape(gy, by, gx, bx).transpose(0, 2, 1, 3).reshape(gy, gx, by * bx)

    def centres(g: int, b: int, n: int) -> np.ndarray:
        start = np.arange(g) * b
        return stride * (np.minimum(start + b, n) + start - 1) / 2.0

    return stack, centres(gy, by, ny), centres(gx, bx, nx)


def clipped_stats(
    stack: np.ndarray, kappa: float = 3.0, max_iter: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kappa-sigma clipped mean and std along the last axis, NaN-tolerant, all boxes at once.

    Pixels further than ``kappa`` sigma from the mean are dropped until nothing changes. The std
    is corrected for the truncation so it estimates the sigma of the Gaussian noise. Returns
    (mean, std, number of finite pixels) per box.
    """
    finite = np.isfinite(stack)
    nfinite = finite.sum(-1)
    # Offsets from a first guess (median of a subsample per box) keep the float32 sums accurate.
    sub = stack[..., ::7]
    has_sub = np.isfinite(sub).any(-1)
    guess = np.zeros(stack.shape[:-1], dtype=np.float32)
    guess[has_sub] = np.nanmedian(sub[has_sub], axis=-1)
    values = np.where(finite, stack - guess[..., None], 0.0).astype(np.float32)
    squares = np.square(values)
    norm = 1.0 / np.sqrt(clipped_variance_factor(kappa))
    keep = finite.astype(np.float32)
    nkept = nfinite
    for _ in range(max_iter):
        n = np.maximum(nkept, 1)
        mean = np.einsum("...k,...k->...", values, keep, dtype=np.float64) / n
        var = np.einsum("...k,...k->...", squares, keep, dtype=np.float64) / n - mean**2
        sigma = np.sqrt(np.maximum(var, 0.0)) * norm
        limit = (kappa * sigma).astype(np.float32)[..., None]
        new = finite & (np.abs(values - mean.astype(np.float32)[..., None]) <= limit)
        new_nkept = new.sum(-1)
        if np.array_equal(new_nkept, nkept):
            break
        keep, nkept = new.astype(np.float32), new_nkept
    return mean + guess, sigma, nfinite


def _fill_missing(grid: np.ndarray) -> np.ndarray:
    """Replace NaN cells of a 2-D grid by their nearest finite cell."""
    missing = ~np.isfinite(grid)
    if not missing.any() or missing.all():
        return grid
    idx = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
    return grid[tuple(idx)]


def interpolation_weights(n: int, centres: np.ndarray) -> np.ndarray:
    """(n, len(centres)) matrix of piecewise-linear interpolation weights onto pixels 0..n-1.

    Beyond the outermost box centres the line through the last two centres is extended, so a
    linear gradient is reproduced exactly up to the image edge.
    """
    g = len(centres)
    if g == 1:
        return np.ones((n, 1), dtype=np.float32)
    pos = np.arange(n, dtype=float)
    lower = np.clip(np.searchsorted(centres, pos, side="right") - 1, 0, g - 2)
    frac = (pos - centres[lower]) / (centres[lower + 1] - centres[lower])
    weights = np.zeros((n, g), dtype=np.float32)
    rows = np.arange(n)
    weights[rows, lower] = 1.0 - frac
    weights[rows, lower + 1] = frac
    return weights


def background_maps(
    data: np.ndarray, box_y: int = 50, box_x: int = 50, kappa: float = 3.0, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Background level and per-pixel noise maps (float32, same units as ``data``, e.g. Jy/beam).

    Clipped statistics are measured in boxes of about ``box_y`` x ``box_x`` pixels and
    interpolated bilinearly to every pixel as ``Wy @ grid @ Wx.T``. Boxes that are mostly blank
    (NaN) take the values of the nearest good box. An image without finite pixels gives NaN maps.
    ``stride`` > 1 measures the statistics on every stride-th pixel only: as fast and as good
    when the noise is correlated over several pixels (a beam sampled by >= 2 stride pixels).
    """
    ny, nx = data.shape
    stack, centre_y, centre_x = _boxes(data, box_y, box_x, stride)
    mean, sigma, nfinite = clipped_stats(stack, kappa)
    bad = (nfinite < MIN_FINITE_FRACTION * stack.shape[-1]) | ~(sigma > 0)
    if bad.all():
        full = np.full((ny, nx), np.nan, dtype=np.float32)
        return full, full.copy()
    mean = _fill_missing(np.where(bad, np.nan, mean)).astype(np.float32)
    sigma = _fill_missing(np.where(bad, np.nan, sigma)).astype(np.float32)
    wy, wx = interpolation_weights(ny, centre_y), interpolation_weights(nx, centre_x)
    background = wy @ mean @ wx.T
    rms = np.maximum(wy @ sigma @ wx.T, 0.5 * sigma.min())
    return background, rms
