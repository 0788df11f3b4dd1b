"""Source association: link this image's detections to the running catalogue.

A detection may continue a known source when their de Ruiter radius (the positional offset in
units of the combined 1-sigma uncertainties) is below ``r_max``. Candidate pairs come from a
KD-tree on unit vectors, so the search is O((n + m) log n) and indifferent to RA wrap-around
and the poles. Competing candidates are resolved pair by pair, smallest radius first
(TraP's greedy matching), or optionally by the assignment that links the most pairs with the
smallest sum of squared radii; either way no detection and no catalogue source is used twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from trap_dask.sky import wrap_ra_difference

#: TraP's default maximum de Ruiter radius for an association (dimensionless).
DE_RUITER_R_MAX = 5.68


def de_ruiter_radius(
    ra1: ArrayLike,
    dec1: ArrayLike,
    unc_ew1: ArrayLike,
    unc_ns1: ArrayLike,
    ra2: ArrayLike,
    dec2: ArrayLike,
    unc_ew2: ArrayLike,
    unc_ns2: ArrayLike,
) -> np.ndarray:
    """De Ruiter radius between two sets of positions, elementwise with broadcasting.

    Parameters
    ----------
    ra1, dec1, ra2, dec2 : positions in deg.
    unc_ew1, unc_ns1, unc_ew2, unc_ns2 : positive 1-sigma on-sky uncertainties in deg
        (``uncertainty_ew``/``uncertainty_ns`` of the source table).

    Returns
    -------
    Dimensionless radius ``sqrt(dra^2 cos^2(mean dec) / (s_ew1^2 + s_ew2^2)
    + ddec^2 / (s_ns1^2 + s_ns2^2))``, with the RA difference wrapped to [-180, 180).
    """
    dra = wrap_ra_difference(np.subtract(ra1, ra2))
    ddec = np.subtract(dec1, dec2)
    cos_dec = np.cos(np.deg2rad(0.5 * np.add(dec1, dec2)))
    ew2 = np.square(unc_ew1) + np.square(unc_ew2)
    ns2 = np.square(unc_ns1) + np.square(unc_ns2)
    return np.sqrt((dra * cos_dec) ** 2 / ew2 + ddec**2 / ns2)


@dataclass(frozen=True)
class Association:
    """The links found between one image's detections and the running catalogue.

    Attributes
    ----------
    source : int, per detection: catalogue index of the source it continues, -1 when it starts
        a new source.
    distance : float, per detection: de Ruiter radius to ``source`` or, for a duplicate, to
        ``parent_source``; NaN for a new source without candidates (within its reach).
    parent_source : int, per detection: for a duplicate, the catalogue index whose latest
        measurement becomes its parent; -1 otherwise.
    is_duplicate : bool, per detection: a new source split off a known one that another
        detection continues (one-to-many) or that was taken by a closer pair.
    matched : bool, per catalogue source: a detection continues it in this image. The rest
        are null detections (to be force-fitted where the image covers them).
    """

    source: np.ndarray
    distance: np.ndarray
    parent_source: np.ndarray
    is_duplicate: np.ndarray
    matched: np.ndarray


def unit_vectors(ra: ArrayLike, dec: ArrayLike) -> np.ndarray:
    """Cartesian unit vectors, shape (n, 3), of positions in deg."""
    ra_rad = np.deg2rad(np.asarray(ra, dtype=float))
    dec_rad = np.deg2rad(np.asarray(dec, dtype=float))
    cos_dec = np.cos(dec_rad)
    return np.column_stack((cos_dec * np.cos(ra_rad), cos_dec * np.sin(ra_rad), np.sin(dec_rad)))


def chord(angle: ArrayLike) -> np.ndarray:
    """Straight-line distance between two unit vectors ``angle`` deg apart (for KD-tree radii)."""
    return 2.0 * np.sin(np.deg2rad(angle) / 2.0)


def angle_of_chord(length: ArrayLike) -> np.ndarray:
    """The angle (deg) between two unit vectors a straight line of ``length`` apart: the inverse of
    :func:`chord` (KD-tree distances; inf stays inf)."""
    return np.rad2deg(2.0 * np.arcsin(np.minimum(length, 2.0) / 2.0))


def _per_detection(value: ArrayLike, n_det: int) -> np.ndarray:
    """``value`` (one for all, or one per detection) as one per detection."""
    return np.broadcast_to(np.asarray(value, float), (n_det,))


def _search_radius(cat_unc_ew: np.ndarray, cat_unc_ns: np.ndarray, det_unc_ew: np.ndarray, det_unc_ns: np.ndarray,
                   r_max: float) -> float:
    """Chord within which every pair with a de Ruiter radius below ``r_max`` lies (uncertainties in deg).

    A strict upper bound: the chord between two unit vectors, 2 sin(theta/2), never exceeds the
    flat-sky offset sqrt(dra^2 cos^2(mean dec) + ddec^2) (in rad, RA difference wrapped), which is
    below r_max times the largest combined uncertainty whenever r < r_max.
    """
    unc_cat = np.max(np.maximum(cat_unc_ew, cat_unc_ns))
    unc_det = np.max(np.maximum(det_unc_ew, det_unc_ns))
    return float(np.deg2rad(r_max * np.hypot(unc_cat, unc_det)) * (1.0 + 1e-9))


def sky_tree(ra: ArrayLike, dec: ArrayLike) -> cKDTree:
    """KD-tree of the unit vectors of positions in deg (searched with chords, see :func:`chord`)."""
    return cKDTree(unit_vectors(ra, dec))


def _neighbours(cat_tree: cKDTree, det_ra: np.ndarray, det_dec: np.ndarray,
                radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(catalogue index, detection index, chord) of every pair within ``radius`` (chord); positions in deg."""
    near = cat_tree.sparse_distance_matrix(sky_tree(det_ra, det_dec), radius, output_type="ndarray")
    return near["i"].astype(np.intp), near["j"].astype(np.intp), near["v"]


def _candidate_pairs(cat: list[np.ndarray], det: list[np.ndarray], ci: np.ndarray, dj: np.ndarray,
                     apart: np.ndarray, r_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Of the pairs (``ci``, ``dj``) within the search radius, ``apart`` (chord), (catalogue index,
    detection index, radius, chord) of those with a de Ruiter radius below r_max; ``cat`` and
    ``det`` are (ra, dec, uncertainty_ew, uncertainty_ns) in deg."""
    r = de_ruiter_radius(*(c[ci] for c in cat), *(d[dj] for d in det))
    keep = r < r_max
    return ci[keep], dj[keep], r[keep], apart[keep]


def _greedy_matching(ci: np.ndarray, dj: np.ndarray, n_cat: int, n_det: int) -> np.ndarray:
    """Boolean mask of the pairs (sorted by increasing radius) that greedy matching takes.

    Pairs whose catalogue source and detection have no other candidate are taken at once;
    the contested rest are visited in order, skipping any whose source or detection is used.
    """
    take = (np.bincount(ci, minlength=n_cat)[ci] == 1) & (np.bincount(dj, minlength=n_det)[dj] == 1)
    contested = np.flatnonzero(~take)
    used_cat: set[int] = set()
    used_det: set[int] = set()
    for k, i, j in zip(contested.tolist(), ci[contested].tolist(), dj[contested].tolist()):
        if i not in used_cat and j not in used_det:
            used_cat.add(i)
            used_det.add(j)
            take[k] = True
    return take


def _optimal_matching(ci: np.ndarray, dj: np.ndarray, r: np.ndarray, n_cat: int, n_det: int,
                      near: np.ndarray | None = None, r_max: float = DE_RUITER_R_MAX) -> np.ndarray:
    """Boolean mask of the pairs of the best assignment within each group of competing pairs.

    Groups are the connected components of the candidate graph. In each, the assignment links
    as many pairs as possible and, among those, has the smallest sum of r**2 (the most likely
    under Gaussian position errors): a close pair of sources that shifted together between
    images keeps its two light curves, where greedy matching may give one source's detection
    to the other and start a new source. With ``near`` (per pair), only near pairs count as links
    to have the most of; a far pair is taken where it displaces no near one and lowers the sum of
    r**2 - r_max**2 (each far link worth r_max**2 - r**2, whatever else its group holds):
    over-set position errors, which make sources beams apart candidates, then cannot pass light
    curves along a chain of sources to give a new detection a link.
    """
    from scipy.optimize import linear_sum_assignment  # here, not at import: scipy.optimize is slow to import

    take = (np.bincount(ci, minlength=n_cat)[ci] == 1) & (np.bincount(dj, minlength=n_det)[dj] == 1)
    contested = np.flatnonzero(~take)
    if contested.size == 0:
        return take
    graph = coo_matrix((np.ones(contested.size), (ci[contested], n_cat + dj[contested])),
                       shape=(n_cat + n_det,) * 2)
    _, component = connected_components(graph, directed=False)
    group = component[ci[contested]]
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    for members in np.split(contested[order], bounds):
        rows, row_of = np.unique(ci[members], return_inverse=True)
        cols, col_of = np.unique(dj[members], return_inverse=True)
        # a (near) link always outweighs any difference in the sum of r**2 over the group
        largest = float(max(np.max(r[members]) ** 2, r_max**2) + 1.0)
        bonus = (min(rows.size, cols.size) + 1) * largest
        cost = np.zeros((rows.size, cols.size))
        cost[row_of, col_of] = r[members] ** 2 - (bonus if near is None else np.where(near[members], bonus, r_max**2))
        best = np.zeros_like(cost, dtype=bool)
        best[linear_sum_assignment(cost)] = True
        take[members] = best[row_of, col_of]
    return take


def associate(
    cat_ra: ArrayLike,
    cat_dec: ArrayLike,
    cat_unc_ew: ArrayLike,
    cat_unc_ns: ArrayLike,
    det_ra: ArrayLike,
    det_dec: ArrayLike,
    det_unc_ew: ArrayLike,
    det_unc_ns: ArrayLike,
    r_max: float = DE_RUITER_R_MAX,
    optimal: bool = False,
    link_radius: float = 0.0,
    blend_radius: float = 0.0,
    duplicate_reach: ArrayLike | None = None,
    near_reach: ArrayLike | None = None,
    cat_tree: cKDTree | None = None,
) -> Association:
    """Associate detections with catalogue sources by de Ruiter radius.

    Parameters
    ----------
    cat_ra, cat_dec, cat_unc_ew, cat_unc_ns : catalogue positions and positive on-sky 1-sigma
        uncertainties, all in deg (n values each).
    det_ra, det_dec, det_unc_ew, det_unc_ns : the same for this image's detections (m values).
    r_max : a pair is a candidate when its de Ruiter radius is strictly below this.
    optimal : resolve competing candidates by the assignment with the most links and the
        smallest sum of squared radii instead of greedily (see :func:`_optimal_matching`).
    link_radius : deg; a catalogue source left without a link and a detection left without one
        that are each other's only neighbour within this distance are linked whatever their
        de Ruiter radius (see :func:`_obvious_links`); 0 (TraP 1.x): the radius alone decides.
    blend_radius : deg; a detection left without a link that has two or more catalogue sources
        left without one within this distance continues the nearest (see :func:`_blend_links`);
        0 (TraP 1.x): it starts a new source.
    duplicate_reach : deg, per detection (or one for all); a detection left without a link is a
        duplicate of its nearest candidate only within this distance of it, else it starts a
        source of its own (a candidate many beams off, within reach of over-set position errors
        only, is another source); None (TraP 1.x): anywhere within the de Ruiter radius.
    near_reach : deg, per detection (or one for all); the optimal matching has the most links
        among the pairs this close (see :func:`_optimal_matching`): where the user's position
        errors are larger than the data's, the distance within which the data's would make a
        candidate; None: every candidate counts alike.
    cat_tree : the catalogue positions' :func:`sky_tree`, when the caller has built it already.

    Returns
    -------
    Association
        One-to-one candidates link directly. Otherwise pairs are taken smallest radius first
        (ties by catalogue index, then detection index) while both ends are free: of several
        detections near one source the nearest continues it and the others become duplicate
        new sources with that source as parent; of several sources near one detection the
        nearest is continued and the others stay unmatched. A detection left without a link
        but with candidates is a duplicate of its nearest candidate.
    """
    cat = [np.atleast_1d(np.asarray(a, float)) for a in (cat_ra, cat_dec, cat_unc_ew, cat_unc_ns)]
    det = [np.atleast_1d(np.asarray(a, float)) for a in (det_ra, det_dec, det_unc_ew, det_unc_ns)]
    n_cat, n_det = cat[0].size, det[0].size

    source = np.full(n_det, -1, dtype=np.intp)
    distance = np.full(n_det, np.nan)
    parent = np.full(n_det, -1, dtype=np.intp)
    matched = np.zeros(n_cat, dtype=bool)
    if n_cat == 0 or n_det == 0:
        return Association(source, distance, parent, np.zeros(n_det, dtype=bool), matched)

    # one neighbour search for the candidates and the obvious links
    search = _search_radius(cat[2], cat[3], det[2], det[3], r_max)
    link = float(chord(link_radius)) if link_radius > 0 else 0.0
    cat_tree = sky_tree(cat[0], cat[1]) if cat_tree is None else cat_tree
    near_i, near_j, apart = _neighbours(cat_tree, det[0], det[1], max(search, link))
    within = apart <= search
    ci, dj, r, pair_chord = _candidate_pairs(cat, det, near_i[within], near_j[within], apart[within], r_max)
    order = np.lexsort((dj, ci, r))
    ci, dj, r, pair_chord = ci[order], dj[order], r[order], pair_chord[order]

    # Each detection's best candidate: its first pair in sorted order.
    has_candidate, best = np.unique(dj, return_index=True)
    parent[has_candidate] = ci[best]
    distance[has_candidate] = r[best]
    parent_chord = np.full(n_det, np.inf)
    parent_chord[has_candidate] = pair_chord[best]

    if optimal:
        near = None if near_reach is None else pair_chord <= chord(_per_detection(near_reach, n_det)[dj])
        chosen = _optimal_matching(ci, dj, r, n_cat, n_det, near, r_max)
    else:
        chosen = _greedy_matching(ci, dj, n_cat, n_det)
    source[dj[chosen]] = ci[chosen]
    distance[dj[chosen]] = r[chosen]
    matched[ci[chosen]] = True
    if link_radius > 0:
        within = apart <= link
        oi, oj = _obvious_links(near_i[within], near_j[within], ~matched, source < 0)
        source[oj], matched[oi] = oi, True
        distance[oj] = de_ruiter_radius(*(c[oi] for c in cat), *(d[oj] for d in det))
    if blend_radius > 0:
        bi, bj = _blend_links(cat[0], cat[1], det[0], det[1], ~matched, source < 0, blend_radius)
        source[bj], matched[bi] = bi, True
        distance[bj] = de_ruiter_radius(*(c[bi] for c in cat), *(d[bj] for d in det))

    linked = source >= 0
    parent[linked] = -1
    if duplicate_reach is not None:  # (an unlinked detection's parent is its best candidate: parent_chord)
        beyond = (parent >= 0) & (parent_chord > chord(_per_detection(duplicate_reach, n_det)))
        parent[beyond], distance[beyond] = -1, np.nan
    return Association(source, distance, parent, parent >= 0, matched)


def _obvious_links(ci: np.ndarray, dj: np.ndarray, cat_free: np.ndarray,
                   det_free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(catalogue index, detection index) of free pairs that are each other's only neighbour.

    ``ci``, ``dj``: every pair within the link radius. A pair qualifies when the detection is the
    only one within the radius of the catalogue source and the source the only one within the
    radius of the detection (linked or not), and neither end is linked yet: such a link is beyond
    doubt even when mis-set position errors put it outside the de Ruiter radius.
    """
    alone = (np.bincount(ci, minlength=len(cat_free))[ci] == 1) & (np.bincount(dj, minlength=len(det_free))[dj] == 1)
    take = alone & cat_free[ci] & det_free[dj]
    return ci[take], dj[take]


def _blend_links(cat_ra: np.ndarray, cat_dec: np.ndarray, det_ra: np.ndarray, det_dec: np.ndarray,
                 cat_free: np.ndarray, det_free: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(catalogue index, detection index): free detections that are blends of free known sources.

    Positions and ``radius`` in deg. Two known sources that drift into one island are detected as
    one source between them, often too far from either for the de Ruiter radius. A free
    detection with at least two free catalogue sources within ``radius`` continues the nearest
    (the pair fit then measures the other, see :func:`blended_null_detections`), each catalogue
    source taken by its nearest such detection only.
    """
    free_cat, free_det = np.flatnonzero(cat_free), np.flatnonzero(det_free)
    none = np.zeros(0, np.intp)
    if len(free_cat) < 2 or not len(free_det):
        return none, none
    dist, near = sky_tree(cat_ra[free_cat], cat_dec[free_cat]).query(
        unit_vectors(det_ra[free_det], det_dec[free_det]), k=2, distance_upper_bound=chord(radius))
    blend = np.flatnonzero(np.isfinite(dist[:, 1]))
    order = blend[np.argsort(dist[blend, 0], kind="stable")]
    first = np.unique(near[order, 0], return_index=True)[1]
    take = np.sort(order[first])
    return free_cat[near[take, 0]].astype(np.intp), free_det[take].astype(np.intp)


def blended_null_detections(
    det_ra: ArrayLike,
    det_dec: ArrayLike,
    null_ra: ArrayLike,
    null_dec: ArrayLike,
    radius: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair null detections with the detection that may hold their light.

    A known source that no detection continues (a null detection) but that lies within
    ``radius`` (deg) of a detection may have been swallowed by it (closer than about a beam, two
    sources make one island) or may sit on its wing. Each null detection is paired with its nearest detection
    within ``radius``, each detection with at most one null detection (its nearest).

    Returns (null index, detection index) of the pairs, ordered by null index.
    """
    det = unit_vectors(det_ra, det_dec).reshape(-1, 3)
    null = unit_vectors(null_ra, null_dec).reshape(-1, 3)
    if len(det) == 0 or len(null) == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    dist, nearest = cKDTree(det).query(null, distance_upper_bound=chord(radius))
    ni = np.flatnonzero(np.isfinite(dist))
    dj, dist = nearest[ni], dist[ni]
    order = np.lexsort((ni, dist))
    first = np.unique(dj[order], return_index=True)[1]
    keep = np.sort(order[first])
    return ni[keep].astype(np.intp), dj[keep].astype(np.intp)
