"""Astrometric scatter of an image, measured from its confident associations.

Bright detections of isolated known sources, each the other's only neighbour within a beam, show
how far this image's positions sit from the running catalogue: their median offset (a coherent
shift of the whole image) and their robust scatter per axis (what ``ew_sys_err``/``ns_sys_err``
should be). A shift of more than a beam leaves few such pairs within a beam of each other: then
the shift is first found as the densest cluster of the offsets of all pairs within
``MAX_SHIFT`` beams, and the pairs are matched around it; a shift of a quarter beam or more,
whose far side the match radius cut off, is matched around too. :class:`ScatterHistory` keeps the
running estimate over the images so far, from which ``ew_sys_err = "auto"`` takes the systematic
error of the next image. Pure functions, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from trap_dask.association import chord, sky_tree, unit_vectors
from trap_dask.messages import MIN_MATCHES, Astrometry
from trap_dask.sky import from_local, north_turn, unshifted, within_reach, wrap_ra_difference

#: A confident match: detection and known source within this distance (beam FWHM) ...
MATCH_RADIUS = 1.0
#: ... neither with another known source or detection within this distance (beam FWHM) ...
ISOLATION_RADIUS = 3.0
#: ... and a detection at least this significant (peak / local rms).
MIN_SIGNIFICANCE = 10.0
#: Largest coherent shift of an image from the catalogue that is searched for (beam FWHM). Beyond
#: ISOLATION_RADIUS a detection has several isolated catalogue sources in reach: only a shift
#: gathers the offsets of one of each into one cluster.
MAX_SHIFT = 5.0
#: The shift is searched for when fewer than this fraction of the bright, isolated detections
#: have a confident match without it, unless those matches pass the search's own test of a shift
#: at zero offset (a cluster of CLUSTER_LEAST of the detections within CLUSTER_RADIUS): in a
#: catalogue crowded with sources this image does not see, few known sources are isolated, and
#: that is no sign of a shift.
SEARCH_BELOW = 0.5
#: The matches are made again around their median offset when it is more than this (beam FWHM):
#: the match radius cut off the far side of the offsets.
RECENTRE_ABOVE = 0.25
#: Radius of the cluster of pair offsets that locates a shift (beam FWHM) ...
CLUSTER_RADIUS = 0.5
#: ... and the least fraction of the detections searched with that it holds: unrelated pairs
#: spread over the search circle (~3% of them in a cluster's area), a shift's gather in one.
CLUSTER_LEAST = 0.25
#: How far beyond an image's detections (beam FWHM) the astrometry looks at known sources: a shift
#: (the median of its cluster lies up to sqrt(2) cluster radii past MAX_SHIFT), a match, and the
#: isolation of the matched source.
REACH = MAX_SHIFT + 2.0 * CLUSTER_RADIUS + MATCH_RADIUS + ISOLATION_RADIUS
#: Robust standard deviation of a normal distribution per median absolute deviation.
MAD_TO_SIGMA = 1.482602218505602
#: Floor of the automatic systematic error (beam FWHM): no image is trusted to better than this.
AUTO_FLOOR = 0.02
#: The automatic systematic error (beam FWHM) while nothing has been measured (too few matches).
AUTO_UNMEASURED = 0.1


def _isolated(tree: cKDTree, points: np.ndarray, radius: float) -> np.ndarray:
    """Per point of ``points`` (unit vectors, each one of the tree's): no other of the tree's within
    ``radius`` (chord)."""
    if tree.n < 2:
        return np.ones(len(points), bool)
    return np.isinf(tree.query(points, k=2, distance_upper_bound=radius)[0][:, 1])


def confident_matches(cat_ra: np.ndarray, cat_dec: np.ndarray, det_ra: np.ndarray, det_dec: np.ndarray,
                      det_significance: np.ndarray, beam_fwhm: float, centre: tuple[float, float],
                      cat_tree: cKDTree | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(catalogue index, detection index) of the confident one-to-one matches.

    Positions in deg, ``beam_fwhm`` in deg. Both ends isolated (nothing else within
    ``ISOLATION_RADIUS`` beams on its own side), within ``MATCH_RADIUS`` beams of each other once
    the image's coherent shift is taken out (:func:`coherent_shift` when few match without it, see
    SEARCH_BELOW; their median offset when that is over ``RECENTRE_ABOVE`` beams), the detection
    at least ``MIN_SIGNIFICANCE``. A match chosen this way does not depend on
    the systematic error, so it can measure it. Offsets and shifts are east and north at ``centre``
    (ra, dec; deg), the image's centre, turned at each source as its own east and north turn
    (:func:`~trap_dask.sky.north_turn`). ``cat_tree``: the catalogue positions'
    :func:`~trap_dask.association.sky_tree`, when the caller has built it.
    """
    none = np.zeros(0, np.intp)
    if len(cat_ra) == 0 or len(det_ra) == 0 or beam_fwhm <= 0:
        return none, none
    isolation = chord(ISOLATION_RADIUS * beam_fwhm)
    det = unit_vectors(det_ra, det_dec)
    good_det = _bright_isolated(det, det_ra, det_dec, det_significance, beam_fwhm, centre)
    if not len(good_det):
        return none, none
    cat_tree = sky_tree(cat_ra, cat_dec) if cat_tree is None else cat_tree
    ci, dj = _matches(cat_tree, det[good_det], good_det, chord(MATCH_RADIUS * beam_fwhm), isolation)
    offsets = _offsets(cat_ra[ci], cat_dec[ci], det_ra[dj], det_dec[dj], centre)
    if len(ci) >= SEARCH_BELOW * len(good_det) or _not_shifted(offsets / beam_fwhm, len(good_det)):
        # most match, or enough at no shift: around their median offset, if far off
        shift = np.median(offsets, axis=0)
        if np.hypot(*shift) <= RECENTRE_ABOVE * beam_fwhm:
            return ci, dj
    else:
        shift = coherent_shift(cat_tree, cat_ra, cat_dec, det_ra, det_dec, good_det, beam_fwhm, centre)
        if shift is None:
            return ci, dj
    moved = unit_vectors(*unshifted(det_ra[good_det], det_dec[good_det], *shift, centre))
    shifted = _matches(cat_tree, moved, good_det, chord(MATCH_RADIUS * beam_fwhm), isolation)
    return shifted if len(shifted[0]) > len(ci) else (ci, dj)


def _bright_isolated(det: np.ndarray, det_ra: np.ndarray, det_dec: np.ndarray, det_significance: np.ndarray,
                     beam_fwhm: float, centre: tuple[float, float]) -> np.ndarray:
    """Indices of the detections that may measure the astrometry: at least ``MIN_SIGNIFICANCE``,
    within reach of the image's ``centre`` and nothing else within ``ISOLATION_RADIUS`` beams
    (``det``: their unit vectors; positions and ``beam_fwhm`` in deg)."""
    bright = np.flatnonzero((det_significance >= MIN_SIGNIFICANCE) & within_reach(det_ra, det_dec, centre))
    return bright[_isolated(cKDTree(det), det[bright], chord(ISOLATION_RADIUS * beam_fwhm))]


def measurable(det_ra: np.ndarray, det_dec: np.ndarray, det_significance: np.ndarray, beam_fwhm: float,
               centre: tuple[float, float]) -> bool:
    """Whether an image's detections (deg; ``beam_fwhm`` deg) hold enough bright isolated sources
    (``MIN_MATCHES``) to measure the astrometry of the images after it."""
    if len(det_ra) < MIN_MATCHES:
        return False
    found = _bright_isolated(unit_vectors(det_ra, det_dec), det_ra, det_dec, det_significance, beam_fwhm, centre)
    return len(found) >= MIN_MATCHES


def _matches(cat_tree: cKDTree, points: np.ndarray, det_index: np.ndarray, radius: float,
             isolation: float) -> tuple[np.ndarray, np.ndarray]:
    """(catalogue index, ``det_index``) of the detections at ``points`` (unit vectors) whose
    nearest catalogue source within ``radius`` (chord) has no other within ``isolation``."""
    dist, ci = cat_tree.query(points, distance_upper_bound=radius)
    ok = np.isfinite(dist)
    ci, dj = ci[ok], det_index[ok]
    keep = _isolated(cat_tree, cat_tree.data[ci], isolation)  # only the matched catalogue sources need asking
    return ci[keep].astype(np.intp), dj[keep].astype(np.intp)


def _cluster_least(n_searched: int) -> float:
    """The pairs a cluster of offsets must hold to be taken for the shift of ``n_searched``
    detections: MIN_MATCHES, and CLUSTER_LEAST of them."""
    return max(MIN_MATCHES, CLUSTER_LEAST * n_searched)


def _not_shifted(offsets: np.ndarray, n_searched: int) -> bool:
    """Whether the confident matches' ``offsets`` (n, 2; beams) pass :func:`coherent_shift`'s test
    of a shift at zero: :func:`_cluster_least` of the ``n_searched`` detections within
    CLUSTER_RADIUS of it. Matches that were lost are then lost to known sources the image does not
    see (their neighbours took away their isolation), not to a shift."""
    least = _cluster_least(n_searched)
    return len(offsets) >= least and int(np.sum(np.hypot(*offsets.T) <= CLUSTER_RADIUS)) >= least


def coherent_shift(cat_tree: cKDTree, cat_ra: np.ndarray, cat_dec: np.ndarray, det_ra: np.ndarray,
                   det_dec: np.ndarray, det_index: np.ndarray, beam_fwhm: float,
                   centre: tuple[float, float]) -> tuple[float, float] | None:
    """The image's shift (deg, east and north at ``centre``, see :func:`_offsets`) from the catalogue
    as seen by the detections ``det_index``: the median offset of the densest cluster
    (``CLUSTER_RADIUS`` beams) of the offsets of every detection from each isolated catalogue
    source within ``MAX_SHIFT`` beams; None when that cluster holds fewer than MIN_MATCHES pairs or
    CLUSTER_LEAST of the detections.
    A coherent shift moves every pair by the same offset; the other pairs spread theirs over the
    whole search circle."""
    searched = cKDTree(unit_vectors(det_ra[det_index], det_dec[det_index]))
    near = cat_tree.sparse_distance_matrix(searched, chord(MAX_SHIFT * beam_fwhm), output_type="ndarray")
    # by detection, then by catalogue row: a tie between clusters goes to the same pair whatever
    # else the tree holds
    order = np.lexsort((near["i"], near["j"]))
    ci, dj = near["i"][order].astype(np.intp), det_index[near["j"][order]]
    sources, at = np.unique(ci, return_inverse=True)  # each catalogue source's isolation asked once
    keep = _isolated(cat_tree, cat_tree.data[sources], chord(ISOLATION_RADIUS * beam_fwhm))[at]
    ci, dj = ci[keep], dj[keep]
    if len(ci) < MIN_MATCHES:
        return None
    offsets = _offsets(cat_ra[ci], cat_dec[ci], det_ra[dj], det_dec[dj], centre) / beam_fwhm  # beams
    tree = cKDTree(offsets)
    counts = tree.query_ball_point(offsets, CLUSTER_RADIUS, return_length=True)
    best = int(np.argmax(counts))
    if counts[best] < _cluster_least(len(det_index)):
        return None
    members = tree.query_ball_point(offsets[best], CLUSTER_RADIUS)
    east, north = np.median(offsets[members], axis=0) * beam_fwhm
    return float(east), float(north)


def _offsets(cat_ra: np.ndarray, cat_dec: np.ndarray, det_ra: np.ndarray, det_dec: np.ndarray,
             centre: tuple[float, float]) -> np.ndarray:
    """(n, 2) offsets (deg on the sky) of detections from catalogue positions (deg), each east and
    north at its detection turned to east and north at ``centre`` (:func:`~trap_dask.sky.north_turn`):
    a shifted image moves all of them alike, also on a field around a pole, where east and north
    turn across the field."""
    east = wrap_ra_difference(det_ra - cat_ra) * np.cos(np.deg2rad(det_dec))
    return np.column_stack(from_local(east, det_dec - cat_dec, north_turn(det_ra, centre)))


def _fit_errors_at_centre(ra: np.ndarray, dec: np.ndarray, ra_err: np.ndarray, dec_err: np.ndarray,
                          centre: tuple[float, float]) -> np.ndarray:
    """(2, n) fit errors (deg) along east and north at ``centre`` of positions (deg) whose errors are
    ``ra_err`` along the RA coordinate and ``dec_err`` along Dec: the two turn as the positions'
    east and north do (:func:`~trap_dask.sky.north_turn`; much around a pole)."""
    turn = north_turn(ra, centre)
    east, north = ra_err * np.cos(np.deg2rad(dec)), dec_err
    return np.stack([np.hypot(east * np.cos(turn), north * np.sin(turn)),
                     np.hypot(east * np.sin(turn), north * np.cos(turn))])


def measure(cat_ra: np.ndarray, cat_dec: np.ndarray, cat_n: np.ndarray, det_ra: np.ndarray, det_dec: np.ndarray,
            det_significance: np.ndarray, det_ra_err: np.ndarray, det_dec_err: np.ndarray,
            beam_fwhm: float, centre: tuple[float, float], cat_tree: cKDTree | None = None) -> Astrometry:
    """Offsets and scatter of this image's detections from the catalogue (see :class:`Astrometry`).

    Positions and ``beam_fwhm`` in deg; ``cat_n`` is the number of detections behind each
    catalogue position; ``det_ra_err`` is the fit error along the RA coordinate and
    ``det_dec_err`` along Dec (deg), as in ``extracted_sources``. A catalogue position averages
    its N detections, so it scatters by sigma / sqrt(N) itself: the offsets' variance is
    sigma^2 (1 + 1/N) plus the fit errors', from which sigma is solved. ``centre`` (the image's, where
    the offsets are east and north) and ``cat_tree``: as for :func:`confident_matches`.
    """
    ci, dj = confident_matches(cat_ra, cat_dec, det_ra, det_dec, det_significance, beam_fwhm, centre, cat_tree)
    if len(ci) < MIN_MATCHES:
        return Astrometry(n=len(ci))
    dx, dy = _offsets(cat_ra[ci], cat_dec[ci], det_ra[dj], det_dec[dj], centre).T * 3600.0
    fit_errors = _fit_errors_at_centre(det_ra[dj], det_dec[dj], det_ra_err[dj], det_dec_err[dj], centre)
    fit_x, fit_y = np.median(fit_errors, axis=1) * 3600.0
    averaged = 1.0 + 1.0 / max(float(np.median(cat_n[ci])), 1.0)

    def scatter(d: np.ndarray, fit: float) -> float:
        sigma = MAD_TO_SIGMA * np.median(np.abs(d - np.median(d)))
        return float(np.sqrt(max(sigma**2 - fit**2, 0.0) / averaged))

    return Astrometry(n=len(ci), offset_ra=float(np.median(dx)), offset_dec=float(np.median(dy)),
                      scatter_ra=scatter(dx, fit_x), scatter_dec=scatter(dy, fit_y))


@dataclass(frozen=True)
class ScatterHistory:
    """Running sums of the measured scatter over the images so far (arcsec^2, weighted by matches)."""

    n: int = 0
    sum_ra2: float = 0.0
    sum_dec2: float = 0.0

    def add(self, astrometry: Astrometry) -> ScatterHistory:
        if not astrometry.measured:
            return self
        n = astrometry.n
        return ScatterHistory(self.n + n, self.sum_ra2 + n * astrometry.scatter_ra**2,
                              self.sum_dec2 + n * astrometry.scatter_dec**2)

    @classmethod
    def from_images(cls, n: list, scatter_ra: list, scatter_dec: list) -> ScatterHistory:
        """From the ``astrometry_*`` columns of the images already in the database."""
        history = cls()
        for args in zip(n, scatter_ra, scatter_dec):
            if None not in args:
                history = history.add(Astrometry(int(args[0]), 0.0, 0.0, float(args[1]), float(args[2])))
        return history

    def rms(self) -> tuple[float, float]:
        """The running scatter (arcsec) in RA and Dec; NaN before any measurement."""
        if self.n == 0:
            return np.nan, np.nan
        return float(np.sqrt(self.sum_ra2 / self.n)), float(np.sqrt(self.sum_dec2 / self.n))


def automatic_sys_err(history: ScatterHistory, image: Astrometry, beam_fwhm: float) -> tuple[float, float]:
    """The systematic error (arcsec, RA and Dec) of an image under ``ew_sys_err = "auto"``: what the
    data show (:func:`widened_sys_err`), never below ``AUTO_FLOOR`` beams; while nothing is
    measured (too few confident matches so far) ``AUTO_UNMEASURED`` beams."""
    beam = beam_fwhm * 3600.0
    return widened_sys_err((AUTO_FLOOR * beam,) * 2, history, image, AUTO_UNMEASURED * beam)


def nothing_measured(history: ScatterHistory, image: Astrometry) -> bool:
    """Whether no scatter is measured yet: none over the earlier images, none on this one."""
    return history.n == 0 and not image.measured


def widened_sys_err(given: tuple[float, float], history: ScatterHistory, image: Astrometry,
                    unmeasured: float = 0.0) -> tuple[float, float]:
    """The larger (arcsec, RA and Dec) of ``given`` and the scatter the data show: the running
    scatter over the earlier images and this image's own (an image worse than the rest is not held
    to their standard). While neither is measured (too few confident matches so far) the larger
    of ``given`` and ``unmeasured`` (arcsec)."""
    if nothing_measured(history, image):
        return max(given[0], unmeasured), max(given[1], unmeasured)
    earlier = history.rms()
    own = (image.scatter_ra, image.scatter_dec) if image.measured else (np.nan, np.nan)
    best = np.nanmax(np.array([earlier, own, given], float), axis=0)
    return float(best[0]), float(best[1])
