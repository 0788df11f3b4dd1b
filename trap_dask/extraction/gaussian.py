"""Batched elliptical Gaussian fits of many islands at once, moments, and Condon (1997) errors.

All islands are fitted together: their pixels are concatenated in one flat array, grouped by
island, and the small normal equations of a Levenberg-Marquardt step are reduced per island with
``np.add.reduceat`` and solved as one stacked ``np.linalg.solve``.

A Gaussian is parametrised by its peak ``A`` (Jy/beam), centre ``(x0, y0)`` (pixels) and the
inverse covariance ``[[a, b], [b, c]]`` (pixel**-2):
``A * exp(-(a dx**2 + 2 b dx dy + c dy**2) / 2)``, which has no degeneracy for round sources.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import fft as sfft

from trap_dask.extraction.geometry import (
    HALF_FWHM_PER_SIGMA,
    axes_from_cov,
    cov_from_axes,
)


@dataclass
class PixelSet:
    """Island pixels as flat arrays grouped by island (contiguous segments).

    Attributes
    ----------
    x, y : pixel coordinates (0-based)
    value : background-subtracted brightness (Jy/beam)
    weight : 1 / rms**2 of each pixel
    island : island number of each pixel (sorted)
    starts : first pixel of each island's segment
    """

    x: np.ndarray
    y: np.ndarray
    value: np.ndarray
    weight: np.ndarray
    island: np.ndarray
    starts: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """Number of pixels of each island."""
        return np.diff(self.starts, append=len(self.x))

    def select(self, keep_island: np.ndarray) -> PixelSet:
        """The pixel set of the islands where ``keep_island`` (renumbered 0..m-1)."""
        if keep_island.all():
            return self
        pix = keep_island[self.island]
        counts = self.counts[keep_island]
        ends = np.cumsum(counts)
        island = np.repeat(np.arange(len(counts)), counts)
        return PixelSet(self.x[pix], self.y[pix], self.value[pix], self.weight[pix], island, ends - counts)

    def batches(self, max_pixels: int) -> Iterator[tuple[slice, PixelSet]]:
        """(islands, their pixel set) of consecutive islands of at most ``max_pixels`` pixels in all
        (an island larger than that alone); the pixel sets are views of this one's arrays."""
        n, ends = len(self.starts), self.starts + self.counts
        first = 0
        while first < n:
            last = max(first + 1, int(np.searchsorted(ends, self.starts[first] + max_pixels, side="right")))
            lo, hi = self.starts[first], ends[last - 1]
            yield slice(first, last), PixelSet(self.x[lo:hi], self.y[lo:hi], self.value[lo:hi], self.weight[lo:hi],
                                               self.island[lo:hi] - first, self.starts[first:last] - lo)
            first = last


#: Island pixels measured together at most (fits, errors): their working arrays, ~200 bytes a pixel,
#: stay within ~60 MB however crowded the image. An island's fit is the same in any batch, its
#: errors to ~1e-15 (the batched matrix products' rounding).
MAX_BATCH_PIXELS = 300_000


def _batched(pixels: PixelSet, measure: Callable[..., tuple], *per_island: np.ndarray) -> tuple | None:
    """``measure(batch, *per_island[islands])`` over :meth:`PixelSet.batches` of MAX_BATCH_PIXELS, its
    per-island results concatenated; None when ``pixels`` is one batch (the caller measures it)."""
    if len(pixels.x) <= MAX_BATCH_PIXELS or len(pixels.starts) < 2:
        return None
    parts = [measure(batch, *(a[islands] for a in per_island)) for islands, batch in pixels.batches(MAX_BATCH_PIXELS)]
    return tuple(np.concatenate(field) for field in zip(*parts))


def segment_reduce(ufunc: np.ufunc, values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``ufunc`` reduced over the islands' segments along the last axis: (..., npix) -> (..., n).

    One row at a time: numpy lets go of the GIL for a 1-D ``reduceat``, not for one over the rows
    of a 2-D array nor for one given ``out`` (two threads then take twice as long as one). Rows of
    pixel values reduce an order of magnitude faster than columns of a (npix, k) array.
    """
    if values.ndim == 1:
        return ufunc.reduceat(values, starts)
    rows = values.reshape(-1, values.shape[-1])
    return np.stack([ufunc.reduceat(row, starts) for row in rows]).reshape(*values.shape[:-1], len(starts))


def segment_argmax(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Index into ``values`` (npix,) of the largest value of each island's segment (the first of
    equal ones)."""
    best = np.maximum.reduceat(values, starts)
    segment = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(values))))
    hit = np.flatnonzero(values == best[segment])
    return hit[np.searchsorted(segment[hit], np.arange(len(starts)))]


def segment_sum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums over the islands' segments along the last axis: (..., npix) -> (..., n)."""
    return segment_reduce(np.add, values, starts)


def moments(pixels: PixelSet, cut_ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moment estimates per island: peak (max pixel), centre (x, y) and shape covariance.

    The second moments of a Gaussian cut at ``cut_ratio`` = threshold / peak underestimate its
    variance by ``f = 1 - t ln(1/t) / (1 - t)``; they are divided by that factor. Returns
    ``peak`` (n,), ``centre`` (n, 2) and ``cov`` (n, 2, 2) in pixel**2.
    """
    v = np.maximum(pixels.value, 0.0)
    total, sx, sy = segment_sum(np.stack([v, v * pixels.x, v * pixels.y]), pixels.starts)
    total = np.maximum(total, np.finfo(float).tiny)
    xbar, ybar = sx / total, sy / total
    dx, dy = pixels.x - xbar[pixels.island], pixels.y - ybar[pixels.island]
    m2 = segment_sum(np.stack([v * dx * dx, v * dx * dy, v * dy * dy]), pixels.starts)
    t = np.clip(cut_ratio, 1e-6, 1 - 1e-6)
    m2 /= total * (1.0 - t * np.log(1.0 / t) / (1.0 - t))
    cov = np.stack([m2[[0, 1]].T, m2[[1, 2]].T], -2)
    peak = np.maximum.reduceat(pixels.value, pixels.starts)
    return peak, np.column_stack([xbar, ybar]), cov


def inverse_params(cov: np.ndarray) -> np.ndarray:
    """(a, b, c) of the inverse of (n, 2, 2) covariances."""
    inv = np.linalg.inv(cov)
    return np.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], -1)


def shape_cov(params: np.ndarray) -> np.ndarray:
    """Covariance (n, 2, 2), pixel**2, of fitted Gaussians from their (a, b, c) columns 3..5."""
    a, b, c = params[:, 3], params[:, 4], params[:, 5]
    inv = np.stack([np.stack([a, b], -1), np.stack([b, c], -1)], -2)
    return np.linalg.inv(inv)


def _model(
    p: np.ndarray, pixels: PixelSet, shape: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Model brightness, unit-peak profile and offsets (dx, dy) from the centre at every pixel.

    ``p`` (n, 6) or, with the shape (a, b, c) fixed, (n, 3); each row is (npix,).
    """
    q = p.T.take(pixels.island, axis=1)  # each island's parameters at its pixels (take: no GIL)
    a, b, c = shape if shape is not None else q[3:6]
    dx, dy = pixels.x - q[1], pixels.y - q[2]
    # exp(-0.5 * (a dx dx + 2 b dx dy + c dy dy)), evaluated in that order, in place
    profile = a * dx
    profile *= dx
    term = (2.0 * b) * dx
    term *= dy
    profile += term
    np.multiply(c, dy, out=term)
    term *= dy
    profile += term
    profile *= -0.5
    np.exp(profile, out=profile)
    return q[0] * profile, profile, dx, dy


def model_and_jacobian(
    p: np.ndarray, pixels: PixelSet, shape: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Model values (npix,) and Jacobian (nparam, npix); ``shape`` (a, b, c) fixed when given."""
    m, profile, dx, dy = _model(p, pixels, shape)
    a, b, c = shape if shape is not None else p[:, 3:6].T.take(pixels.island, axis=1)
    mdx, mdy = m * dx, m * dy
    rows = [profile, a * mdx + b * mdy, b * mdx + c * mdy]
    if shape is None:
        rows += [-0.5 * mdx * dx, -mdx * dy, -0.5 * mdy * dy]
    return m, np.stack(rows)


#: Exponents (p, q) of the monomials dx**p dy**q of degree <= 4, by degree: the first 3 have
#: degree <= 1, the first 6 degree <= 2.
_POWERS = [(p, d - p) for d in range(5) for p in range(d, -1, -1)]
#: For each monomial after the first: the monomial it extends, and whether by dx (else by dy).
_STEPS = [
    (_POWERS.index((p - 1, q)), True) if p else (_POWERS.index((p, q - 1)), False) for p, q in _POWERS[1:]
]
#: Index in _POWERS of the product of two monomials of degree <= 2.
_PRODUCT = np.array([[_POWERS.index((p1 + p2, q1 + q2)) for p2, q2 in _POWERS[:6]] for p1, q1 in _POWERS[:6]])


def _jacobian_coefficients(p: np.ndarray, shape: np.ndarray | None) -> np.ndarray:
    """(n, k, 6 or 3): each Jacobian row as model * polynomial in (dx, dy), over _POWERS.

    d/dA = m / A; d/dx0 = m (a dx + b dy); d/dy0 = m (b dx + c dy); d/d(a, b, c) = -m (dx**2 / 2,
    dx dy, dy**2 / 2).
    """
    n, k = p.shape
    a, b, c = shape if shape is not None else p[:, 3:6].T
    coef = np.zeros((n, k, 6 if k == 6 else 3))
    coef[:, 0, 0] = 1.0 / p[:, 0]
    coef[:, 1, 1], coef[:, 1, 2], coef[:, 2, 1], coef[:, 2, 2] = a, b, b, c
    if k == 6:
        coef[:, 3, 3], coef[:, 4, 4], coef[:, 5, 5] = -0.5, -1.0, -0.5
    return coef


def _linearise(
    p: np.ndarray, pixels: PixelSet, shape: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per island ``J^T W J`` (n, k, k), ``J^T W r`` (n, k) and chi-squared ``r^T W r`` (n,).

    ``r`` = data - model. Every Jacobian row is the model times a polynomial in (dx, dy), so
    the normal equations follow from per-island sums of ``w m**2`` and ``w r m`` times
    monomials (15 and 6 sums for free shapes), without forming the Jacobian.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # trial steps may be invalid
        model, _, dx, dy = _model(p, pixels, shape)
        coef = _jacobian_coefficients(p, shape)
        n_jac = coef.shape[2]
        n_sq = 15 if n_jac == 6 else 6
        resid = pixels.value - model
        wm = pixels.weight * model
        # each row is summed over the islands as soon as it is made, while it is in the cache; the
        # monomial rows in float32 (half the memory traffic; sums good to ~1e-7, which moves a fit
        # by ~1e-6 of its error), chi-squared in float64
        rows = np.empty((n_sq + n_jac, len(model)), np.float32)
        sums = np.empty((len(rows) + 1, len(pixels.starts)))
        dx32, dy32 = dx.astype(np.float32), dy.astype(np.float32)
        np.multiply(wm, model, out=rows[0], casting="same_kind")
        np.multiply(wm, resid, out=rows[n_sq], casting="same_kind")
        # (reduceat without ``out``: see segment_reduce)
        for base, count in ((0, n_sq), (n_sq, n_jac)):
            sums[base] = segment_sum(rows[base], pixels.starts)
            for i, (source, by_x) in enumerate(_STEPS[: count - 1], start=1):
                np.multiply(rows[base + source], dx32 if by_x else dy32, out=rows[base + i])
                sums[base + i] = segment_sum(rows[base + i], pixels.starts)
        sums[-1] = segment_sum(pixels.weight * resid * resid, pixels.starts)
        moments_sq = sums[:n_sq].T[:, _PRODUCT[:n_jac, :n_jac]]
        jtj = coef @ moments_sq @ np.swapaxes(coef, 1, 2)
        grad = (coef @ sums[n_sq:-1].T[:, :, None])[..., 0]
    return jtj, grad, sums[-1]


def gaussian_chisq(p: np.ndarray, pixels: PixelSet, shape: np.ndarray | None = None) -> np.ndarray:
    """Chi-squared of each island's pixels about its Gaussian ``p`` (n, 6) (A, x0, y0, a, b, c;
    with ``shape``, (a, b, c) fixed to it)."""
    m = _model(p, pixels, shape)[0]
    return segment_sum(pixels.weight * np.square(pixels.value - m), pixels.starts)


def _valid(p: np.ndarray, shape: np.ndarray | None) -> np.ndarray:
    ok = (p[:, 0] > 0) & np.isfinite(p).all(-1)
    if shape is None:
        ok &= (p[:, 3] > 0) & (p[:, 5] > 0) & (p[:, 3] * p[:, 5] - p[:, 4] ** 2 > 0)
    return ok


#: The working set of :func:`levenberg_marquardt` drops its converged islands once fewer than
#: this fraction of them is still active.
_SHRINK_BELOW = 0.9
#: A fit whose next step is predicted to lower chi-squared by less than this fraction of the
#: tolerance has converged.
_SETTLED = 0.1


#: ``linearise(p, pixels, ids)`` -> per island ``J^T W J`` (n, k, k), ``J^T W r`` (n, k) and
#: chi-squared (n,) at parameters ``p`` (n, k) of the islands ``ids`` (their original numbers).
Linearise = Callable[[np.ndarray, PixelSet, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def gaussian_model(shape: np.ndarray | None) -> tuple[Linearise, Callable[[np.ndarray], np.ndarray]]:
    """(linearise, valid) of one elliptical Gaussian per island, for :func:`levenberg_marquardt`.

    Parameters are (A, x0, y0, a, b, c), or (A, x0, y0) with the shape (a, b, c) in pixel**-2
    fixed to ``shape`` (the beam).
    """
    return (lambda p, pixels, ids: _linearise(p, pixels, shape)), (lambda p: _valid(p, shape))


def levenberg_marquardt(
    p0: np.ndarray,
    pixels: PixelSet,
    model: tuple[Linearise, Callable[[np.ndarray], np.ndarray]],
    max_iter: int = 60,
    tol: float = 1e-2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least-squares fits of all islands at once.

    Each iteration evaluates the model and normal equations once, at the trial step; an
    accepted step keeps them for the next iteration, a rejected one only raises its damping.

    Parameters
    ----------
    p0 : (n, k) first guesses
    pixels : the islands' pixels
    model : (linearise, valid): the normal equations at given parameters (see ``Linearise``),
        and which parameter rows are allowed; e.g. :func:`gaussian_model`
    tol : an accepted step that lowers chi-squared by less than this ends an island's fit

    Returns
    -------
    params, chisq, converged : the fit, its chi-squared and whether it converged (n,)
    """
    linearise, valid = model
    n, k = p0.shape
    p = p0.astype(float)
    jtj, grad, chisq = linearise(p, pixels, np.arange(n))
    unit = _parameter_units(jtj)
    lam = np.full(n, 1e-3)
    done = np.zeros(n, dtype=bool)
    ids = np.arange(n)  # islands of the working set
    work = pixels
    for _ in range(max_iter):
        u = unit[ids]
        scaled = jtj[ids] * u[:, :, None] * u[:, None, :]
        diag = np.einsum("nii->ni", scaled)
        damping = lam[ids, None] * diag + 1e-12 * diag.max(-1, keepdims=True) + 1e-300
        step = u * np.linalg.solve(scaled + damping[:, :, None] * np.eye(k), (u * grad[ids])[..., None])[..., 0]
        # chi-squared would drop by about step . grad: negligible drops end the fit here
        done[ids] |= np.einsum("ni,ni->n", step, grad[ids]) < _SETTLED * tol
        active = ~done[ids]
        if not active.any():
            break
        if active.mean() < _SHRINK_BELOW:
            work, ids, step = work.select(active), ids[active], step[active]
        trial = p[ids] + step
        trial_jtj, trial_grad, trial_chisq = linearise(trial, work, ids)
        gain = chisq[ids] - np.where(valid(trial), trial_chisq, np.inf)
        better = (gain > 0) & ~done[ids]
        upd = ids[better]
        p[upd], chisq[upd] = trial[better], trial_chisq[better]
        jtj[upd], grad[upd] = trial_jtj[better], trial_grad[better]
        lam[ids] = np.where(better, np.maximum(lam[ids] * 0.2, 1e-9), lam[ids] * 10.0)
        done[ids] |= (better & (gain < tol)) | (lam[ids] > 1e9)
    return p, chisq, done


def _parameter_units(jtj: np.ndarray) -> np.ndarray:
    """(n, k) units in which each fit's parameters start with unit curvature, ``1 / sqrt(diag(J^T W J))``
    at the first guess (a parameter the data do not constrain: the largest of its island's).
    :func:`levenberg_marquardt` solves for its steps in these units, so its damping's floor is the
    same share of every parameter's curvature whatever the image's flux unit: in Jy/beam, that of
    the amplitude grows as 1 / rms**2 and that of the position and shape as (peak / rms)**2, and
    with the floor set by the largest of them, the fits of an image of rms 1e-7 Jy/beam barely moved
    from their first guesses (sizes 7" off)."""
    diag = np.einsum("nii->ni", jtj)
    usable = np.isfinite(diag) & (diag > 0)
    largest = np.max(np.where(usable, diag, 0.0), axis=-1, keepdims=True)
    return 1.0 / np.sqrt(np.where(usable, diag, np.where(largest > 0, largest, 1.0)))


def fit_islands(
    pixels: PixelSet,
    cut_ratio: np.ndarray,
    beam_cov: np.ndarray,
    force_beam: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit a Gaussian to every island, falling back to moments where the fit fails.

    Parameters
    ----------
    pixels : island pixels
    cut_ratio : analysis threshold / peak per island (for the moments' truncation correction)
    beam_cov : (2, 2) restoring-beam covariance in pixel**2
    force_beam : fix the shape to the beam (fit A, x0, y0 only)

    Returns
    -------
    params (n, 6): (A, x0, y0, a, b, c); chisq; gaussian_fit (bool: False where moments are used)
    """
    batched = _batched(pixels, lambda batch, ratio: fit_islands(batch, ratio, beam_cov, force_beam), cut_ratio)
    if batched is not None:
        return batched
    # corrupt pixels (inf, 1e30) and degenerate islands give non-finite moments and trial steps:
    # the fit refuses those (_valid, _sane) and falls back to the moments, without numpy's warnings
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _fit_one_batch(pixels, cut_ratio, beam_cov, force_beam)


def _fit_one_batch(pixels: PixelSet, cut_ratio: np.ndarray, beam_cov: np.ndarray,
                   force_beam: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fit_islands` of islands measured together."""
    peak, centre, cov = moments(pixels, cut_ratio)
    # Degenerate moments (one-pixel-wide islands) take the beam's shape.
    degenerate = ~(np.linalg.det(cov) > 1e-3 * np.linalg.det(beam_cov)) | ~np.isfinite(cov).all((1, 2))
    cov[degenerate] = beam_cov
    if force_beam:
        cov[:] = beam_cov
    beam_inv = inverse_params(beam_cov[None])[0]
    p0 = np.column_stack([peak, centre, inverse_params(cov)])
    start = p0.copy()  # point-like islands start from the beam's shape, nearer their fit than the moments'
    major, minor, _ = axes_from_cov(cov)
    beam_major, beam_minor, _ = axes_from_cov(beam_cov[None])
    start[(major <= _POINT_START * beam_major) & (minor <= _POINT_START * beam_minor), 3:] = beam_inv
    nparam = 3 if force_beam else 6
    fittable = pixels.counts > nparam
    params = p0.copy()
    ok = np.zeros(len(peak), dtype=bool)
    if fittable.any():
        sub = pixels.select(fittable)
        fitted, _, converged = levenberg_marquardt(start[fittable, :nparam], sub,
                                                   gaussian_model(beam_inv if force_beam else None))
        params[fittable, : fitted.shape[1]] = fitted
        ok[fittable] = converged
    ok &= _sane(params, p0, pixels, beam_cov)
    params[~ok] = p0[~ok]
    return params, gaussian_chisq(params, pixels), ok


def _sane(params: np.ndarray, p0: np.ndarray, pixels: PixelSet, beam_cov: np.ndarray) -> np.ndarray:
    """Reject fits that wander off their island, or are far narrower/wider than plausible."""
    xy = np.stack([pixels.x, pixels.y])
    lo = segment_reduce(np.minimum, xy, pixels.starts).T
    hi = segment_reduce(np.maximum, xy, pixels.starts).T
    inside = ((params[:, 1:3] >= lo - 1) & (params[:, 1:3] <= hi + 1)).all(-1)
    ok = _valid(params, None) & inside & (params[:, 0] < 3.0 * p0[:, 0])
    if not ok.any():
        return ok
    major, minor, _ = axes_from_cov(shape_cov(np.where(ok[:, None], params, p0)))
    beam_minor = axes_from_cov(beam_cov[None])[1][0]
    extent = np.hypot(*(hi - lo + 1).T)
    return ok & (minor > 0.2 * beam_minor) & (major < 3.0 * extent + 2.0 * beam_minor)


#: Islands whose moments' axes are at most this many times the beam's start their fits from the
#: beam's shape.
_POINT_START = 1.5


#: Islands of more pixels than this get their correlated sums in float64, the others in float32
#: (their few terms keep float32 sums accurate to ~1e-6 of the largest).
_FLOAT64_MIN_PIXELS = 300
#: Upper bound on grid cells (islands x vectors x padded cells) per batched FFT. Batches of 256k
#: cells stay in the cache and are 11% faster in one thread, but in two threads a run was 2% slower
#: with them (more numpy calls, the GIL taken between each; benchmarks/RESULTS.md, issue 15 round 5).
_CELLS_PER_BATCH = 1_000_000


#: FFT grid sizes, fast lengths about 25% apart: an island's grid is the smallest that holds it,
#: so that islands fall into few groups of one grid size, each group one batched FFT (fewer numpy
#: calls, and the GIL is held between them: 2-3% less wall time in two threads than with the next
#: fast length of each island, the same CPU time in one).
_GRID_SIZES = np.array(sorted({sfft.next_fast_len(round(4 * 1.25**i), real=True) for i in range(40)}))


def _grid_size(cells: np.ndarray) -> np.ndarray:
    """The grid sizes (of _GRID_SIZES, else the next fast length) of at least ``cells`` cells."""
    at = np.searchsorted(_GRID_SIZES, cells)
    beyond = at == len(_GRID_SIZES)
    sizes = _GRID_SIZES[np.minimum(at, len(_GRID_SIZES) - 1)]
    sizes[beyond] = [sfft.next_fast_len(int(c), real=True) for c in cells[beyond]]
    return sizes


def beam_on_grid(beam_inv: np.ndarray, ny: int, nx: int) -> np.ndarray:
    """Unit-peak beam (ny, nx) at the offsets of a circular grid (0, 1, ..., -1 along each axis)."""
    ox = np.fft.fftfreq(nx, 1.0 / nx)[None, :]
    oy = np.fft.fftfreq(ny, 1.0 / ny)[:, None]
    (a, b), (_, c) = beam_inv
    return np.exp(-0.5 * (a * ox * ox + 2.0 * b * ox * oy + c * oy * oy))


#: Values of the beam's transform on a grid below zero by at most this fraction of its peak are
#: taken as zero (rounding, or a cut-off of the beam too slight to matter).
_NEGLIGIBLE = 1e-9


@functools.lru_cache(maxsize=256)
def _parseval_weights(beam_inv: tuple[float, float, float], ny: int, nx: int,
                      dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(weights, negative): the (2 * ny * (nx // 2 + 1),) square roots of the magnitudes of the
    weights of the real and imaginary parts of an ``rfft2`` on a (ny, nx) grid such that
    ``sum_ij v_i rho(r_i - r_j) w_j`` is the sum over them of the weighted parts of ``V`` times
    those of ``W``, and the indices of the weights that enter with a minus sign; ``beam_inv`` is
    (a, b, c).

    ``rfft2`` keeps the columns 0..nx//2; the others, conjugates of columns 1..(nx-1)//2, count
    twice. The transform of the beam on the grid is real (the beam is symmetric). A grid smaller
    than the beam (a small island under a wide or elongated beam) cuts the beam off, and its
    transform dips below zero at some frequencies: those terms count with their sign (clipped to
    zero they put the sums up to 1e-3 off, the errors up to 8%). Cached: the images of a survey
    share their beams and grid sizes.
    """
    a, b, c = beam_inv
    twice = np.full(nx // 2 + 1, 2.0)
    twice[0] = 1.0
    if nx % 2 == 0:
        twice[-1] = 1.0
    beam = sfft.rfft2(beam_on_grid(np.array([[a, b], [b, c]]), ny, nx)).real
    beam = np.where(beam < -_NEGLIGIBLE * beam.max(), beam, np.maximum(beam, 0.0))
    weights = np.repeat((beam * twice / (nx * ny)).ravel(), 2)
    negative = np.flatnonzero(weights < 0)
    weights = np.sqrt(np.abs(weights)).astype(dtype)
    for array in (weights, negative):
        array.flags.writeable = False
    return weights, negative


class DyExpansion(NamedTuple):
    """How :func:`_fft_gram`'s vectors after its b rows follow from those rows: vector b + j is row
    ``base[j]`` times ``dy**power[j]``, with ``dy = y - centre_y`` (pixels) of its island.
    Multiplying by a function of y commutes with the transform along x, so only the rows are
    scattered onto the grids and transformed along x; the other vectors are made from them there."""

    base: tuple[int, ...]  #: the row each further vector is made from
    power: tuple[int, ...]  #: its power of dy
    centre_y: np.ndarray  #: (n,) each island's y (pixels)


def _fft_gram(
    rows: np.ndarray, positions: np.ndarray, beam_inv: np.ndarray, starts: np.ndarray, precise: np.ndarray,
    expand: DyExpansion | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_gram_matrices` through the Fourier transforms of each island's vectors.

    ``sum_ij v_i rho(r_i - r_j) v_j^T`` is, on the island's bounding box (h, w) zero-padded to a
    circular grid of >= (2h - 1, 2w - 1) cells, the sum over frequencies of ``V(f) RHO(f) V(f)^H``
    divided by the number of cells (Parseval): one real matrix product of each island's
    transformed vectors, weighted. The pixels lie on the integer grid (their offsets differ by
    whole pixels). Islands of the same padded size share one batched FFT, in float64 where
    ``precise`` (per island), else in float32. ``rows`` (b, npix): the vectors, followed by those
    ``expand`` makes from them (:class:`DyExpansion`); ``positions`` (2, npix): the pixels' (x, y),
    whole numbers.
    """
    (b, npix), n = rows.shape, len(starts)
    k = b + (len(expand.base) if expand is not None else 0)
    if n == 0:
        return np.zeros((0, k, k)), np.zeros((0, k, k))
    counts = np.diff(np.append(starts, npix))
    island = np.repeat(np.arange(n), counts)
    low = segment_reduce(np.minimum, positions, starts)
    grid = (positions - low.take(island, axis=1)).astype(np.intp)  # x, y (take: no GIL, 8x faster here)
    extent = segment_reduce(np.maximum, grid, starts) + 1
    padded = _grid_size(2 * extent - 1)  # (2, n): nx, ny of each island's grid
    shape_key = (padded[1] * (padded[0].max() + 1) + padded[0]) * 2 + precise
    order = np.argsort(shape_key, kind="stable")  # islands by grid size and precision
    bounds = np.flatnonzero(np.r_[True, np.diff(shape_key[order]) != 0, True])
    ordered_counts = counts[order]
    ends = np.cumsum(ordered_counts)
    # the pixels of the islands in that order, and the position in ``order`` of their island
    pixel_order = np.repeat(starts[order] - ends + ordered_counts, ordered_counts) + np.arange(ends[-1])
    position = np.repeat(np.arange(n), ordered_counts)
    pixel_bounds = np.r_[0, ends][bounds]
    plain, correlated = np.empty((n, k, k)), np.empty((n, k, k))
    inverse = (float(beam_inv[0, 0]), float(beam_inv[0, 1]), float(beam_inv[1, 1]))
    for first, last, pix_first, pix_last in zip(bounds[:-1], bounds[1:], pixel_bounds[:-1], pixel_bounds[1:]):
        nx, ny = (int(v) for v in padded[:, order[first]])
        dtype = np.float64 if precise[order[first]] else np.float32
        wx, hy = (int(v) for v in extent[:, order[first:last]].max(1))  # the islands' boxes fit in hy x wx
        weights, negative = _parseval_weights(inverse, ny, nx, dtype)
        per_batch = max(1, _CELLS_PER_BATCH // (k * nx * ny))
        for chunk in range(first, last, per_batch):
            top = min(chunk + per_batch, last)
            lo, hi = np.searchsorted(position[pix_first:pix_last], [chunk, top]) + pix_first
            pix = pixel_order[lo:hi]
            cells = np.empty((top - chunk, k, hy, wx), dtype=dtype)
            cells[:, :b] = 0.0
            cell = ((position[lo:hi] - chunk) * k * hy + grid[1, pix]) * wx + grid[0, pix]
            # every row's values in one scatter: row j of a cell lies j * hy * wx further on
            cells.reshape(-1)[cell + (hy * wx) * np.arange(b)[:, None]] = rows[:, pix]
            isl = order[chunk:top]
            if expand is None:
                spectrum = sfft.rfft(cells, n=nx, axis=-1)
            else:
                dy = _dy_powers(expand, isl, low[1, isl], hy, dtype)
                spectrum = np.empty((top - chunk, k, hy, nx // 2 + 1), dtype=np.result_type(dtype, np.complex64))
                spectrum[:, :b] = sfft.rfft(cells[:, :b], n=nx, axis=-1)
                _expand(cells, expand, dy)
                _expand(spectrum, expand, dy)
            vectors = cells.reshape(top - chunk, k, -1)
            plain[isl] = vectors @ np.swapaxes(vectors, 1, 2)
            # rfft2 on the (ny, nx) grid, zero-padding each axis as it is transformed
            spectrum = sfft.fft(spectrum, n=ny, axis=-2, overwrite_x=True)
            spectrum = spectrum.reshape(top - chunk, k, -1).view(dtype)
            spectrum *= weights
            correlated[isl] = spectrum @ np.swapaxes(spectrum, 1, 2)
            if len(negative):  # the terms of negative weight were added: take them twice
                below = spectrum[..., negative]
                correlated[isl] -= 2.0 * (below @ np.swapaxes(below, 1, 2))
    return plain, correlated


def _dy_powers(expand: DyExpansion, islands: np.ndarray, lowest_y: np.ndarray, hy: int,
               dtype: type) -> dict[int, np.ndarray]:
    """``{power: (m, hy, 1) dy**power}`` on the grid rows of the ``islands``, whose grid rows start
    at ``lowest_y`` (pixels), for each power ``expand`` asks for."""
    dy = ((lowest_y - expand.centre_y[islands])[:, None] + np.arange(hy))[..., None]
    return {power: (dy**power).astype(dtype) for power in set(expand.power)}


def _expand(grids: np.ndarray, expand: DyExpansion, dy: dict[int, np.ndarray]) -> None:
    """Fill the vectors b.. of ``grids`` (m, k, hy, ...) from its rows 0..b-1 (values, or their
    transforms along x), in place (see :class:`DyExpansion`)."""
    b = grids.shape[1] - len(expand.base)
    for j, (row, power) in enumerate(zip(expand.base, expand.power), start=b):
        np.multiply(grids[:, row], dy[power], out=grids[:, j])


def _gram_matrices(vectors: np.ndarray, pixels: PixelSet, beam_cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per island ``sum_i v_i v_i^T`` and ``sum_ij v_i rho(r_i - r_j) v_j^T`` (n, k, k each).

    ``vectors`` (npix, k) of the island pixels; ``rho`` is the unit-peak beam. Islands of more
    than ``_FLOAT64_MIN_PIXELS`` pixels are summed in float64, the others in float32 (see
    :func:`_fft_gram`).
    """
    return _fft_gram(np.ascontiguousarray(vectors.T), np.stack([pixels.x, pixels.y]), np.linalg.inv(beam_cov),
                     pixels.starts, pixels.counts > _FLOAT64_MIN_PIXELS)


@functools.cache
def _monomial_layout(k: int) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """How :func:`fit_covariance` makes the first ``k`` monomials of _POWERS: the powers of dx of
    the rows it transforms, the (row, power of dy) of the further monomials (:class:`DyExpansion`),
    and the index in _POWERS of each monomial in that order (rows, then further ones)."""
    monomials = _POWERS[:k]
    x_powers = sorted(px for px, py in monomials if py == 0)
    further = [(x_powers.index(px), py) for px, py in monomials if py]
    order = [(px, 0) for px in x_powers] + [m for m in monomials if m[1]]
    return x_powers, further, [monomials.index(m) for m in order]


def fit_covariance(
    params: np.ndarray, pixels: PixelSet, beam_cov: np.ndarray, fixed_shape: bool
) -> np.ndarray:
    """Covariance (n, k, k) of the weighted least-squares fits under beam-correlated noise.

    The noise of a synthesis image is correlated like the beam: ``cov(n_i, n_j) = rms_i rms_j
    rho(r_i - r_j)`` with ``rho`` the unit-peak beam. The fit minimises ``sum w (d - m)**2`` with
    ``w = 1 / rms**2``, so its linearised covariance is the sandwich ``H^-1 S H^-1`` with
    ``H = J^T W J`` and ``S = sum_ij sqrt(w_i) J_i rho_ij sqrt(w_j) J_j``. For independent pixels
    it reduces to ``H^-1``; with correlated noise it is the honest error of this estimator
    (the Condon 1997 formulae give the smaller error of an optimal, noise-whitened fit).
    ``k`` = 3 (A, x0, y0) when ``fixed_shape``, else 6.

    Every Jacobian row is the model times a polynomial in (dx, dy) (:func:`_jacobian_coefficients`),
    so both sums are those of ``sqrt(w) m`` times the k monomials, mapped by the coefficients; the
    monomials are made from ``sqrt(w) m dx**p`` by powers of dy (:class:`DyExpansion`).
    """
    shape = inverse_params(beam_cov[None])[0] if fixed_shape else None
    p = params[:, :3] if fixed_shape else params
    model, _, dx, _ = _model(p, pixels, shape)
    x_powers, further, columns = _monomial_layout(p.shape[1])
    coef = _jacobian_coefficients(p, shape)[:, :, columns]
    scaled = model * np.sqrt(pixels.weight)
    plain, correlated = _fft_gram(np.stack([scaled * dx**power for power in x_powers]), np.stack([pixels.x, pixels.y]),
                                  np.linalg.inv(beam_cov), pixels.starts, pixels.counts > _FLOAT64_MIN_PIXELS,
                                  DyExpansion(*zip(*further), centre_y=p[:, 2]))
    mapped = np.swapaxes(coef, 1, 2)
    return _sandwich(coef @ plain @ mapped, coef @ correlated @ mapped)


def correlated_covariance(
    jacobian: np.ndarray, pixels: PixelSet, beam_cov: np.ndarray, prior_precision: np.ndarray | None = None,
) -> np.ndarray:
    """Sandwich covariance (n, k, k) of weighted least-squares fits under beam-correlated noise.

    ``jacobian`` (npix, k): d model / d parameter at every pixel; ``prior_precision`` (n, k, k):
    the inverse covariance of Gaussian priors on the parameters, added to ``J^T W J``.
    See :func:`fit_covariance`.
    """
    hessian, middle = _gram_matrices(jacobian * np.sqrt(pixels.weight)[:, None], pixels, beam_cov)
    if prior_precision is not None:
        hessian = hessian + prior_precision
    return _sandwich(hessian, middle)


#: A normal matrix scaled to unit diagonal with a larger condition number than this is not inverted:
#: the fit errors' sums in float32 keep ~7 digits, which the inverse's amplification by the
#: condition number would overwhelm (fits of Gaussians to islands stay below ~60: 58 the largest
#: of 4746 on pairs50).
MAX_CONDITION = 1e6


def _well_conditioned(matrices: np.ndarray) -> np.ndarray:
    """Whether each (k, k) symmetric normal matrix of a stack can be inverted reliably: finite, a
    positive diagonal, and positive eigenvalues within MAX_CONDITION of each other once scaled to
    unit diagonal (independent of the units of flux and position)."""
    diag = np.einsum("nii->ni", matrices)
    finite = np.isfinite(matrices).all((1, 2)) & (diag > 0).all(-1)
    scale = 1.0 / np.sqrt(np.where(finite[:, None], diag, 1.0))
    scaled = np.where(finite[:, None, None], matrices * scale[:, :, None] * scale[:, None, :],
                      np.eye(matrices.shape[-1]))
    eigen = np.linalg.eigvalsh(scaled)  # ascending; half the time of np.linalg.cond's SVD
    return finite & (eigen[:, 0] * MAX_CONDITION > eigen[:, -1])


def _sandwich(hessian: np.ndarray, middle: np.ndarray) -> np.ndarray:
    """``H^-1 S H^-1`` of (n, k, k) stacks; NaN where H is singular or nearly so (e.g. an island
    one pixel high: its pixels say nothing of the fit's y, and its inverse is rounding noise,
    negative variances among it), which :func:`measurement_errors` answers with Condon's errors."""
    usable = _well_conditioned(hessian)
    h_inv = np.linalg.inv(np.where(usable[:, None, None], hessian, np.eye(hessian.shape[-1])))
    h_inv[~usable] = np.nan
    return h_inv @ middle @ h_inv


def integrated_flux(
    params: np.ndarray, beam_cov: np.ndarray, cov: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Integrated flux (Jy) ``A * area / beam area`` of fitted Gaussians and its 1-sigma error.

    ``params`` (n, 6) and their covariance ``cov`` (n, k, k); with k = 3 the shape is the beam's
    and the integrated flux equals the peak.
    """
    a, b, c = params[:, 3], params[:, 4], params[:, 5]
    det = a * c - b * b
    flux = params[:, 0] * np.sqrt(1.0 / (det * np.linalg.det(beam_cov)))
    if cov.shape[-1] == 3:
        return flux, np.sqrt(cov[:, 0, 0]) * flux / params[:, 0]
    grad = flux[:, None] * np.stack([1.0 / params[:, 0], -0.5 * c / det, b / det, -0.5 * a / det], -1)
    sub = cov[:, [0, 3, 4, 5]][:, :, [0, 3, 4, 5]]
    return flux, np.sqrt(np.einsum("ni,nij,nj->n", grad, sub, grad))


class SourceErrors(NamedTuple):
    """1-sigma errors of Gaussian source measurements.

    peak_err (Jy/beam), int_flux and int_flux_err (Jy), pos_cov (n, 2, 2) pixel**2.
    """

    peak_err: np.ndarray
    int_flux: np.ndarray
    int_flux_err: np.ndarray
    pos_cov: np.ndarray


def condon_errors(
    peak: np.ndarray, cov: np.ndarray, noise: np.ndarray, beam_cov: np.ndarray, fixed_shape: bool = False
) -> SourceErrors:
    """Errors of Gaussian fits after Condon (1997, PASP 109, 166), eqs. 21 and 41.

    The noise is taken as correlated over the restoring beam: in rho**2 the FWHM of the noise
    correlation along the source axes are the beam FWHMs, and the number of independent noise
    samples under the source is its area over the beam's area. ``peak`` in Jy/beam, ``cov`` the
    sources' shape covariances and ``beam_cov`` the beam's, in pixel**2, ``noise`` the local rms
    in Jy/beam. With ``fixed_shape`` only the peak and position are free (no size terms in the
    integrated flux error).
    """
    s_major, s_minor, angle = axes_from_cov(cov)
    b_major, b_minor, _ = axes_from_cov(beam_cov[None])
    theta_major, theta_minor = 2 * HALF_FWHM_PER_SIGMA * s_major, 2 * HALF_FWHM_PER_SIGMA * s_minor
    beam_major, beam_minor = 2 * HALF_FWHM_PER_SIGMA * b_major, 2 * HALF_FWHM_PER_SIGMA * b_minor
    snr2 = np.square(peak / noise)

    def rho2(alpha_major: float, alpha_minor: float) -> np.ndarray:
        return (
            theta_major * theta_minor / (4.0 * beam_major * beam_minor)
            * (1.0 + (beam_major / theta_major) ** 2) ** alpha_major
            * (1.0 + (beam_minor / theta_minor) ** 2) ** alpha_minor
            * snr2
        )

    rel_peak = np.sqrt(2.0 / rho2(1.5, 1.5))
    rel_major = np.sqrt(2.0 / rho2(2.5, 0.5))
    rel_minor = np.sqrt(2.0 / rho2(0.5, 2.5))
    # eq. 21: position errors along the major / minor axis, sigma_x0 = sigma_thetaM / sqrt(8 ln 2)
    err_along_major = rel_major * theta_major / np.sqrt(8.0 * np.log(2.0))
    err_along_minor = rel_minor * theta_minor / np.sqrt(8.0 * np.log(2.0))
    area_ratio = s_major * s_minor / (b_major * b_minor)
    int_flux = peak * area_ratio
    rel_int2 = rel_peak**2
    if not fixed_shape:
        rel_int2 = rel_int2 + (beam_major * beam_minor / (theta_major * theta_minor)) * (
            rel_major**2 + rel_minor**2
        )
    return SourceErrors(
        peak_err=rel_peak * peak,
        int_flux=int_flux,
        int_flux_err=np.sqrt(rel_int2) * np.abs(int_flux),
        pos_cov=cov_from_axes(err_along_major, err_along_minor, angle),
    )


def measurement_errors(
    params: np.ndarray,
    fitted: np.ndarray,
    pixels: PixelSet,
    noise: np.ndarray,
    beam_cov: np.ndarray,
    force_beam: bool,
) -> SourceErrors:
    """Errors of every island's measurement: the fit covariance where ``fitted`` and it is a
    covariance (finite, positive variances), else Condon's (a source of ~1e30 Jy/beam, a corrupt
    pixel, overflows the covariance's float32 sums; an island one pixel high leaves its normal
    matrix singular: NaN or negative variances would make its catalogue position NaN).

    ``noise`` is the local rms (Jy/beam) at each source.
    """
    batched = _batched(pixels, lambda batch, p, f, n: measurement_errors(p, f, batch, n, beam_cov, force_beam),
                       params, fitted, noise)
    if batched is not None:
        return SourceErrors(*batched)
    errors = condon_errors(params[:, 0], shape_cov(params), noise, beam_cov, fixed_shape=force_beam)
    if fitted.any():
        with np.errstate(over="ignore", invalid="ignore"):  # overflows give non-finite covariances
            cov = fit_covariance(params[fitted], pixels.select(fitted), beam_cov, force_beam)
            flux, flux_err = integrated_flux(params[fitted], beam_cov, cov)
        valid = np.isfinite(cov).all((1, 2)) & (np.einsum("nii->ni", cov) > 0).all(-1) & np.isfinite(flux_err)
        use = np.flatnonzero(fitted)[valid]
        errors.peak_err[use] = np.sqrt(cov[valid, 0, 0])
        errors.int_flux[use], errors.int_flux_err[use] = flux[valid], flux_err[valid]
        errors.pos_cov[use] = cov[valid, 1:3, 1:3]
    return errors
