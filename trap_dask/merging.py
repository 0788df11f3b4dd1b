"""Merging two light curves of one sky source.

A sky source can get a second src_id: a detection pushed out of reach by its position error, or
a blend split in two, starts a new source next to the known one. When the catalogue positions
of two sources converge closer than fits can tell apart, and an image shows one source there,
the younger light curve is merged into the older. These are the pure parts: which catalogue
sources converge, and how the two histories become one light curve. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from trap_dask.association import chord, sky_tree


def converged_pairs(ra: np.ndarray, dec: np.ndarray, src_id: np.ndarray, seen: np.ndarray, radius: float,
                    tree: cKDTree | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keep, drop, separation) of the catalogue sources to merge in this image.

    ``ra``, ``dec`` (deg): candidate catalogue positions; ``seen``: continued by a detection in
    this image; ``radius`` (deg). Two sources closer than ``radius`` of which this image detects
    exactly one (it shows one source where the catalogue has two) merge: the younger (larger
    src_id) into the older. Closest pairs first, each source in one merge at most. ``tree``: the
    positions' :func:`~trap_dask.association.sky_tree`, when the caller has built it. Returns
    indices into the inputs and the separations (deg).
    """
    none = np.zeros(0, np.intp)
    if len(ra) < 2 or radius <= 0:
        return none, none, np.zeros(0)
    tree = sky_tree(ra, dec) if tree is None else tree
    xyz = tree.data
    pairs = tree.query_pairs(chord(radius), output_type="ndarray")
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # equal separations: by index, whatever the tree holds
    i, j = pairs[:, 0], pairs[:, 1]
    one_seen = seen[i] != seen[j]
    i, j = i[one_seen], j[one_seen]
    apart = np.rad2deg(2.0 * np.arcsin(np.linalg.norm(xyz[i] - xyz[j], axis=1) / 2.0))
    used: set[int] = set()
    keep, drop, sep = [], [], []
    for k in np.argsort(apart, kind="stable").tolist():
        a, b = int(i[k]), int(j[k])
        if a in used or b in used:
            continue
        used.update((a, b))
        older, younger = (a, b) if src_id[a] < src_id[b] else (b, a)
        keep.append(older)
        drop.append(younger)
        sep.append(apart[k])
    return np.array(keep, np.intp), np.array(drop, np.intp), np.array(sep)


@dataclass(frozen=True)
class MergedHistory:
    """Two histories as one light curve.

    ``rows``: the measurements that form it, in processing order (image, then id), all to carry
    the kept src_id; ``parent``: each one's new parent (-1 for the first); ``set_aside``: ids of
    the measurements left out because the other source had one in the same image (they stay
    under the retired src_id).
    """

    rows: np.ndarray
    parent: np.ndarray
    set_aside: np.ndarray

    def relabelled(self, keep_src: int, drop_src: int) -> dict[str, np.ndarray]:
        """id, src_id and parent of the measurements the merge changes: those of the light curve
        whose src_id or parent is new, and those set aside (under ``drop_src``, parent -1)."""
        changed = (self.rows["src_id"] != keep_src) | (self.rows["parent"] != self.parent)
        aside = len(self.set_aside)
        return {"id": np.concatenate([self.rows["id"][changed], self.set_aside]).astype("i8"),
                "src_id": np.concatenate([np.full(changed.sum(), keep_src), np.full(aside, drop_src)]).astype("i8"),
                "parent": np.concatenate([self.parent[changed], np.full(aside, -1)]).astype("i8")}


def merge_histories(history: np.ndarray, keep_src: int, drop_src: int) -> MergedHistory:
    """One measurement per image out of the two sources' ``history`` (HISTORY_DTYPE rows).

    Where both have one, a detection beats a forced fit, and otherwise the older source's
    (``keep_src``) measurement stays.
    """
    both = history[np.isin(history["src_id"], (keep_src, drop_src))]
    # preference within an image: detection first, then the kept source's row
    rank = both["is_force_fit"].astype(int) * 2 + (both["src_id"] != keep_src)
    order = np.lexsort((rank, both["im_id"]))
    both = both[order]
    first = np.ones(len(both), bool)
    first[1:] = both["im_id"][1:] != both["im_id"][:-1]
    kept = both[first]
    kept = kept[np.lexsort((kept["id"], kept["im_id"]))]
    parent = np.concatenate([[-1], kept["id"][:-1]]) if len(kept) else np.zeros(0, "i8")
    return MergedHistory(rows=kept, parent=parent.astype("i8"), set_aside=np.sort(both["id"][~first]))
