"""Background and noise maps from kappa-sigma clipped statistics on a grid of boxes."""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from trap_dask.extraction.clipping import clipped_stats

#: Boxes with fewer finite pixels than this fraction of the box get their values from neighbours.
MIN_FINITE_FRACTION = 0.2


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
        weights = wy[first + start : first + stop, pair]
        np.matmul(weights, across[pair], out=band)
        if floor is not None and not _above_floor(weights, across[pair], floor):
            np.maximum(band, floor, out=band)
        if minuend is not None:
            np.subtract(minuend[start:stop], band, out=out[start:stop])


#: A band interpolated between rows of ``across`` at least (1 + FLOOR_MARGIN) times the floor is
#: above the floor: float32's rounding of two weights summing to 1 takes off ~1e-7 of a value at most.
FLOOR_MARGIN = 1e-4


def _above_floor(weights: np.ndarray, rows: np.ndarray, floor: float) -> bool:
    """Whether the band ``weights @ rows`` is above ``floor`` without looking at it: it lies between
    two box centres (non-negative weights, a convex combination) and both ``rows`` are well above
    the floor (only an extrapolation past the outermost centres can take the map below it)."""
    return bool(weights.min() >= 0.0 and rows.min() > floor * (1.0 + FLOOR_MARGIN))


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
