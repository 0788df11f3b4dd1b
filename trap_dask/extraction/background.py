"""Background and noise maps from kappa-sigma clipped statistics on a grid of boxes."""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage, special

#: Boxes with fewer finite pixels than this fraction of the box get their values from neighbours.
MIN_FINITE_FRACTION = 0.2
#: Interquartile range of a unit Gaussian.
IQR_PER_SIGMA = 1.3489795


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
    stack = np.full((gy, gx, by, bx), np.nan, dtype=np.float32)
    # tiles[i, a, j, b] is pixel (i * by + a, j * bx + b): whole boxes, then the partial last ones
    tiles = stack.transpose(0, 2, 1, 3)
    qy, qx = ny // by, nx // bx
    ry, rx = ny - qy * by, nx - qx * bx
    tiles[:qy, :, :qx] = sub[: qy * by, : qx * bx].reshape(qy, by, qx, bx)
    if rx:
        tiles[:qy, :, qx, :rx] = sub[: qy * by, qx * bx :].reshape(qy, by, rx)
    if ry:
        tiles[qy, :ry, :qx] = sub[qy * by :, : qx * bx].reshape(ry, qx, bx)
    if ry and rx:
        tiles[qy, :ry, qx, :rx] = sub[qy * by :, qx * bx :]
    stack = stack.reshape(gy, gx, by * bx)

    def centres(g: int, b: int, n: int) -> np.ndarray:
        start = np.arange(g) * b
        return stride * (np.minimum(start + b, n) + start - 1) / 2.0

    return stack, centres(gy, by, ny), centres(gx, bx, nx)


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
    return _maps(data, box_y, box_x, kappa, stride, subtract=False)


#: Images of more pixels than this get their noise map as a :class:`NoiseMap` from
#: :func:`residual_and_rms` (an 8192^2 map is 256 MB of fresh pages per image, and ~15% of its
#: time); smaller ones as an array, whose memory the next image reuses.
FULL_NOISE_MAP_PIXELS = 1 << 23


class NoiseMap:
    """A noise map made only where it is looked at (Jy/beam, float32, 2-D): the values of
    ``interpolate(grid, centre_y, centre_x, ny, nx, floor)`` at the pixels asked for, with the same
    interpolation, never as an image-sized array.

    Indexing as an array: ``[iy, ix]`` (integer arrays of any shape) and ``[first:last]`` (a band
    of whole rows); :meth:`take` of flat indices.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, grid: np.ndarray, centre_y: np.ndarray, centre_x: np.ndarray, shape: tuple[int, int],
                 floor: float) -> None:
        self.shape, self.floor = shape, np.float32(floor)
        self.across, self.wy, self.lower = _bilinear(grid, centre_y, centre_x, shape)

    def __getitem__(self, key: slice | tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        if isinstance(key, slice):
            first, last, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("a NoiseMap gives bands of consecutive rows only")
            band = np.empty((max(last - first, 0), self.shape[1]), dtype=np.float32)
            _interpolate_rows(self.across, self.wy, self.lower, first, band, self.floor)
            return band
        iy, ix = np.broadcast_arrays(*key)
        low = self.lower[iy]
        values = self.wy[iy, low] * self.across[low, ix]
        if len(self.across) > 1:  # else one box centre along y: its row is the map's
            values += self.wy[iy, low + 1] * self.across[low + 1, ix]
        return np.maximum(values, self.floor)

    def take(self, flat: np.ndarray) -> np.ndarray:
        """The noise at flat pixel indices."""
        return self[np.divmod(flat, self.shape[1])]

    def any_finite(self) -> bool:
        """Whether the map has a finite value."""
        return bool(np.isfinite(self.across).any())


def _bilinear(grid: np.ndarray, centre_y: np.ndarray, centre_x: np.ndarray,
              shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`_interpolate_rows` interpolates a (gy, gx) grid of box values with onto an image
    of ``shape`` (ny, nx): ``grid @ Wx.T`` (gy, nx), the weights ``Wy`` (ny, gy) and, per row, the
    lower of the two box centres it takes."""
    ny, nx = shape
    lower = np.clip(np.searchsorted(centre_y, np.arange(ny), side="right") - 1, 0, max(len(centre_y) - 2, 0))
    return grid @ interpolation_weights(nx, centre_x).T, interpolation_weights(ny, centre_y), lower


def _interpolate_rows(across: np.ndarray, wy: np.ndarray, lower: np.ndarray, first: int, out: np.ndarray,
                      floor: float | None = None, minuend: np.ndarray | None = None) -> None:
    """Rows ``first .. first + len(out)`` of ``wy @ across`` into ``out`` (at least ``floor``;
    subtracted from ``minuend``, those rows of an image, when given): each band of rows between two
    box centres is the product of two rows of ``across`` only (``wy`` has two non-zero weights per
    row), finished while in the cache."""
    rows = lower[first : first + len(out)]
    if len(rows) == 0:
        return
    bounds = np.flatnonzero(np.r_[True, np.diff(rows) != 0, True])
    # a band is made in a scratch band when it is subtracted from itself
    scratch = np.empty((int(np.diff(bounds).max()), out.shape[1]), dtype=np.float32) if out is minuend else None
    for start, stop in itertools.pairwise(bounds):
        pair = slice(rows[start], rows[start] + 2)
        band = out[start:stop] if scratch is None else scratch[: stop - start]
        np.matmul(wy[first + start : first + stop, pair], across[pair], out=band)
        if floor is not None:
            np.maximum(band, floor, out=band)
        if minuend is not None:
            np.subtract(minuend[start:stop], band, out=out[start:stop])


def residual_and_rms(
    data: np.ndarray, box_y: int = 50, box_x: int = 50, kappa: float = 3.0, stride: int = 1,
    overwrite: bool = False,
) -> tuple[np.ndarray, np.ndarray | NoiseMap]:
    """``data - background`` and the noise map of :func:`background_maps`, without keeping the
    background map (each band of it is subtracted while it is in the cache); the noise map is a
    :class:`NoiseMap` for images of more than FULL_NOISE_MAP_PIXELS. ``overwrite``: the residual
    is written into ``data`` (float32) instead of a new array."""
    return _maps(data, box_y, box_x, kappa, stride, subtract=True, overwrite=overwrite)


def _maps(
    data: np.ndarray, box_y: int, box_x: int, kappa: float, stride: int, subtract: bool, overwrite: bool = False,
) -> tuple[np.ndarray, np.ndarray | NoiseMap]:
    ny, nx = data.shape
    stack, centre_y, centre_x = _boxes(data, box_y, box_x, stride)
    mean, sigma, nfinite = clipped_stats(stack, kappa, sort_in_place=True)  # the stack is a copy
    bad = (nfinite < MIN_FINITE_FRACTION * stack.shape[-1]) | ~(sigma > 0)
    out = data if overwrite else None
    if bad.all():
        full = np.full((ny, nx), np.nan, dtype=np.float32)
        return (np.subtract(data, full, out=out) if subtract else full), full.copy()
    mean = _fill_missing(np.where(bad, np.nan, mean)).astype(np.float32)
    sigma = _fill_missing(np.where(bad, np.nan, sigma)).astype(np.float32)
    background = interpolate(mean, centre_y, centre_x, ny, nx, minuend=data if subtract else None, out=out)
    if subtract and ny * nx > FULL_NOISE_MAP_PIXELS:
        return background, NoiseMap(sigma, centre_y, centre_x, (ny, nx), floor=0.5 * sigma.min())
    rms = interpolate(sigma, centre_y, centre_x, ny, nx, floor=0.5 * sigma.min())
    return background, rms


def interpolate(
    grid: np.ndarray, centre_y: np.ndarray, centre_x: np.ndarray, ny: int, nx: int,
    floor: float | None = None, minuend: np.ndarray | None = None, out: np.ndarray | None = None,
) -> np.ndarray:
    """``Wy @ grid @ Wx.T`` (float32, ny x nx) with the weights of :func:`interpolation_weights`;
    at least ``floor`` when given; subtracted from ``minuend`` (ny, nx) when given. Written into
    ``out`` (float32, ny x nx; may be ``minuend`` itself) when given, else into a new array.

    ``grid @ Wx.T`` first (small), then the rows band by band (:func:`_interpolate_rows`).
    """
    out = np.empty((ny, nx), dtype=np.float32) if out is None else out
    _interpolate_rows(*_bilinear(grid, centre_y, centre_x, (ny, nx)), 0, out, floor, minuend)
    return out
