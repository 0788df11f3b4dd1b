"""Islands of significant pixels, held as flat pixel lists grouped by island."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from trap_dask.extraction.background import NoiseMap

#: 8-connectivity for scipy.ndimage.label.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
#: (dy, dx) of the 8 neighbours of a pixel, in raster order.
NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


@dataclass
class Islands:
    """Pixels of all islands, sorted so that each island is one contiguous segment.

    Attributes
    ----------
    flat : flat image index of every island pixel
    island : island number (0..n-1) of every pixel
    starts : index in the pixel arrays where each island's segment starts (n,)
    peak_flat : flat index of each island's brightest pixel (by S/N) (n,)
    peak_snr : S/N of that pixel (n,)
    """

    flat: np.ndarray
    island: np.ndarray
    starts: np.ndarray
    peak_flat: np.ndarray
    peak_snr: np.ndarray

    @property
    def n(self) -> int:
        """Number of islands."""
        return len(self.starts)

    @property
    def counts(self) -> np.ndarray:
        """Number of pixels of each island."""
        return np.diff(np.append(self.starts, len(self.flat)))

    def select(self, keep: np.ndarray) -> Islands:
        """The islands where ``keep`` (bool per island), renumbered 0..m-1."""
        pix = keep[self.island]
        island = (np.cumsum(keep) - 1)[self.island[pix]]
        return Islands(self.flat[pix], island, _segment_starts(island, int(keep.sum())), self.peak_flat[keep],
                       self.peak_snr[keep])


#: Pixels of the S/N map made at a time by :meth:`SNRMap.flat_above` (a band that stays in the cache).
_BAND_PIXELS = 1 << 16


@dataclass(frozen=True)
class SNRMap:
    """The S/N map ``residual / rms`` (Jy/beam over Jy/beam, float32, 2-D) made only where it is
    looked at: its values at flat indices (:meth:`take`) and the pixels above a level
    (:meth:`flat_above`, band by band), never as an image-sized array. The same numbers as the array
    ``residual / rms``, which serves wherever an SNRMap does."""

    residual: np.ndarray
    rms: np.ndarray | NoiseMap

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) in pixels."""
        return self.residual.shape

    @property
    def size(self) -> int:
        """Number of pixels."""
        return self.residual.size

    def take(self, flat: np.ndarray) -> np.ndarray:
        """S/N at flat pixel indices (NaN where blank)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.residual.ravel().take(flat) / self.rms.take(flat)

    def flat_above(self, level: float) -> np.ndarray:
        """Flat indices (sorted) of the pixels of S/N > ``level`` (never blank ones)."""
        ny, nx = self.shape
        rows = max(1, _BAND_PIXELS // max(nx, 1))
        scratch = np.empty((min(rows, ny), nx), dtype=np.result_type(self.residual.dtype, self.rms.dtype))
        mask = np.empty(scratch.shape, dtype=bool)
        found = []
        with np.errstate(invalid="ignore", divide="ignore"):
            for first in range(0, ny, rows):
                band, above = scratch[: min(rows, ny - first)], mask[: min(rows, ny - first)]
                np.divide(self.residual[first : first + rows], self.rms[first : first + rows], out=band)
                np.greater(band, level, out=above)
                found.append(np.flatnonzero(above) + first * nx)
        return np.concatenate(found)


#: An S/N map: an array or an :class:`SNRMap`.
SNR = np.ndarray | SNRMap


#: Images of up to this many pixels get their S/N map as one array: memory of that size freed by
#: the last image is reused, so it costs one division pass and every look-up is one gather.
#: Larger ones get an :class:`SNRMap`, sparing an image-sized array of fresh pages per image.
FULL_SNR_PIXELS = 1 << 23


def snr_map(residual: np.ndarray, rms: np.ndarray | NoiseMap) -> SNR:
    """The S/N map ``residual / rms`` of a 2-D image: an array, or for a large image (or a noise
    map made where it is looked at) an SNRMap."""
    if residual.size <= FULL_SNR_PIXELS and isinstance(rms, np.ndarray):
        with np.errstate(invalid="ignore", divide="ignore"):
            return residual / rms
    return SNRMap(residual, rms)


def flat_above(snr: SNR, level: float) -> np.ndarray:
    """Flat indices (sorted) of the pixels of S/N > ``level`` (never NaN ones)."""
    if isinstance(snr, SNRMap):
        return snr.flat_above(level)
    with np.errstate(invalid="ignore"):
        return np.flatnonzero(snr > level)


def stable_order(ids: np.ndarray) -> np.ndarray:
    """``np.argsort(ids, kind="stable")`` of non-negative integer ids, by radix sort when they fit
    in 16 bits (NumPy sorts those in linear time; the order is the same)."""
    if len(ids) and 0 <= ids.min() and ids.max() < 2**15:
        ids = ids.astype(np.int16)
    return np.argsort(ids, kind="stable")


def _segment_starts(sorted_ids: np.ndarray, n: int) -> np.ndarray:
    """Start index of each id 0..n-1 in a sorted id array (every id present)."""
    return np.searchsorted(sorted_ids, np.arange(n))


def islands_from_labels(labels: np.ndarray, snr: SNR, detection: float) -> Islands:
    """Group the labelled pixels of a label image (0 = none) by label; keep labels whose peak S/N
    exceeds ``detection``."""
    flat = np.flatnonzero(labels)
    return islands_from_pixels(flat, labels.ravel()[flat], snr, detection)


def islands_from_pixels(flat: np.ndarray, lab: np.ndarray, snr: SNR, detection: float) -> Islands:
    """Group pixels (flat image indices) by their label (0 = none); keep labels whose peak S/N
    exceeds ``detection``.

    Per-label reductions use one sort and ``np.maximum.reduceat`` (fast for many labels).
    """
    flat, lab = flat[lab > 0], lab[lab > 0]
    order = stable_order(lab)
    flat, lab = flat[order], lab[order]
    if len(flat) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Islands(empty, empty, empty, empty, np.zeros(0))
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    pix_snr = snr.take(flat)
    peak_snr = np.maximum.reduceat(pix_snr, starts)
    nlab = len(starts)
    seg = np.repeat(np.arange(nlab), np.diff(np.append(starts, len(flat))))
    is_peak = pix_snr == peak_snr[seg]
    # first pixel of each segment reaching the peak value
    first_peak = np.flatnonzero(is_peak)
    peak_pos = first_peak[np.r_[True, seg[first_peak][1:] != seg[first_peak][:-1]]]
    keep = peak_snr > detection
    keep_pix = keep[seg]
    new_id = np.cumsum(keep) - 1
    island = new_id[seg[keep_pix]]
    return Islands(
        flat[keep_pix],
        island,
        _segment_starts(island, int(keep.sum())),
        flat[peak_pos][keep],
        peak_snr[keep].astype(float),
    )


def find_islands(snr: SNR, analysis: float, detection: float) -> tuple[np.ndarray, Islands]:
    """Label 8-connected pixels with S/N > ``analysis``; keep islands peaking above ``detection``.

    Returns the label image (all islands, including rejected ones) and the kept islands.
    NaN pixels never belong to an island.
    """
    flat = flat_above(snr, analysis)
    above = np.zeros(snr.shape, dtype=bool)
    above.flat[flat] = True
    labels, _ = ndimage.label(above, structure=EIGHT_CONNECTED)
    return labels, islands_from_pixels(flat, labels.ravel()[flat], snr, detection)


def label_runs(flat: np.ndarray, nx: int) -> np.ndarray:
    """The 8-connected components of the pixels at sorted flat indices ``flat`` of an image ``nx``
    pixels wide: their labels 1..n, numbered as ``scipy.ndimage.label`` numbers them (by first
    pixel).

    Works on the runs of pixels along rows, not on every pixel: two runs in adjacent rows are
    joined when their columns overlap or touch diagonally, and the runs' graph is split into
    connected components.
    """
    if len(flat) == 0:
        return np.zeros(0, dtype=np.int32)
    row = flat // nx
    first = np.flatnonzero(np.r_[True, (np.diff(flat) != 1) | (np.diff(row) != 0)])
    length = np.diff(first, append=len(flat))
    run_row, start_col = row[first], flat[first] - row[first] * nx
    width = nx + 2  # columns -1..nx of a row never reach the next one
    key_start = run_row * width + start_col + 1
    key_end = key_start + length - 1
    # runs of the row above touching each run: a contiguous range of the sorted runs
    above_start = key_start - width  # the same columns one row up
    lo = np.searchsorted(key_end, above_start - 1)
    hi = np.searchsorted(key_start, above_start + length, side="right")
    count = np.maximum(hi - lo, 0)
    source = np.repeat(np.arange(len(first)), count)
    target = np.repeat(lo - np.cumsum(count) + count, count) + np.arange(count.sum())
    graph = coo_matrix((np.ones(len(source), dtype=np.int8), (source, target)), shape=(len(first),) * 2)
    n, component = connected_components(graph, directed=False)
    # number the components by their first run (= first pixel in raster order)
    first_run = np.full(n, len(first))
    np.minimum.at(first_run, component, np.arange(len(first)))
    label = np.empty(n, dtype=np.int32)
    label[np.argsort(first_run)] = np.arange(1, n + 1, dtype=np.int32)
    return np.repeat(label[component], length)


def label_islands(snr: SNR, analysis: float, detection: float) -> tuple[np.ndarray, np.ndarray, Islands]:
    """:func:`find_islands` without the label image: returns the flat indices of all pixels with
    S/N > ``analysis`` (sorted), their labels, and the kept islands."""
    flat = flat_above(snr, analysis)
    labels = label_runs(flat, snr.shape[1])
    return flat, labels, islands_from_pixels(flat, labels, snr, detection)


def grow_into_background(islands: Islands, snr: SNR, analysis: float, rings: int) -> Islands:
    """Add ``rings`` rings of 8-connected neighbouring pixels to every island, into the finite
    pixels of S/N <= ``analysis`` (in no island), looking at the S/N of the pixels next to the
    islands only. A pixel reached from several islands goes to one of them; the islands' peaks
    are unchanged."""
    def free(flat: np.ndarray) -> np.ndarray:
        near = snr.take(flat)
        with np.errstate(invalid="ignore"):
            return (near <= analysis) & (near > -np.inf)  # False for NaN and +inf

    # island pixels have S/N > analysis: never free, so none needs to be remembered as taken
    return _grow(islands, snr.shape, free, np.zeros(0, dtype=np.intp), rings)


def _grow(islands: Islands, shape: tuple[int, int], free: Callable[[np.ndarray], np.ndarray],
          taken: np.ndarray, rings: int) -> Islands:
    """:func:`grow_into_background` on an image of ``shape`` whose pixels (flat indices) may be
    added where ``free`` says so and they are not in ``taken`` or already added."""
    ny, nx = shape
    edge, edge_island = islands.flat, islands.island
    grown, grown_island = [edge], [edge_island]
    for _ in range(rings):
        # A pixel reached from several edge pixels goes to the first of them (in edge order):
        # sorting (pixel, 1 + edge position) packed in one integer puts that one first; a taken
        # pixel, packed as (pixel, 0), comes before all and is dropped.
        shift = max(len(edge).bit_length(), 1)
        row, col = np.divmod(edge, nx)
        interior = bool(((row > 0) & (row < ny - 1) & (col > 0) & (col < nx - 1)).all())
        reached = [taken << shift]
        for dy, dx in NEIGHBOURS:
            if interior:  # the usual case: no neighbour off the image
                cand = edge + (dy * nx + dx)
                source = np.flatnonzero(free(cand))
                cand = cand[source]
            else:
                source = np.flatnonzero((row + dy >= 0) & (row + dy < ny) & (col + dx >= 0) & (col + dx < nx))
                cand = edge[source] + (dy * nx + dx)
                ok = free(cand)
                source, cand = source[ok], cand[ok]
            reached.append((cand << shift) | (source + 1))
        packed = np.sort(np.concatenate(reached))
        source = packed & ((1 << shift) - 1)
        pixel = packed >> shift
        new = np.r_[True, pixel[1:] != pixel[:-1]] & (source > 0)
        if not new.any():
            break
        edge, edge_island = pixel[new], edge_island[source[new] - 1]
        taken = np.concatenate([taken, edge])
        grown.append(edge)
        grown_island.append(edge_island)
    flat, island = np.concatenate(grown), np.concatenate(grown_island)
    order = stable_order(island)
    return Islands(flat[order], island[order], _segment_starts(island[order], islands.n), islands.peak_flat,
                   islands.peak_snr)
