"""Kappa-sigma clipped statistics of many samples at once: the noise of the background boxes and
of the quality control.

A sample is a row of a stack (NaN-tolerant). Each row is sorted once, so the pixels kept by a
clipping are a contiguous run whose sums come from block prefix sums; the clipping limits are
found by binary search in the rows whose limits still move.
"""

from __future__ import annotations

import math

import numpy as np

#: Interquartile range of a unit Gaussian.
IQR_PER_SIGMA = 1.3489795


def clipped_variance_factor(kappa: float) -> float:
    """Variance of a unit Gaussian truncated at +-kappa: corrects the std of a clipped sample."""
    tail = 2.0 * kappa * np.exp(-0.5 * kappa**2) / np.sqrt(2.0 * np.pi)
    return float(1.0 - tail / math.erf(kappa / math.sqrt(2.0)))


#: Up to this many rows, :func:`_count_below` searches row by row.
_FEW_ROWS = 32


def _count_below(ordered: np.ndarray, limit: np.ndarray, inclusive: bool, rows: np.ndarray | None = None) -> np.ndarray:
    """Per row of ``ordered`` (rows sorted ascending, NaNs last), or of its ``rows``: how many
    values are ``< limit`` (``<= limit`` when ``inclusive``), by a binary search of all rows at once.

    Equal to ``np.count_nonzero(ordered < limit[:, None], -1)`` (NaNs never count) at the cost of
    ~log2(npix) gathers of one value per row instead of a pass over every value.
    """
    rows = np.arange(len(ordered)) if rows is None else rows
    nrow, npix = len(rows), ordered.shape[1]
    if nrow <= _FEW_ROWS:  # one search per row
        side = "right" if inclusive else "left"
        found = [0 if np.isnan(value) else np.searchsorted(ordered[row], value, side)
                 for row, value in zip(rows, limit)]
        return np.array(found, dtype=np.intp)
    flat, base = ordered.ravel(), rows * npix
    lo, hi = np.zeros(nrow, dtype=np.intp), np.full(nrow, npix, dtype=np.intp)
    compare = np.less_equal if inclusive else np.less
    for _ in range(npix.bit_length()):
        mid = (lo + hi) >> 1
        below = compare(flat.take(base + np.minimum(mid, npix - 1)), limit) & (lo < hi)
        lo = np.where(below, mid + 1, lo)
        hi = np.where(below, hi, mid)
    return lo


#: Sorted pixels summed per block for the prefix sums of :func:`clipped_stats`.
_BLOCK = 16
#: Rows of a stack converted to float64 at a time (the temporaries stay in the cache).
_ROWS_PER_CHUNK = 1024


def _block_prefix_sums(offsets: np.ndarray) -> np.ndarray:
    """(nrow, nblock + 1, 2) float64: per row of ``offsets`` (nrow, npix), the sums of the values
    and of their squares over its first 0, 1, ... nblock whole blocks of ``_BLOCK`` values."""
    nrow, npix = offsets.shape
    nblock = npix // _BLOCK
    prefix = np.zeros((nrow, nblock + 1, 2))
    ones = np.ones(_BLOCK)
    for first in range(0, nrow, _ROWS_PER_CHUNK):
        chunk = offsets[first : first + _ROWS_PER_CHUNK, : nblock * _BLOCK].astype(np.float64)
        blocks = prefix[first : first + _ROWS_PER_CHUNK, 1:]
        blocks[..., 0] = chunk.reshape(len(chunk), -1, _BLOCK) @ ones  # a matrix product: many short sums
        np.square(chunk, out=chunk)
        blocks[..., 1] = chunk.reshape(len(chunk), -1, _BLOCK) @ ones
    return np.cumsum(prefix, axis=1, out=prefix)


def _range_sums(offsets: np.ndarray, prefix: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                rows: np.ndarray) -> np.ndarray:
    """(len(rows), 2) float64: per row of ``rows`` the sum of ``offsets[row, lo:hi]`` and of their
    squares, from the block prefix sums of :func:`_block_prefix_sums` and the few values of the
    last partial blocks."""
    npix = offsets.shape[1]
    ends = np.stack([lo, hi], -1)  # (len(rows), 2)
    block = ends // _BLOCK
    within = np.arange(_BLOCK)
    index = np.minimum(block[..., None] * _BLOCK + within, npix - 1)  # (len(rows), 2, _BLOCK)
    index += (rows * npix)[:, None, None]
    values = offsets.reshape(-1).take(index).astype(np.float64)
    values = np.where(within < (ends - block * _BLOCK)[..., None], values, 0.0)
    ones = np.ones(_BLOCK)
    partial = np.stack([values @ ones, np.square(values) @ ones], -1)  # (nrow, 2 ends, 2 sums)
    at = prefix.reshape(-1, 2).take(block + (rows * prefix.shape[1])[:, None], axis=0) + partial
    return at[:, 1] - at[:, 0]


def clipped_stats(
    stack: np.ndarray, kappa: float = 3.0, max_iter: int = 10, sort_in_place: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kappa-sigma clipped mean and std along the last axis, NaN-tolerant, all boxes at once.

    Pixels further than ``kappa`` sigma from the mean are dropped until nothing changes. The std
    is corrected for the truncation so it estimates the sigma of the Gaussian noise. Returns
    (mean, std, number of finite pixels) per box. ``sort_in_place``: ``stack`` may be reordered
    and overwritten (when it is a C-contiguous float array).

    Each box is sorted once (NaNs last), so the kept pixels are always a contiguous run
    ``[lo, hi)`` whose sums come from prefix sums per block of sorted pixels; an iteration only
    finds the clipping limits in the sorted boxes by binary search, and only in the boxes whose
    limits moved in the one before (most settle in one or two). The first limits are robust:
    the median +- kappa times the interquartile range's sigma, so bright sources never inflate
    the starting width.
    """
    shape, npix = stack.shape[:-1], stack.shape[-1]
    if not (sort_in_place and stack.dtype.kind == "f" and stack.flags.c_contiguous):
        stack = stack.astype(stack.dtype if stack.dtype.kind == "f" else np.float64, order="C")  # a copy
    ordered = stack.reshape(-1, npix)
    ordered.sort(axis=-1)
    # finite = below +inf and not -inf
    inf = np.full(len(ordered), np.inf, dtype=ordered.dtype)
    nfinite = _count_below(ordered, inf, False) - _count_below(ordered, -inf, True)

    def quantile(q: float) -> np.ndarray:  # the value nearest the q quantile of the finite ones
        index = np.rint(q * np.maximum(nfinite - 1, 0)).astype(int)
        return np.take_along_axis(ordered, index[..., None], -1)

    # Offsets from the median keep the sums accurate.
    median = quantile(0.5)
    median[nfinite == 0] = 0.0
    width = kappa * (quantile(0.75) - quantile(0.25)) / IQR_PER_SIGMA
    offsets = np.subtract(ordered, median, out=ordered)
    if np.isfinite(median).all():  # offsets stay sorted: limits by binary search
        def count(limit: np.ndarray, inclusive: bool, rows: np.ndarray) -> np.ndarray:
            return _count_below(offsets, limit, inclusive, rows)
    else:  # -inf - -inf is NaN at the front of a box
        def count(limit: np.ndarray, inclusive: bool, rows: np.ndarray) -> np.ndarray:
            below = offsets[rows] <= limit[:, None] if inclusive else offsets[rows] < limit[:, None]
            return np.count_nonzero(below, axis=-1)
    rows = np.arange(len(ordered))  # the boxes whose clipping still changes
    lo, hi = count(-width[:, 0], False, rows), count(width[:, 0], True, rows)
    prefix = _block_prefix_sums(offsets)  # NaNs (last) enter only the sums beyond the finite pixels
    norm = 1.0 / np.sqrt(clipped_variance_factor(kappa))
    mean, sigma = np.zeros(len(ordered)), np.zeros(len(ordered))
    for _ in range(max_iter):
        n = np.maximum(hi[rows] - lo[rows], 1)
        total = _range_sums(offsets, prefix, lo[rows], hi[rows], rows)
        mean[rows], mean_sq = total[:, 0] / n, total[:, 1] / n
        sigma[rows] = np.sqrt(np.maximum(mean_sq - mean[rows] ** 2, 0.0)) * norm
        low = (mean[rows] - kappa * sigma[rows]).astype(np.float32)
        high = (mean[rows] + kappa * sigma[rows]).astype(np.float32)
        new_lo, new_hi = count(low, False, rows), count(high, True, rows)
        moved = (new_lo != lo[rows]) | (new_hi != hi[rows])
        lo[rows], hi[rows] = new_lo, new_hi
        rows = rows[moved]  # a box whose limits stay has its statistics
        if not len(rows):
            break
    return (mean + median[..., 0]).reshape(shape), sigma.reshape(shape), nfinite.reshape(shape)
