"""Forced fits: the amplitude of a Gaussian of the beam's shape, or a resolved source's, at fixed
sky positions, all at once; and pairs of point sources fitted together from expected sky
positions (:func:`fit_pairs`)."""

from __future__ import annotations

import numpy as np
from scipy import fft as sfft

from trap_dask.extraction import geometry as geo
from trap_dask.extraction.blends import beam_fwhm, fit_point_pairs
from trap_dask.extraction.extract import PreparedImage, local_noise, pair_rows
from trap_dask.extraction.gaussian import beam_on_grid
from trap_dask.extraction.params import ExtractionParams
from trap_dask.shapes import as_matrices, set_intrinsic_shapes
from trap_dask.sources import SOURCE_DTYPE, add_uncertainties

#: Half-width of the fitting cutout in semi-major axes (half FWHM) of the shape fitted: 3 -> +-1.5 FWHM.
CUTOUT_HALF_WIDTH = 3.0
#: A resolved source is force-fitted with its own shape only up to this many times the beam's
#: major axis (wider: the beam's, as TraP); a shape from a fit gone wide cannot take the image.
MAX_PROFILE_BEAMS = 8.0
#: Cutout pixels of resolved sources fitted at once at most (their working arrays, ~50 bytes a
#: pixel, stay within ~15 MB).
MAX_BATCH_PIXELS = 300_000


def _cutout_half(cov: np.ndarray) -> np.ndarray:
    """Half-width (pixels) of the square cutout covering +-1.5 FWHM of Gaussians of covariance
    ``cov`` (k, 2, 2)."""
    major = geo.axes_from_cov(cov)[0] * geo.HALF_FWHM_PER_SIGMA
    return np.maximum(np.ceil(CUTOUT_HALF_WIDTH * major), 1).astype(int)


def _cutout_offsets(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel offsets (dx, dy), flattened, of the square cutout of a Gaussian of covariance
    ``cov`` (2, 2), or of the widest of (k, 2, 2)."""
    half = int(_cutout_half(cov.reshape(-1, 2, 2)).max())
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
    return dx.ravel(), dy.ravel()


def _profile(cov: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Unit-peak Gaussian of covariance ``cov`` (2, 2), or one per row of ``dx`` (k, 2, 2),
    evaluated at pixel offsets (dx, dy)."""
    inv = np.linalg.inv(cov)
    a, b, c = inv[..., 0, 0], inv[..., 0, 1], inv[..., 1, 1]
    if cov.ndim == 3:
        a, b, c = a[:, None], b[:, None], c[:, None]
    return np.exp(-0.5 * (a * dx * dx + 2 * b * dx * dy + c * dy * dy))


def correlated_noise_factor(beam_cov: np.ndarray) -> float:
    """Variance of the least-squares amplitude of the beam over a cutout, in units of rms**2.

    The noise of a synthesis image is correlated like the beam itself. For the estimate
    ``A = sum(P d) / sum(P**2)`` with the beam profile P this gives
    ``var(A) = rms**2 * sum_ij P_i P_j rho_ij / (sum P**2)**2`` (rho = beam), about 4/3 rms**2,
    instead of rms**2 / sum(P**2) for independent pixels.
    """
    dx, dy = _cutout_offsets(beam_cov)
    side = int(np.sqrt(len(dx)))
    profile = _profile(beam_cov, dx, dy).reshape(side, side)
    # sum_j rho(r_i - r_j) P_j by a circular FFT convolution large enough to wrap nothing
    n = sfft.next_fast_len(2 * side - 1, real=True)
    rho = sfft.rfft2(beam_on_grid(np.linalg.inv(beam_cov), n, n))
    smoothed = sfft.irfft2(sfft.rfft2(profile, s=(n, n)) * rho, s=(n, n))[:side, :side]
    return float((profile * smoothed).sum() / np.square(np.square(profile).sum()))


def _fit_amplitudes(image: PreparedImage, x: np.ndarray, y: np.ndarray, ix: np.ndarray, iy: np.ndarray,
                    cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares amplitude (Jy/beam) of a Gaussian of covariance ``cov`` (2, 2), or one per
    position (k, 2, 2), centred at each (x, y) over a cutout around its nearest pixel (ix, iy);
    with the sum of squared residuals ((Jy/beam)**2) and the number of pixels used."""
    ny, nx = image.shape
    dx, dy = _cutout_offsets(cov)
    px, py = ix[:, None] + dx, iy[:, None] + dy
    inside = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
    values = np.where(inside, image.residual[np.clip(py, 0, ny - 1), np.clip(px, 0, nx - 1)], np.nan)
    use = np.isfinite(values)
    data = np.where(use, values, 0.0)
    profile = _profile(cov, px - x[:, None], py - y[:, None]) * use
    with np.errstate(invalid="ignore", divide="ignore"):
        amp = (profile * data).sum(-1) / np.square(profile).sum(-1)
    residuals = (np.square(data - amp[:, None] * profile) * use).sum(-1)
    return amp, residuals, use.sum(-1)


def forced_fit(
    image: PreparedImage, ra: np.ndarray, dec: np.ndarray, params: ExtractionParams,
    shape: np.ndarray | None = None,
) -> np.ndarray:
    """Fit a Gaussian's amplitude at fixed positions (deg); one SOURCE_DTYPE row per position.

    Each position gets a weighted linear least-squares amplitude over a cutout of +-1.5 FWHM of
    the fitted shape around it. The shape is the beam's, or the beam convolved with the source's
    intrinsic shape where ``shape`` (n, 3: ee, en, nn covariance in arcsec**2, east-north;
    trap_dask.shapes) is finite, not zero, and at most MAX_PROFILE_BEAMS wide. ``peak_flux``
    (Jy/beam) is the amplitude, ``int_flux`` (Jy) it times the shape's area over the beam's
    (equal for a point source); their errors account for the beam-correlated noise; the rows'
    axes and position angle are the shape fitted. Positions off the image, or whose nearest
    pixel is blank, get NaN fluxes and errors. Positions are not fitted, so their fit errors and
    error radius are 0.
    """
    ra, dec = np.atleast_1d(np.asarray(ra, float)), np.atleast_1d(np.asarray(dec, float))
    rows = np.zeros(len(ra), dtype=SOURCE_DTYPE)
    rows["ra"], rows["dec"] = ra, dec
    rows["semimajor_axis"] = image.beam.smaj * 3600.0
    rows["semiminor_axis"] = image.beam.smin * 3600.0
    rows["parallactic_angle"] = np.mod(image.beam.pa, 180.0)
    rows["is_force_fit"] = True
    if len(rows) == 0:
        return rows
    ny, nx = image.shape
    x, y = geo.sky_to_pixel(image.wcs, ra, dec)
    rows["x"], rows["y"] = x, y
    ix, iy = np.rint(np.nan_to_num(x, nan=-1.0)), np.rint(np.nan_to_num(y, nan=-1.0))
    on_image = (ix >= 0) & (ix <= nx - 1) & (iy >= 0) & (iy <= ny - 1)
    ix, iy = np.where(on_image, ix, 0).astype(int), np.where(on_image, iy, 0).astype(int)
    on_image &= np.isfinite(image.residual[iy, ix]) & np.isfinite(image.rms[iy, ix])

    amp, residuals, n_used = _fit_amplitudes(image, x, y, ix, iy, image.beam_cov)
    area = np.ones(len(rows))  # of the shape fitted, in beams
    variance = np.full(len(rows), correlated_noise_factor(image.beam_cov))  # of the amplitude, in rms**2
    resolved, cov, jac = _resolved(image, x, y, on_image, shape)
    if len(resolved):
        amp[resolved], residuals[resolved], n_used[resolved] = _fit_in_batches(
            image, x[resolved], y[resolved], ix[resolved], iy[resolved], cov)
        beam_det = np.linalg.det(image.beam_cov)
        area[resolved] = np.sqrt(np.linalg.det(cov) / beam_det)
        # the correlated noise's variance of a wider profile's amplitude scales as
        # sqrt(det(3 beam) / det(2 profile + beam)) (the continuous sums; 1 for the beam)
        variance[resolved] *= np.sqrt(np.linalg.det(3.0 * image.beam_cov) / np.linalg.det(2.0 * cov + image.beam_cov))
        major, minor, pa = geo.shape_on_sky(geo.pixel_cov_to_sky(cov, jac))
        rows["semimajor_axis"][resolved], rows["semiminor_axis"][resolved] = major, minor
        rows["parallactic_angle"][resolved] = pa
        set_intrinsic_shapes(rows, shape[resolved], resolved)
    with np.errstate(invalid="ignore", divide="ignore"):
        amp = np.where(on_image, amp, np.nan)
        noise = np.where(on_image, local_noise(image, ix, iy), np.nan)
        err = noise * np.sqrt(variance)
        chisq = residuals / np.square(noise)
        rows["significance_detection_level"] = amp / noise
    rows["peak_flux"], rows["int_flux"] = amp, amp * area
    rows["peak_flux_err"], rows["int_flux_err"] = err, err * area
    rows["chisq"] = chisq
    rows["reduced_chisq"] = chisq / np.maximum(n_used - 1, 1)
    rows["gaussian_fit"] = np.isfinite(amp)
    return add_uncertainties(rows, params.ew_sys_err, params.ns_sys_err)


def _has_own_shape(shape: np.ndarray) -> np.ndarray:
    """Which rows of intrinsic shapes (n, 3) are a resolved source's: finite and not zero (zeros, or
    NaN, stand for the beam's)."""
    return np.isfinite(shape).all(axis=1) & np.any(shape != 0, axis=1)


def _resolved(image: PreparedImage, x: np.ndarray, y: np.ndarray, on_image: np.ndarray,
              shape: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The positions to fit with their own shape (finite, not zero, at most MAX_PROFILE_BEAMS
    wide), the pixel covariances (k, 2, 2) of the beam convolved with their intrinsic ``shape``
    (n, 3; arcsec**2, east-north) there, and the local Jacobians (deg per pixel)."""
    none = np.zeros(0, np.intp), np.zeros((0, 2, 2)), np.zeros((0, 2, 2))
    if shape is None:
        return none
    candidates = np.flatnonzero(on_image & _has_own_shape(shape))
    if not len(candidates):
        return none
    jac = geo.local_jacobian(image.wcs, x[candidates], y[candidates])
    cov = image.beam_cov + geo.sky_cov_to_pixel(as_matrices(shape[candidates]) / 3600.0**2, jac)
    major = geo.axes_from_cov(cov)[0]
    keep = major <= MAX_PROFILE_BEAMS * geo.axes_from_cov(image.beam_cov[None])[0][0]
    return candidates[keep], cov[keep], jac[keep]


def _fit_in_batches(image: PreparedImage, x: np.ndarray, y: np.ndarray, ix: np.ndarray, iy: np.ndarray,
                    cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_fit_amplitudes` of positions with their own covariance (k, 2, 2), narrowest first,
    in batches of at most MAX_BATCH_PIXELS cutout pixels (each batch's cutout is its widest's)."""
    half = _cutout_half(cov)
    order = np.argsort(half, kind="stable")
    pixels = np.square(2 * half[order] + 1)
    amp, residuals, n_used = np.empty(len(cov)), np.empty(len(cov)), np.empty(len(cov), int)
    start = 0
    while start < len(order):
        cost = np.arange(1, len(order) - start + 1) * pixels[start:]
        end = start + max(1, int(np.searchsorted(cost, MAX_BATCH_PIXELS, side="right")))
        part = order[start:end]
        amp[part], residuals[part], n_used[part] = _fit_amplitudes(image, x[part], y[part], ix[part], iy[part],
                                                                   cov[part])
        start = end
    return amp, residuals, n_used


def fit_pairs(
    image: PreparedImage, ra: np.ndarray, dec: np.ndarray, params: ExtractionParams
) -> tuple[np.ndarray, np.ndarray]:
    """Fit pairs of point sources, each pair jointly, starting at (ra, dec) (n, 2) in deg (see
    :mod:`trap_dask.extraction.blends`).

    Returns SOURCE_DTYPE rows (n, 2), one per component (``peak_flux`` = ``int_flux``, shape of
    the beam, ``is_force_fit`` False), and ``ok`` (n,): the fit converged, its covariance is
    finite and both components stayed within a beam of their starts. Rows where not ``ok``
    hold NaN fluxes.
    """
    ra, dec = np.asarray(ra, float).reshape(-1, 2), np.asarray(dec, float).reshape(-1, 2)
    x, y = geo.sky_to_pixel(image.wcs, ra.ravel(), dec.ravel())
    start = np.stack([x.reshape(-1, 2), y.reshape(-1, 2)], -1)
    fits = fit_point_pairs(image.residual, image.rms, image.beam_cov, start)
    return pair_rows(image, params, fits), fits.ok


#: A new source measured in an earlier image (the backfill) lies on the wing of, or inside, a
#: detection of that image within this many beam FWHM (the catalogue's BLEND_RADIUS) ...
NEIGHBOUR_RADIUS = 2.0
#: ... and at least this far from its centre (beam FWHM): a detection that holds both sits
#: between them, nearer the new source the brighter that is, so that a pair half a beam apart
#: (the catalogue's PAIR_MIN_SEPARATION) shows the new source about 0.3 beam from it (a review
#: found 11-78% of new sources 0.55-0.65 beam from a bright one left to a forced fit alone, with
#: 0.5 here, their first points ~+18 sigma) ...
NEIGHBOUR_MIN_SEPARATION = 0.3
#: ... point-like (fitted major axis at most this many times the beam's; BLEND_MAX_EXTENT) ...
NEIGHBOUR_MAX_EXTENT = 2.0
#: Distances taken at once between new sources and detections (a table of 8 MiB).
DISTANCE_CELLS = 1 << 20


def fit_beside_detections(image: PreparedImage, ra: np.ndarray, dec: np.ndarray, detections: np.ndarray,
                          params: ExtractionParams, shape: np.ndarray | None = None) -> np.ndarray:
    """:func:`forced_fit` of new sources (deg) in an earlier image whose ``detections``
    (SOURCE_DTYPE) are known, a point-like new source near one of them fitted together with it
    (:func:`fit_pairs`).

    A faint source first found beside a bright one was, in the image before, inside the bright
    one's island or on its wing: a forced fit at its position alone takes in the neighbour's light
    (2.6 times the true flux, 1.15 beams from a source ten times brighter), and its light curve
    starts with a jump. Each point-like new source (``shape`` zero or not finite) within
    NEIGHBOUR_RADIUS beams of a point-like detection, NEIGHBOUR_MIN_SEPARATION beam or more from its
    centre, is fitted as a pair with the nearest such detection (each detection once); where that
    fit succeeds, its fluxes and their errors replace the forced fit's (the row stays a forced fit
    at the given position).
    """
    rows = forced_fit(image, ra, dec, params, shape)
    point = np.ones(len(rows), bool) if shape is None else ~_has_own_shape(shape)
    usable = detections[(detections["semimajor_axis"] <= NEIGHBOUR_MAX_EXTENT * image.beam.smaj * 3600.0)
                        & np.isfinite(detections["x"]) & np.isfinite(detections["y"])]
    wanted = np.flatnonzero(point & np.isfinite(rows["peak_flux"]))
    if not len(usable) or not len(wanted):
        return rows
    fwhm = beam_fwhm(image.beam_cov)  # pixels
    near, dist = _nearest(rows["x"][wanted], rows["y"][wanted], usable["x"], usable["y"])
    close = (dist <= NEIGHBOUR_RADIUS * fwhm) & (dist >= NEIGHBOUR_MIN_SEPARATION * fwhm)
    order = np.flatnonzero(close)[np.argsort(dist[close], kind="stable")]
    order = order[np.unique(near[order], return_index=True)[1]]  # each detection with its nearest new source
    if not len(order):
        return rows
    new, det = wanted[order], usable[near[order]]
    pairs, ok = fit_pairs(image, np.column_stack([det["ra"], rows["ra"][new]]),
                          np.column_stack([det["dec"], rows["dec"][new]]), params)
    for name in ("peak_flux", "peak_flux_err", "int_flux", "int_flux_err", "significance_detection_level"):
        rows[name][new[ok]] = pairs[name][ok, 1]
    return rows


def _nearest(x: np.ndarray, y: np.ndarray, to_x: np.ndarray, to_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index into (``to_x``, ``to_y``) of the point nearest each (``x``, ``y``), and its distance
    (pixels): distance tables of at most DISTANCE_CELLS at a time (no KD-tree: workers do not
    import scipy.spatial otherwise, and an image's new sources are few)."""
    near, dist = np.empty(len(x), np.intp), np.empty(len(x))
    rows = max(1, DISTANCE_CELLS // max(len(to_x), 1))
    for start in range(0, len(x), rows):
        part = slice(start, start + rows)
        apart = np.hypot(x[part, None] - to_x, y[part, None] - to_y)
        near[part] = np.argmin(apart, axis=1)
        dist[part] = apart[np.arange(len(apart)), near[part]]
    return near, dist
