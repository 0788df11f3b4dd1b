"""Multi-threshold deblending of islands (SExtractor-style), all islands at once."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from trap_dask.extraction.islands import EIGHT_CONNECTED, Islands

#: A branch counts as a separate source when it holds at least this fraction of its island's flux.
MIN_CONTRAST = 0.005


def deblend(
    shape: tuple[int, int],
    islands: Islands,
    snr: np.ndarray,
    residual: np.ndarray,
    analysis: float,
    nthresh: int,
    min_contrast: float = MIN_CONTRAST,
    detection: float = 0.0,
) -> np.ndarray:
    """Split blended islands; return a label image (0 = background) with one label per component.

    Each island is re-thresholded at ``nthresh`` S/N levels spaced exponentially between
    ``analysis`` and its peak. Going up the levels, a component splits when two or more of its
    sub-islands each carry at least ``min_contrast`` of the island's flux and peak at or above
    ``detection`` (S/N), so that a noise bump on a bright source's wing never becomes a source of
    its own; the split branches are followed further up. Pixels of a split component outside all of its branches are finally
    given to the adjacent branch by conditional dilation.
    """
    ny, nx = shape
    label_out = np.zeros(shape, dtype=np.int32)
    if islands.n == 0:
        return label_out
    rows, cols = np.divmod(islands.flat, nx)
    r0, c0 = rows.min(), cols.min()
    box = (rows.max() - r0 + 1, cols.max() - c0 + 1)
    local = (rows - r0) * box[1] + (cols - c0)
    pix_snr = snr.ravel()[islands.flat]
    pix_flux = residual.ravel()[islands.flat].astype(float)
    island_flux = np.bincount(islands.island, weights=pix_flux, minlength=islands.n)

    comp = islands.island.copy()  # component of every pixel
    root = np.arange(islands.n)  # island of every component
    split = np.zeros(islands.n, dtype=bool)
    log_ratio = np.log(np.maximum(islands.peak_snr / analysis, 1.0))
    for k in range(1, nthresh + 1):
        level = analysis * np.exp(log_ratio * k / (nthresh + 1))
        above = np.flatnonzero(pix_snr > level[islands.island])
        if len(above) == 0:
            break
        mask = np.zeros(box, dtype=bool)
        mask.flat[local[above]] = True
        sub, nsub = ndimage.label(mask, structure=EIGHT_CONNECTED)
        sid = sub.flat[local[above]] - 1
        parent = np.empty(nsub, dtype=np.int64)
        parent[sid] = comp[above]
        sub_flux = np.bincount(sid, weights=pix_flux[above], minlength=nsub)
        sub_peak = np.full(nsub, -np.inf)
        np.maximum.at(sub_peak, sid, pix_snr[above])
        significant = (sub_flux >= min_contrast * island_flux[root[parent]]) & (sub_peak >= detection)
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
    label_out[r0 : r0 + box[0], c0 : c0 + box[1]] = grid
    return label_out
