"""Multi-threshold deblending of islands (SExtractor-style), all islands at once."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from trap_dask.extraction.geometry import HALF_FWHM_PER_SIGMA
from trap_dask.extraction.islands import EIGHT_CONNECTED, SNR, Islands

#: A branch counts as a separate source when it holds at least this fraction of its island's flux.
MIN_CONTRAST = 0.005


def deblend(
    islands: Islands,
    snr: SNR,
    residual: np.ndarray,
    analysis: float,
    nthresh: int,
    min_contrast: float = MIN_CONTRAST,
    detection: float = 0.0,
) -> np.ndarray:
    """Split blended islands; return the component label (> 0; 0 = none) of every pixel of ``islands.flat``.

    Each island is re-thresholded at ``nthresh`` S/N levels spaced exponentially between
    ``analysis`` and its peak. Going up the levels, a component splits when two or more of its
    sub-islands each carry at least ``min_contrast`` of the island's flux and peak at or above
    ``detection`` (S/N), so that a noise bump on a bright source's wing never becomes a source of
    its own; the split branches are followed further up. Pixels of a split component outside all
    of its branches are finally given to the adjacent branch by conditional dilation.
    """
    # Only an island with two local maxima at or above ``detection`` can split: the brightest
    # pixel of every significant branch is one.
    multi = _peaks_at_or_above(islands, snr, detection) >= 2
    component = np.empty(len(islands.flat), dtype=np.int32)
    single = ~multi[islands.island]
    component[single] = 1 + islands.island[single]
    if multi.any():
        parts = _split(islands.select(multi), snr, residual, analysis, nthresh, min_contrast, detection)
        component[~single] = np.where(parts > 0, parts + islands.n, 0)
    return component


def _peaks_at_or_above(islands: Islands, snr: SNR, level: float) -> np.ndarray:
    """Number of pixels of each island at or above ``level`` (S/N) and >= all their 8 neighbours."""
    ny, nx = snr.shape
    pix_snr = snr.take(islands.flat)
    bright = np.flatnonzero(pix_snr >= level)
    flat, pix_snr = islands.flat[bright], pix_snr[bright]
    row = flat // nx
    col = flat - row * nx
    interior = bool(((row > 0) & (row < ny - 1) & (col > 0) & (col < nx - 1)).all())
    peak = np.ones(len(bright), dtype=bool)
    for dy, dx in zip(*np.nonzero(EIGHT_CONNECTED)):
        if dy == dx == 1:
            continue
        neighbour = flat + (dy - 1) * nx + (dx - 1)
        if interior:
            peak &= ~(snr.take(neighbour) > pix_snr)
        else:
            r, c = row + dy - 1, col + dx - 1
            inside = (r >= 0) & (r < ny) & (c >= 0) & (c < nx)
            peak &= ~((snr.take(np.clip(neighbour, 0, snr.size - 1)) > pix_snr) & inside)
    return np.bincount(islands.island[bright[peak]], minlength=islands.n)


def _split(
    islands: Islands,
    snr: SNR,
    residual: np.ndarray,
    analysis: float,
    nthresh: int,
    min_contrast: float,
    detection: float,
) -> np.ndarray:
    """The multi-threshold splitting of :func:`deblend` (component label > 0, 0 = none, per pixel)."""
    local, box = _mosaic(islands, snr.shape[1])
    pix_snr = snr.take(islands.flat)
    pix_flux = residual.ravel()[islands.flat].astype(float)
    island_flux = np.bincount(islands.island, weights=pix_flux, minlength=islands.n)

    comp = islands.island.copy()  # component of every pixel
    root = np.arange(islands.n)  # island of every component
    split = np.zeros(islands.n, dtype=bool)
    log_ratio = np.log(np.maximum(islands.peak_snr / analysis, 1.0))
    above = np.arange(len(islands.flat))  # the levels rise: each level's pixels are the last's subset
    for k in range(1, nthresh + 1):
        level = analysis * np.exp(log_ratio * k / (nthresh + 1))
        above = above[pix_snr[above] > level[islands.island[above]]]
        if len(above) == 0:
            break
        cells = local[above]
        mask = np.zeros(box[0] * box[1], dtype=bool)
        mask[cells] = True
        sub, nsub = ndimage.label(mask.reshape(box), structure=EIGHT_CONNECTED)
        sid = sub.ravel()[cells] - 1
        parent = np.empty(nsub, dtype=np.int64)
        parent[sid] = comp[above]
        sub_flux = np.bincount(sid, weights=pix_flux[above], minlength=nsub)
        n_detectable = np.bincount(sid[pix_snr[above] >= detection], minlength=nsub)
        significant = (sub_flux >= min_contrast * island_flux[root[parent]]) & (n_detectable > 0)
        splits = np.bincount(parent[significant], minlength=len(root)) >= 2
        new_subs = np.flatnonzero(significant & splits[parent])
        if len(new_subs) == 0:
            continue
        sub_to_comp = np.full(nsub, -1)
        sub_to_comp[new_subs] = len(root) + np.arange(len(new_subs))
        split |= splits
        root = np.append(root, root[parent[new_subs]])
        split = np.append(split, np.zeros(len(new_subs), dtype=bool))
        target = sub_to_comp[sid]
        comp[above[target >= 0]] = target[target >= 0]

    leaf_id = np.cumsum(~split) * ~split  # 1.. for leaves, 0 for split components
    grid = np.zeros(box, dtype=np.int32)
    grid.flat[local] = leaf_id[comp]
    todo = np.flatnonzero(leaf_id[comp] == 0)
    while len(todo):
        grown = ndimage.grey_dilation(grid, size=(3, 3)).flat[local[todo]]
        if not grown.any():
            break
        grid.flat[local[todo]] = grown
        todo = todo[grown == 0]
    return grid.flat[local]


def rejoined(parent: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """The source of each deblended component: the lowest index of the components it is joined to.

    Components of one island (``parent``, (n,)) whose fitted Gaussians (``fit`` (n, 6): A, x0,
    y0 in pixels and a, b, c, the inverse covariance in pixel**-2) each hold the other's centre
    within their half-maximum contour may be one source cut in two, as a resolved source's flat
    top is cut along a dip of the noise: each part's fit then reaches over the whole source. Two
    point sources that the deblending separates lie 0.85 beam or more apart, outside both
    contours, and stay apart. (The extractor keeps a join only where one Gaussian fits it.)
    """
    n = len(parent)
    order = np.argsort(parent, kind="stable")
    _, start, size = np.unique(parent[order], return_index=True, return_counts=True)
    if not (size >= 2).any():
        return np.arange(n)
    # every ordered pair (first, second) of components of one island
    position = np.flatnonzero(np.repeat(size, size) >= 2)  # in sorted order, of islands with several
    group_start, group_size = np.repeat(start, size)[position], np.repeat(size, size)[position]
    first = np.repeat(order[position], group_size)
    offset = np.arange(group_size.sum()) - np.repeat(np.cumsum(group_size) - group_size, group_size)
    second = order[np.repeat(group_start, group_size) + offset]
    dx, dy = (fit[second, 1:3] - fit[first, 1:3]).T
    a, b, c = fit[first, 3:6].T
    with np.errstate(invalid="ignore"):  # NaN where a fit failed: never joined
        reach = a * dx * dx + 2.0 * b * dx * dy + c * dy * dy  # squared, in sigma of the first
    within = (first != second) & (reach < HALF_FWHM_PER_SIGMA ** 2)
    mutual = coo_matrix((within.astype(np.int8), (first, second)), shape=(n, n)).tocsr()
    mutual = mutual.multiply(mutual.T)  # each centre within the other's contour
    _, label = connected_components(mutual, directed=False)
    lowest = np.full(label.max() + 1, n)
    np.minimum.at(lowest, label, np.arange(n))
    return lowest[label]


def _mosaic(islands: Islands, nx: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Pack the islands' bounding boxes into one small image, 1 pixel apart.

    Labelling and dilating the mosaic instead of the image costs in proportion to the islands'
    area. Boxes go, tallest first, along shelves about as wide as the mosaic is tall. Returns
    each island pixel's flat index in the mosaic and the mosaic's shape.
    """
    rows, cols = np.divmod(islands.flat, nx)
    r0, c0 = np.minimum.reduceat(rows, islands.starts), np.minimum.reduceat(cols, islands.starts)
    height = np.maximum.reduceat(rows, islands.starts) - r0 + 2  # with the gap
    width = np.maximum.reduceat(cols, islands.starts) - c0 + 2
    order = np.argsort(-height, kind="stable")
    shelf_width = max(int(np.sqrt((height * width).sum())), int(width.max()))
    start = np.cumsum(width[order]) - width[order]
    shelf = np.unique(start // shelf_width, return_inverse=True)[1]
    first = np.flatnonzero(np.r_[True, shelf[1:] != shelf[:-1]])
    shelf_top = np.cumsum(height[order][first]) - height[order][first]
    x0, y0 = np.empty_like(start), np.empty_like(start)
    x0[order] = start - start[first][shelf]
    y0[order] = shelf_top[shelf]
    mosaic = (int(shelf_top[-1] + height[order][first[-1]]), int((x0 + width).max()))
    island = islands.island
    local = (rows - r0[island] + y0[island]) * mosaic[1] + (cols - c0[island] + x0[island])
    return local, mosaic
