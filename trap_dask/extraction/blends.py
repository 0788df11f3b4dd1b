"""Blends: two point sources fitted together where one island holds both.

When two catalogued sources come closer than about a beam, the blind extractor sees one
island (no deblender separates a single-peaked blob): its detection carries the light of both,
and a forced fit of the undetected one at its catalogue position picks up part of the same light
again. (A little further apart, the deblender splits the island, but each part fitted on its
own pixels still takes in its neighbour's wing: the extractor refits such siblings here too.)
Both light curves then jump in that image, and steady pairs rank among the most variable
sources. :func:`fit_point_pairs` instead fits both as beam-shaped point sources at once,
amplitudes and positions free, starting from positions the caller expects them at, with a
Gaussian prior of ``POSITION_PRIOR`` beam FWHM on each position (it keeps the position of a
component that has faded from wandering off). The fit's covariance takes the beam-correlated
noise into account, so a blend too tight to split gives large, honest flux errors instead of a
jump. Pure arrays in pixel coordinates; :func:`trap_dask.extraction.forced.fit_pairs` is the
sky-coordinate front end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trap_dask.extraction import geometry as geo
from trap_dask.extraction.background import NoiseMap
from trap_dask.extraction.gaussian import (
    PixelSet,
    correlated_covariance,
    inverse_params,
    levenberg_marquardt,
    model_and_jacobian,
    segment_argmax,
    segment_sum,
    shape_cov,
)

#: rms of the Gaussian prior on each component's position around its start, in beam FWHM
#: (major axis) per coordinate.
POSITION_PRIOR = 0.5
#: A component fitted below this peak S/N (peak / local rms) is fitted again with its position
#: held at its start.
FREE_POSITION_SNR = 3.0
#: Prior precision that holds a position, in beam FWHM**-2.
_FIXED = 1e8
#: A fit whose component ends further than this from its start (beam FWHM) is not used.
MAX_SHIFT = 1.0
#: The cutout reaches this far beyond both components, in beam FWHM (major axis).
CUTOUT_MARGIN = 1.5
#: An island fitted as one Gaussian longer than this many times the beam's major axis is fitted as
#: two point sources too (:func:`hidden_pairs`) ...
HIDDEN_MIN_EXTENT = 1.0
#: ... where the Gaussian's chi-squared exceeds the number of its pixels by this much per beam area
#: of pixels (a pair that fits better by HIDDEN_MIN_GAIN leaves about what noise leaves: on 8
#: images of pairs50, 690 islands were longer than 1.05 beams, 49 of them fitted that poorly, all
#: 42 true pairs among those) ...
HIDDEN_MIN_EXCESS = 3.0
#: ... and kept as two where they fit its pixels better than the Gaussian by more than this
#: chi-squared per beam area (six parameters each, so the gain is the pair's alone; the
#: deblender's JOIN_MAX_CHISQ; the other 648 islands above gained 5.1 at the 99th percentile) ...
HIDDEN_MIN_GAIN = 6.0
#: ... lie at least this many beam FWHM apart: closer, one source of another shape (a bar, a
#: core with a jet) is fitted by two points as well as a pair is, and either is cut in two in
#: some images and not others (their halves came out 0.51-0.67 beam apart); a pair whose fitted
#: separation scatters across this floor is too, so it sits where the deblender alone lost pairs
#: least (8 epochs of 20 pairs, bright members with eta > 10, at 0.6 / 0.7 / 0.8 / 0.9 beam:
#: without hidden pairs 0 / 0-1 / 1-4 / 0-2; a floor of 0.5 beam (and unequal below 0.7) 18 /
#: 4-13 / 0 / -; 0.7: 0 / 10-13 / 0 / -; 0.8: - / 1 / 5-8 / 0; 0.9: - / 1 / 1-5 / 1-4;
#: RESULTS.md, round 25) ...
HIDDEN_MIN_SEPARATION = 0.8
#: ... and leave at most this chi-squared per beam area above the number of pixels, having taken
#: at least HIDDEN_MIN_SHARE of the Gaussian's excess: two points fit a pair down to its noise
#: (true pairs left -3 in the median, 5.1 at most, in nine fields of a review), not a bright
#: source of another shape (a bar 1.0-1.4 beams long left 6-950).
HIDDEN_MAX_LEFT = 6.0
HIDDEN_MIN_SHARE = 0.8
#: Iterations the hidden pairs' fits get: from the Gaussian's centre and the pixel furthest above
#: it a true pair converges in a few, an island of another shape took up to the usual 60 (8 lost
#: 4 of 6376 detections of 8 images of pairs50, 12 none; 15: medium30's extraction 2.3-2.6 ms an
#: image faster than with 60, the same detections on pairs50, medium30 and the synthetic pairs)
HIDDEN_MAX_ITER = 15


@dataclass(frozen=True)
class PairFits:
    """Joint fits of pairs of beam-shaped point sources (pixel frame).

    params : (n, 6) (A1, x1, y1, A2, x2, y2): peaks in Jy/beam, 0-based pixel positions
    cov : (n, 6, 6) their covariance under beam-correlated noise (NaN where it could not be
        computed; use only where ``ok``)
    chisq : (n,) chi-squared of the data over the pair's pixels
    npix : (n,) pixels fitted
    ok : (n,) converged, finite covariance, both components within ``MAX_SHIFT`` of their starts
    """

    params: np.ndarray
    cov: np.ndarray
    chisq: np.ndarray
    npix: np.ndarray
    ok: np.ndarray


def beam_fwhm(beam_cov: np.ndarray) -> float:
    """The beam's FWHM along its major axis (pixels) from its covariance (pixel**2)."""
    return 2.0 * geo.HALF_FWHM_PER_SIGMA * float(geo.axes_from_cov(beam_cov[None])[0][0])


def _noise_at_components(rms: np.ndarray | NoiseMap, params: np.ndarray) -> np.ndarray:
    """The noise (Jy/beam) at the pixels nearest both components (n, 2) of pair parameters
    (n, 6) (A1, x1, y1, A2, x2, y2), clipped to the image."""
    ny, nx = rms.shape
    ix = np.clip(np.rint(params[:, [1, 4]]), 0, nx - 1).astype(int)
    iy = np.clip(np.rint(params[:, [2, 5]]), 0, ny - 1).astype(int)
    return rms[iy, ix]


def fit_point_pairs(residual: np.ndarray, rms: np.ndarray | NoiseMap, beam_cov: np.ndarray,
                    start: np.ndarray) -> PairFits:
    """Fit each pair of point sources jointly, starting at ``start`` (n, 2, 2): (pair, component, xy)
    in pixels, on a square cutout of the background-subtracted image ``residual`` around both
    (noise map ``rms``, Jy/beam; beam covariance ``beam_cov``, pixel**2)."""
    fwhm = beam_fwhm(beam_cov)
    if len(start) == 0:
        return _unfitted(0)
    pixels, usable = _cutouts(residual, rms, start, fwhm)
    return fit_point_pairs_on(pixels, usable, rms, beam_cov, start)


def fit_point_pairs_on(pixels: PixelSet, usable: np.ndarray, rms: np.ndarray | NoiseMap, beam_cov: np.ndarray,
                       start: np.ndarray, max_iter: int = 60) -> PairFits:
    """:func:`fit_point_pairs` on given pixels: one segment of ``pixels`` per pair where
    ``usable`` (n,), e.g. the pixels of the island the two came from; a fit not converged within
    ``max_iter`` iterations is not ``ok``."""
    n = len(start)
    fits = _unfitted(n)
    if not usable.any():
        return fits
    fwhm = beam_fwhm(beam_cov)
    beam = inverse_params(beam_cov[None])[0]
    sub = start[usable]
    p0 = np.column_stack([np.ones(len(sub)), sub[:, 0], np.ones(len(sub)), sub[:, 1]])
    p0[:, [0, 3]] = _linear_amplitudes(p0, pixels, beam)
    prior = np.zeros((len(p0), 6))
    prior[:, [1, 2, 4, 5]] = 1.0 / np.square(POSITION_PRIOR * fwhm)
    fit, _, converged = levenberg_marquardt(p0, pixels, _pair_model(beam, p0, prior), max_iter=max_iter)
    # a component too faint to place would settle on the highest noise bump near its start
    # (and take its flux): such a one is measured again at its start, like a forced fit
    faint = fit[:, [0, 3]] < FREE_POSITION_SNR * _noise_at_components(rms, p0)  # (n, 2)
    if faint.any():
        positions = prior[:, [1, 2, 4, 5]]
        positions[np.repeat(faint, 2, axis=1)] = _FIXED / np.square(fwhm)
        prior[:, [1, 2, 4, 5]] = positions
        faint = faint.any(1)
        refit, _, reconverged = levenberg_marquardt(p0[faint], pixels.select(faint),
                                                    _pair_model(beam, p0[faint], prior[faint]), max_iter=max_iter)
        fit[faint], converged[faint] = refit, reconverged
    model, jac = _model_and_jacobian(fit, pixels, beam)
    chisq = segment_sum(pixels.weight * np.square(pixels.value - model), pixels.starts)
    precision = prior[:, :, None] * np.eye(6)
    good = converged & np.isfinite(fit).all(-1)  # the covariance is NaN where its normal matrix is ill-conditioned
    cov = np.full((len(fit), 6, 6), np.nan)
    if good.any():
        cov[good] = correlated_covariance(jac[good[pixels.island]], pixels.select(good), beam_cov, precision[good])
    shift = np.hypot(fit[:, [1, 4]] - p0[:, [1, 4]], fit[:, [2, 5]] - p0[:, [2, 5]]).max(-1)
    good &= np.isfinite(cov).all((1, 2)) & (np.einsum("nii->ni", cov) > 0).all(-1) & (shift <= MAX_SHIFT * fwhm)
    fits.params[usable], fits.cov[usable], fits.chisq[usable] = fit, cov, chisq
    fits.npix[usable] = pixels.counts
    fits.ok[usable] = good
    return fits


def hidden_pairs(pixels: PixelSet, fit: np.ndarray, chisq: np.ndarray, candidate: np.ndarray,
                 rms: np.ndarray | NoiseMap, beam_cov: np.ndarray, detection: float) -> tuple[np.ndarray, PairFits]:
    """The islands that hold two point sources where the extractor saw one, and their pair fits.

    A faint neighbour within about a beam of a bright source lies on its flank: the island has one
    peak, no deblender splits it, and the one Gaussian fitted to it takes in some of the
    neighbour's light and widens. Once both are known, the catalogue's pair fits measure them
    apart, so the bright one's light curve jumps at the image where the neighbour is first seen
    (and the neighbour is taken for a new source). Each ``candidate`` island whose Gaussian ``fit``
    (n, 6) is longer than HIDDEN_MIN_EXTENT beams and fits its pixels worse than noise would by
    HIDDEN_MIN_EXCESS is fitted as two beam-shaped point sources, one
    starting at the Gaussian's centre, the other at the island's pixel furthest above it; it is
    two where that fits its pixels better by HIDDEN_MIN_GAIN chi-squared per beam area (``chisq``:
    the Gaussian's) and down to their noise (HIDDEN_MAX_LEFT, HIDDEN_MIN_SHARE), the two are
    HIDDEN_MIN_SEPARATION beam or more apart and each peaks at
    ``detection`` times the noise (``rms``, Jy/beam) or more. Returns those islands' indices and
    their fits (``fits.ok`` all true)."""
    beam_major = geo.axes_from_cov(beam_cov[None])[0][0]
    fwhm = beam_fwhm(beam_cov)
    area = 2.0 * np.pi * np.sqrt(np.linalg.det(beam_cov))  # pixels
    major = np.zeros(len(fit))
    poor = candidate & np.isfinite(fit).all(-1) & (chisq - pixels.counts > HIDDEN_MIN_EXCESS * area)
    if poor.any():
        major[poor] = geo.axes_from_cov(shape_cov(fit[poor]))[0]
    tried = np.flatnonzero(poor & (major > HIDDEN_MIN_EXTENT * beam_major))
    if not len(tried):
        return tried, _unfitted(0)
    own = pixels.select(np.isin(np.arange(len(fit)), tried))
    above = own.value - model_and_jacobian(fit[tried], own, None)[0]
    at = segment_argmax(above, own.starts)
    start = np.stack([fit[tried, 1:3], np.column_stack([own.x[at], own.y[at]])], 1)
    fits = fit_point_pairs_on(own, np.ones(len(tried), bool), rms, beam_cov, start, max_iter=HIDDEN_MAX_ITER)
    gain = (chisq[tried] - fits.chisq) / area
    left = (fits.chisq - fits.npix) / area
    fitted_to_noise = (left <= HIDDEN_MAX_LEFT) & (gain >= HIDDEN_MIN_SHARE * (chisq[tried] - own.counts) / area)
    apart = np.hypot(*(fits.params[:, [1, 2]] - fits.params[:, [4, 5]]).T)
    with np.errstate(invalid="ignore"):
        measurable = (fits.params[:, [0, 3]] >= detection * _noise_at_components(rms, fits.params)).all(1)
        apart_enough = apart >= HIDDEN_MIN_SEPARATION * fwhm
        two = fits.ok & (gain > HIDDEN_MIN_GAIN) & fitted_to_noise & apart_enough & measurable
    return tried[two], PairFits(fits.params[two], fits.cov[two], fits.chisq[two], fits.npix[two], fits.ok[two])


def _unfitted(n: int) -> PairFits:
    return PairFits(np.full((n, 6), np.nan), np.full((n, 6, 6), np.nan), np.full(n, np.nan),
                    np.zeros(n, int), np.zeros(n, bool))


def _cutouts(residual: np.ndarray, rms: np.ndarray | NoiseMap, start: np.ndarray,
             fwhm: float) -> tuple[PixelSet, np.ndarray]:
    """Pixels of a square around each pair (both components plus ``CUTOUT_MARGIN`` beam), as a
    PixelSet of the usable pairs, and which pairs are usable (on the image, enough pixels)."""
    ny, nx = residual.shape
    centre = np.rint(start.mean(1))
    reach = np.abs(start - centre[:, None, :]).max((1, 2))
    half = int(np.ceil(CUTOUT_MARGIN * fwhm + np.nan_to_num(reach, nan=0.0).max()))
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
    finite = np.isfinite(start).all((1, 2))
    sx = np.rint(np.where(finite[:, None], start[..., 0], -1))
    sy = np.rint(np.where(finite[:, None], start[..., 1], -1))
    on_image = ((sx >= 0) & (sx < nx) & (sy >= 0) & (sy < ny)).all(1)
    jx, jy = np.clip(sx, 0, nx - 1).astype(int), np.clip(sy, 0, ny - 1).astype(int)
    finite &= on_image & (np.isfinite(residual[jy, jx]) & np.isfinite(rms[jy, jx])).all(1)
    cx, cy = np.where(finite, centre[:, 0], -10 * half), np.where(finite, centre[:, 1], -10 * half)
    px, py = cx[:, None] + dx.ravel(), cy[:, None] + dy.ravel()
    inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    ix, iy = np.clip(px, 0, nx - 1).astype(int), np.clip(py, 0, ny - 1).astype(int)
    value, noise = residual[iy, ix], rms[iy, ix]
    use = inside & np.isfinite(value) & np.isfinite(noise) & (noise > 0)
    # a pair is usable when both starts lie on measurable pixels and most of its square does
    usable = finite & (use.mean(1) > 0.5)
    use &= usable[:, None]
    island = np.nonzero(use)[0]
    renumber = np.cumsum(usable) - 1
    pixels = PixelSet(
        px[use].astype(float), py[use].astype(float), value[use].astype(float),
        1.0 / np.square(noise[use].astype(float)), renumber[island],
        np.searchsorted(renumber[island], np.arange(int(usable.sum()))),
    )
    return pixels, usable


def _linear_amplitudes(p: np.ndarray, pixels: PixelSet, beam: np.ndarray) -> np.ndarray:
    """Least-squares peaks (n, 2) in Jy/beam of both components at the positions in ``p``."""
    profiles = _model_and_jacobian(p, pixels, beam)[1][:, [0, 3]]
    gram = _normal_matrix(profiles.T, pixels)
    gram += 1e-12 * np.eye(2) * np.einsum("nii->n", gram)[:, None, None]  # coincident starts
    rhs = segment_sum((profiles * (pixels.weight * pixels.value)[:, None]).T, pixels.starts).T
    return np.linalg.solve(gram, rhs[..., None])[..., 0]


def _model_and_jacobian(p: np.ndarray, pixels: PixelSet, beam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brightness (Jy/beam) of both components at every pixel, and d model / d (A1, x1, y1, A2,
    x2, y2) (npix, 6): the sum of two of the extractor's beam-shaped Gaussians."""
    first, jac_first = model_and_jacobian(p[:, :3], pixels, beam)
    second, jac_second = model_and_jacobian(p[:, 3:], pixels, beam)
    return first + second, np.vstack([jac_first, jac_second]).T


def _pair_model(beam: np.ndarray, centres: np.ndarray, prior: np.ndarray):
    """(linearise, valid) of two beam-shaped point sources per island, with independent Gaussian
    priors of precision ``prior`` (n, 6) (pixel**-2; 0: none) around ``centres`` (n, 6)."""

    def linearise(p: np.ndarray, pixels: PixelSet, ids: np.ndarray):
        with np.errstate(over="ignore", invalid="ignore"):
            model, jac = _model_and_jacobian(p, pixels, beam)
            resid = pixels.value - model
            rows = jac.T
            jtj = _normal_matrix(rows, pixels)
            weighted = pixels.weight * resid
            grad = segment_sum(rows * weighted, pixels.starts).T
            chisq = segment_sum(weighted * resid, pixels.starts)
        offset, precision = p - centres[ids], prior[ids]
        jtj += precision[:, :, None] * np.eye(6)
        grad -= precision * offset
        return jtj, grad, chisq + (precision * np.square(offset)).sum(-1)

    return linearise, (lambda p: np.isfinite(p).all(-1))


def _normal_matrix(rows: np.ndarray, pixels: PixelSet) -> np.ndarray:
    """Per island ``J^T W J`` (n, k, k) from the Jacobian's rows (k, npix): the sums of its upper
    triangle, mirrored."""
    k = len(rows)
    first, second = np.triu_indices(k)
    sums = segment_sum((rows * pixels.weight)[first] * rows[second], pixels.starts).T
    jtj = np.empty((len(sums), k, k))
    jtj[:, first, second] = jtj[:, second, first] = sums
    return jtj
