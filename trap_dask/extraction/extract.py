"""Blind source extraction: background, islands, deblending, batched Gaussian fits, sky columns."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS

from trap_dask.extraction import geometry as geo
from trap_dask.extraction.artefacts import beam_suspect, pixel_artefacts
from trap_dask.extraction.background import NoiseMap, residual_and_rms
from trap_dask.extraction.blends import PairFits, fit_point_pairs_on, hidden_pairs
from trap_dask.extraction.deblend import deblend, rejoined
from trap_dask.extraction.gaussian import (
    PixelSet,
    SourceErrors,
    fit_islands,
    gaussian_chisq,
    inverse_params,
    measurement_errors,
    shape_cov,
)
from trap_dask.extraction.islands import (
    SNR,
    Islands,
    grow_into_background,
    islands_from_pixels,
    label_islands,
    snr_map,
)
from trap_dask.extraction.params import ExtractionParams
from trap_dask.image import Beam
from trap_dask.shapes import as_triples, set_intrinsic_shapes
from trap_dask.sky import haversine
from trap_dask.sources import SOURCE_DTYPE, add_uncertainties, empty_sources

#: Deblended parts that :func:`~trap_dask.extraction.deblend.rejoined` would join stay apart when
#: one Gaussian fits their pixels worse than their own Gaussians do by more than this
#: chi-squared per beam area of pixels: parts of one resolved source cut along the noise gave
#: up to 6.2 (median 2), a point source of S/N 8-15 a beam from the centre of a resolved one
#: mostly 4-19 (RESULTS.md, round 20).
JOIN_MAX_CHISQ = 6.0
#: Islands larger than this many beam areas are cropped to the pixels nearest their peak.
MAX_ISLAND_BEAMS = 50.0
#: Rings of pixels added around each island for its fit, so the fit also sees the faint wings.
FIT_RINGS = 2
#: The two components of a deblended island are refitted together when both fitted axes are at
#: most this many times the beam's, and their centres at most SIBLING_MAX_SEPARATION beam FWHM
#: apart (further apart, the wings hardly overlap).
SIBLING_MAX_EXTENT = 1.5
SIBLING_MAX_SEPARATION = 2.0


@dataclass
class PreparedImage:
    """What a worker keeps in memory between blind extraction and forced fits.

    Attributes
    ----------
    residual : float32 (ny, nx), data - background in Jy/beam, NaN where blank
    rms : float32 (ny, nx), local per-pixel noise in Jy/beam (NaN when the image is all blank); a
        NoiseMap (made where it is looked at) for large images
    wcs : 2-D celestial WCS
    beam : restoring beam in deg (semi-axes = FWHM/2, PA east of north)
    beam_cov : (2, 2) covariance of the beam in pixel**2 (sigma**2), at the image centre
    """

    residual: np.ndarray
    rms: np.ndarray | NoiseMap
    wcs: WCS
    beam: Beam
    beam_cov: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) in pixels."""
        return self.residual.shape

    @property
    def centre(self) -> tuple[float, float]:
        """Centre (x, y) of the image in 0-based pixels."""
        ny, nx = self.shape
        return (nx - 1) / 2.0, (ny - 1) / 2.0


def prepare_image(data: np.ndarray, wcs: WCS, beam: Beam, params: ExtractionParams,
                  overwrite: bool = False) -> PreparedImage:
    """Subtract the background and measure the noise of a 2-D image (Jy/beam).

    ``wcs`` may carry extra (frequency, Stokes) axes; its celestial part is kept. ``overwrite``:
    a float32 ``data`` becomes the residual map (no copy of the image is made).
    """
    data = np.asarray(data, dtype=np.float32)
    wcs = wcs.celestial
    ny, nx = data.shape
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    beam_cov = geo.sky_cov_to_pixel(geo.beam_sky_cov(beam)[None], geo.local_jacobian(wcs, cx, cy))[0]
    beam_minor_sigma = geo.axes_from_cov(beam_cov[None])[1][0]
    # Noise correlated over >= 2 pixels per sigma lets the statistics use every other pixel.
    stride = 2 if beam_minor_sigma >= 1.5 else 1
    residual, rms = residual_and_rms(data, params.back_size_y, params.back_size_x, stride=stride,
                                     overwrite=overwrite)
    return PreparedImage(residual, rms, wcs, beam, beam_cov)


def in_extraction_region(
    shape: tuple[int, int], params: ExtractionParams, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Whether 0-based pixel positions lie inside the margin and within the radius."""
    ny, nx = shape
    m = params.margin
    ok = (x >= m) & (x <= nx - 1 - m) & (y >= m) & (y <= ny - 1 - m)
    if params.radius > 0:
        ok &= np.hypot(x - (nx - 1) / 2.0, y - (ny - 1) / 2.0) <= params.radius
    return ok


#: The noise map is looked at every this fraction of a background box (and along the extraction
#: region's edges) for its extremes: it is linear between box centres, so they lie at a centre or
#: on the edge, and a look every quarter box finds them to ~1% of the step between two boxes.
NOISE_LOOKS_PER_BOX = 4


def noise_range(image: PreparedImage, params: ExtractionParams) -> tuple[float, float]:
    """Lowest and highest rms (Jy/beam) of the noise map in the extraction region: an image's
    ``rms_min`` and ``rms_max`` (TraP's meaning), against which a later new source's significance is
    measured. The map is looked at every quarter box: a look at a blank pixel counts only with a pixel
    of data within half that (the map is extrapolated over blank areas; a blank look whose
    neighbouring looks are blank too counts as far from data), unless every look is at such a
    pixel. NaN when the region holds no finite rms."""
    if params.region_radius(image.shape) <= 0:  # the margins leave no pixel
        return math.nan, math.nan
    (ny, nx), m = image.shape, params.margin
    step_y = max(1, params.back_size_y // NOISE_LOOKS_PER_BOX)
    step_x = max(1, params.back_size_x // NOISE_LOOKS_PER_BOX)
    ys = np.unique(np.r_[np.arange(m, ny - m, step_y), ny - 1 - m])
    xs = np.unique(np.r_[np.arange(m, nx - m, step_x), nx - 1 - m])
    iy, ix = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    if params.radius > 0:  # the circle's edge too, a look every pixel
        (cx, cy), r = image.centre, params.region_radius(image.shape)
        angle = np.linspace(0.0, 2.0 * np.pi, max(8, int(2.0 * np.pi * r)), endpoint=False)
        iy = np.r_[iy, np.clip(np.rint(cy + r * np.sin(angle)), 0, ny - 1).astype(int)]
        ix = np.r_[ix, np.clip(np.rint(cx + r * np.cos(angle)), 0, nx - 1).astype(int)]
    inside = in_extraction_region(image.shape, params, ix, iy)
    data = np.isfinite(image.residual[iy, ix])
    blank = np.flatnonzero(inside & ~data)
    if blank.size:  # a blank look among blank looks is far from data; the others are looked around
        n_grid, grid = ys.size * xs.size, np.pad(data[: ys.size * xs.size].reshape(ys.size, xs.size), 1)
        beside = np.ones(data.size, bool)  # the circle's edge: looked around
        beside[:n_grid] = np.logical_or.reduce([grid[1 + dy : ys.size + 1 + dy, 1 + dx : xs.size + 1 + dx]
                                                for dy in (-1, 0, 1) for dx in (-1, 0, 1)]).ravel()
        near = np.zeros(blank.size, bool)
        ask = np.flatnonzero(beside[blank])
        for first in range(0, ask.size, _LOOKS_AT_ONCE):
            at = ask[first : first + _LOOKS_AT_ONCE]
            near[at] = _near_data(image.residual, iy[blank[at]], ix[blank[at]], step_y // 2, step_x // 2)
        far = blank[~near]
        if len(far) < inside.sum():
            inside[far] = False
    values = image.rms[iy[inside], ix[inside]]
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if values.size else (math.nan, math.nan)


#: Blank looks whose surroundings :func:`noise_range` tests at once (a few MB of work arrays).
_LOOKS_AT_ONCE = 4096


def _near_data(residual: np.ndarray, iy: np.ndarray, ix: np.ndarray, half_y: int, half_x: int) -> np.ndarray:
    """Per pixel (iy, ix): a pixel with data (finite ``residual``) within ``half_y`` rows and
    ``half_x`` columns of it."""
    ny, nx = residual.shape
    dy, dx = (a.ravel() for a in np.mgrid[-half_y : half_y + 1, -half_x : half_x + 1])
    rows = np.clip(iy[:, None] + dy, 0, ny - 1)
    cols = np.clip(ix[:, None] + dx, 0, nx - 1)
    return np.isfinite(residual[rows, cols]).any(axis=1)


#: Points along each side of the extraction region that :func:`extraction_outline` gives: joined by
#: great circles (straight lines of a gnomonic projection) they follow the pixel rows and columns of
#: any projection to 1/64 of a side's bend from a great circle (~0.5 px on the sides of a 30 deg SIN image).
OUTLINE_POINTS_PER_SIDE = 8


def extraction_outline(image: PreparedImage, params: ExtractionParams) -> np.ndarray:
    """(4 * OUTLINE_POINTS_PER_SIDE, 2) sky positions (ra, dec; deg) around the extraction region's
    rectangle (the image inside its margins m), from pixel (m, m) along the rows and columns on its
    edge: with ``xtr_radius``'s circle, what a later image's sources were covered by
    (trap_dask.newsource.covering_images). NaN when the region is no rectangle (its margins leave
    a pixel or less across) or a point of it is off the sky."""
    ny, nx = image.shape
    m, k = params.margin, OUTLINE_POINTS_PER_SIDE
    if 2 * m + 1 >= min(nx, ny):
        return np.full((4 * k, 2), np.nan)
    (x0, x1), (y0, y1), step = (m, nx - 1 - m), (m, ny - 1 - m), np.arange(k) / k
    x = np.concatenate([x0 + (x1 - x0) * step, np.full(k, x1), x1 - (x1 - x0) * step, np.full(k, x0)])
    y = np.concatenate([np.full(k, y0), y0 + (y1 - y0) * step, np.full(k, y1), y1 - (y1 - y0) * step])
    outline = np.column_stack(geo.pixel_to_sky(image.wcs, x, y))
    return outline if np.isfinite(outline).all() else np.full((4 * k, 2), np.nan)


def extraction_radius_deg(image: PreparedImage, params: ExtractionParams) -> float:
    """Radius (deg) of the circle around the centre that holds the extraction region (``xtr_radius``).

    It holds the circle of :meth:`ExtractionParams.region_radius` pixels around the centre (the
    half-diagonal inside the margins unless ``radius`` is set, so that sources in the corners count
    as covered): the largest distance on the sky from the centre to that circle's pixels on the
    sky, which differs from its pixels times the pixel size at the centre on a wide image (more on
    SIN or ZEA, less on TAN); that product where none of the circle is on the sky. Positions inside
    the circle but off the image are measured by nobody: :func:`forced_fit` gives them NaN.
    """
    pixels = params.region_radius(image.shape)
    (cx, cy), scale = image.centre, geo.pixel_scale(image.wcs, *image.centre)
    angle = np.linspace(0.0, 2.0 * np.pi, 360, endpoint=False)
    x, y = np.r_[cx, cx + pixels * np.cos(angle)], np.r_[cy, cy + pixels * np.sin(angle)]  # the centre first
    ra, dec = geo.pixel_to_sky(image.wcs, x, y)
    on_sky = np.isfinite(ra[1:]) & np.isfinite(dec[1:])
    if pixels <= 0 or not (np.isfinite(ra[0]) and np.isfinite(dec[0]) and on_sky.any()):
        return pixels * scale
    farthest = haversine(ra[0], dec[0], ra[1:][on_sky], dec[1:][on_sky]).max()
    return float(np.degrees(2.0 * np.arcsin(np.sqrt(np.clip(farthest, 0.0, 1.0)))))


def _pixel_set(image: PreparedImage, islands: Islands) -> tuple[PixelSet, np.ndarray]:
    """Island pixels for the fits, each island cropped to the pixels nearest its peak.

    Returns the pixel set and the analysis threshold / peak ratio per island (unitless).
    """
    nx = image.shape[1]
    flat, island = islands.flat, islands.island
    y, x = np.divmod(flat, nx)
    peak_y, peak_x = np.divmod(islands.peak_flat, nx)
    cap = int(MAX_ISLAND_BEAMS * 2.0 * np.pi * np.sqrt(np.linalg.det(image.beam_cov))) + 50
    if islands.counts.max() > cap:
        dist = np.square(x - peak_x[island]) + np.square(y - peak_y[island])
        order = np.lexsort((dist, island))
        rank = np.arange(len(order)) - islands.starts[island[order]]
        keep = order[rank < cap]
        flat, island, x, y = flat[keep], island[keep], x[keep], y[keep]
    residual = image.residual.ravel()
    pixels = PixelSet(
        x.astype(float),
        y.astype(float),
        residual[flat].astype(float),
        1.0 / np.square(image.rms.take(flat).astype(float)),
        island,
        np.searchsorted(island, np.arange(islands.n)),
    )
    return pixels, 1.0 / np.maximum(islands.peak_snr, 1e-12)


def any_finite(values: np.ndarray | NoiseMap, bands: int = 64) -> bool:
    """Whether a map has a finite value, looking at one band of rows after the other (the
    first band settles it for any but a blank image, without an image-sized mask)."""
    if isinstance(values, NoiseMap):
        return values.any_finite()
    return any(np.isfinite(band).any() for band in np.array_split(values, min(bands, len(values)) or 1))


@dataclass(frozen=True)
class Extraction:
    """What blind extraction found in an image."""

    sources: np.ndarray  #: SOURCE_DTYPE rows, every column filled
    #: (k, 3) islands left out as pixel artefacts (trap_dask.extraction.artefacts): x, y of the
    #: peak (0-based pixels) and its S/N
    artefacts: np.ndarray
    #: islands too small for the header's beam but kept: all the image's were (artefacts.beam_suspect)
    kept_too_small: int = 0


def extract_sources(image: PreparedImage, params: ExtractionParams) -> np.ndarray:
    """Detect and measure sources; returns SOURCE_DTYPE rows with every column filled."""
    return extract(image, params).sources


def extract(image: PreparedImage, params: ExtractionParams) -> Extraction:
    """Detect and measure sources, leaving out pixel artefacts (:mod:`.artefacts`) unless
    ``params.drop_pixel_artefacts`` is off."""
    if not any_finite(image.rms):
        return Extraction(empty_sources(), np.zeros((0, 3)))
    snr = snr_map(image.residual, image.rms)
    labelled, labels, islands = label_islands(snr, params.analysis_threshold, params.detection_threshold)
    artefact = (pixel_artefacts(islands, snr, params.analysis_threshold, image.beam_cov)
                if params.drop_pixel_artefacts else np.zeros(islands.n, dtype=bool))
    kept_too_small = 0
    if artefact.any() and beam_suspect(islands, artefact, params.analysis_threshold, image.beam_cov):
        # the beam is wrong, not the islands: all measured, as TraP would
        kept_too_small, artefact = int(artefact.sum()), np.zeros(islands.n, dtype=bool)
    y, x = np.divmod(islands.peak_flat[artefact], image.shape[1])
    artefacts = np.column_stack([x, y, islands.peak_snr[artefact]])
    if artefact.any():
        islands = islands.select(~artefact)
    return Extraction(_measure(image, params, snr, labelled, labels, islands),
                      artefacts[in_extraction_region(image.shape, params, x, y)], kept_too_small)


def _measure(image: PreparedImage, params: ExtractionParams, snr: SNR, labelled: np.ndarray, labels: np.ndarray,
             islands: Islands) -> np.ndarray:
    """SOURCE_DTYPE rows of the islands: deblended, fitted, in the extraction region."""
    parent = np.arange(islands.n)  # the island each component was deblended from
    if params.deblend_nthresh > 0 and islands.n:
        components = deblend(
            islands, snr, image.residual, params.analysis_threshold, params.deblend_nthresh,
            detection=params.detection_threshold,
        )
        split = islands_from_pixels(islands.flat, components, snr, params.analysis_threshold)
        peak_label = labels[np.searchsorted(labelled, islands.peak_flat)]  # every split peak lies in one
        island_of_label = np.zeros(peak_label.max() + 1, dtype=np.intp)
        island_of_label[peak_label] = np.arange(islands.n)
        parent = island_of_label[labels[np.searchsorted(labelled, split.peak_flat)]]
        islands = split
    if islands.n == 0:
        return empty_sources()
    # rings grow into blank-free pixels of no island (kept or not)
    islands = grow_into_background(islands, snr, params.analysis_threshold, FIT_RINGS)
    pixels, cut_ratio = _pixel_set(image, islands)
    fit, chisq, fitted = fit_islands(
        pixels, params.analysis_threshold * cut_ratio, image.beam_cov, params.force_beam
    )
    source = rejoined(parent, fit)
    components = np.bincount(parent)  # deblended components of each island
    if (source != np.arange(len(source))).any():
        source, islands, pixels, cut_ratio, joined, one_fits = _join(image, params, snr, islands, source, fit)
        one = np.unique(source)
        fit, chisq, fitted, parent = fit[one], chisq[one], fitted[one], parent[one]
        fit[joined], chisq[joined], fitted[joined] = one_fits
    keep = in_extraction_region(image.shape, params, fit[:, 1], fit[:, 2])
    siblings = _siblings(parent, fit, keep, image.beam_cov)
    sibling_fits = fit_point_pairs_on(_pair_pixels(pixels, siblings), np.ones(len(siblings), bool),
                                      image.rms, image.beam_cov, fit[siblings][:, :, 1:3])
    pixels = pixels.select(keep)
    fit, chisq, fitted = fit[keep], chisq[keep], fitted[keep]
    noise = local_noise(image, fit[:, 1], fit[:, 2])
    errors = measurement_errors(fit, fitted, pixels, noise, image.beam_cov, params.force_beam)
    nparam = 3 if params.force_beam else 6
    dof = np.maximum(pixels.counts - nparam, 1)
    rows = source_rows(image, params, fit, errors, noise, chisq, dof, fitted)
    # both parts of a sibling pair stay where their joint fit keeps them in the extraction region
    refitted = pair_rows(image, params, sibling_fits)
    ok = sibling_fits.ok & in_extraction_region(image.shape, params, refitted["x"], refitted["y"]).all(1)
    rows[(np.cumsum(keep) - 1)[siblings[ok]]] = refitted[ok]
    if params.force_beam or params.deblend_nthresh == 0:  # beam-shaped fits, or no deblending asked for
        return rows
    # islands the deblender left whole (a part of one it split has its neighbours measured apart)
    whole = fitted & (components[parent] == 1)[keep]
    split, hidden = hidden_pairs(pixels, fit, chisq, whole, image.rms, image.beam_cov, params.detection_threshold)
    parts = pair_rows(image, params, hidden)
    inside = in_extraction_region(image.shape, params, parts["x"], parts["y"]).all(1)
    return np.concatenate([np.delete(rows, split[inside]), parts[inside].ravel()])


def _joined(image: PreparedImage, snr: SNR, islands: Islands,
            source: np.ndarray) -> tuple[Islands, PixelSet, np.ndarray, np.ndarray]:
    """The (grown) islands with the parts of each source (:func:`~trap_dask.extraction.deblend.rejoined`)
    as one island, in the sources' order; their pixel set and analysis threshold / peak ratios
    (:func:`_pixel_set`: a large one is cropped around its brightest part's peak); and which
    islands are joined ones."""
    _, new_id, members = np.unique(source, return_inverse=True, return_counts=True)
    joined = islands_from_pixels(islands.flat, new_id[islands.island] + 1, snr, -np.inf)
    pixels, cut_ratio = _pixel_set(image, joined)
    return joined, pixels, cut_ratio, members >= 2


def _join(image: PreparedImage, params: ExtractionParams, snr: SNR, islands: Islands, source: np.ndarray,
          fit: np.ndarray) -> tuple[np.ndarray, Islands, PixelSet, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """The parts of each ``source`` joined (:func:`_joined`), except where one Gaussian fits the
    joined pixels worse than the parts' own Gaussians (each over its part's pixels) by more than
    ``JOIN_MAX_CHISQ`` per beam area of pixels: a point source on a resolved one's flank, not one
    source cut by noise. Returns the sources, :func:`_joined`'s four for them, and the one-Gaussian
    fits (params, chi-squared, fitted) of the joins kept, in their sources' order."""
    joined, pixels, cut_ratio, multi = _joined(image, snr, islands, source)
    candidates = pixels.select(multi)
    one_fit = fit_islands(candidates, params.analysis_threshold * cut_ratio[multi], image.beam_cov, params.force_beam)
    # the parts' model on the same pixels: each pixel under the Gaussian of the part it came from
    flat = np.rint(candidates.y).astype(np.int64) * image.shape[1] + np.rint(candidates.x).astype(np.int64)
    by_flat = np.argsort(islands.flat)
    part = islands.island[by_flat[np.searchsorted(islands.flat, flat, sorter=by_flat)]]
    by_part = np.argsort(part, kind="stable")
    parts, first = np.unique(part[by_part], return_index=True)
    part_pixels = PixelSet(candidates.x[by_part], candidates.y[by_part], candidates.value[by_part],
                           candidates.weight[by_part], np.searchsorted(parts, part[by_part]), first)
    parts_chisq = np.zeros(len(source))
    parts_chisq[parts] = gaussian_chisq(fit[parts], part_pixels)
    new_id = np.unique(source, return_inverse=True)[1]
    gain = one_fit[1] - np.bincount(new_id, parts_chisq)[multi]
    split = gain / (2.0 * np.pi * np.sqrt(np.linalg.det(image.beam_cov))) > JOIN_MAX_CHISQ
    if split.any():
        source = np.where(np.isin(new_id, np.flatnonzero(multi)[split]), np.arange(len(source)), source)
        joined, pixels, cut_ratio, multi = _joined(image, snr, islands, source)
    return source, joined, pixels, cut_ratio, multi, tuple(f[~split] for f in one_fit)


def _siblings(parent: np.ndarray, fit: np.ndarray, keep: np.ndarray, beam_cov: np.ndarray) -> np.ndarray:
    """(k, 2) islands that are the two parts of one deblended island, both kept, point-like
    (fitted axes at most ``SIBLING_MAX_EXTENT`` times the beam's) and at most
    ``SIBLING_MAX_SEPARATION`` beam FWHM apart. ``parent``: the island each was deblended from."""
    _, group, counts = np.unique(parent, return_inverse=True, return_counts=True)
    two = np.flatnonzero(counts[group.ravel()] == 2)
    pairs = two[np.argsort(group.ravel()[two], kind="stable")].reshape(-1, 2)
    major, minor, _ = geo.axes_from_cov(shape_cov(fit)) if len(pairs) else (np.zeros(0),) * 3
    beam_major, beam_minor, _ = geo.axes_from_cov(beam_cov[None])
    point_like = (major <= SIBLING_MAX_EXTENT * beam_major) & (minor <= SIBLING_MAX_EXTENT * beam_minor)
    fwhm = 2.0 * geo.HALF_FWHM_PER_SIGMA * beam_major[0]
    apart = np.hypot(*(fit[pairs[:, 0], 1:3] - fit[pairs[:, 1], 1:3]).T) if len(pairs) else np.zeros(0)
    chosen = (keep[pairs] & point_like[pairs]).all(1) & (apart <= SIBLING_MAX_SEPARATION * fwhm)
    return pairs[chosen]


def _pair_pixels(pixels: PixelSet, pairs: np.ndarray) -> PixelSet:
    """The pixels of both islands of each pair, one segment per pair."""
    member = np.full(len(pixels.starts), -1)
    member[pairs.ravel()] = np.repeat(np.arange(len(pairs)), 2)
    pick = np.flatnonzero(member[pixels.island] >= 0)
    pair = member[pixels.island[pick]]
    order = np.argsort(pair, kind="stable")
    pick, pair = pick[order], pair[order]
    return PixelSet(pixels.x[pick], pixels.y[pick], pixels.value[pick], pixels.weight[pick], pair,
                    np.searchsorted(pair, np.arange(len(pairs))))


def local_noise(image: PreparedImage, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """rms (Jy/beam) at the pixels nearest to (x, y), clipped to the image."""
    ny, nx = image.shape
    ix = np.clip(np.rint(x), 0, nx - 1).astype(int)
    iy = np.clip(np.rint(y), 0, ny - 1).astype(int)
    return image.rms[iy, ix].astype(float)


def source_rows(
    image: PreparedImage,
    params: ExtractionParams,
    fit: np.ndarray,
    errors: SourceErrors,
    noise: np.ndarray,
    chisq: np.ndarray,
    dof: np.ndarray,
    fitted: np.ndarray,
) -> np.ndarray:
    """SOURCE_DTYPE rows from pixel-frame measurements (A, x0, y0, a, b, c) and their errors."""
    rows = np.zeros(len(fit), dtype=SOURCE_DTYPE)
    if len(rows) == 0:
        return rows
    peak, x, y, cov = fit[:, 0], fit[:, 1], fit[:, 2], shape_cov(fit)
    ra, dec = geo.pixel_to_sky(image.wcs, x, y)
    jac = geo.local_jacobian(image.wcs, x, y)
    smaj, smin, pa = geo.shape_on_sky(geo.pixel_cov_to_sky(cov, jac))
    ra_err, dec_err, radius = geo.position_errors_on_sky(errors.pos_cov, jac, dec)
    rows["ra"], rows["dec"] = ra, dec
    rows["ra_fit_err"], rows["dec_fit_err"] = ra_err, dec_err
    rows["peak_flux"], rows["peak_flux_err"] = peak, errors.peak_err
    rows["int_flux"], rows["int_flux_err"] = errors.int_flux, errors.int_flux_err
    rows["significance_detection_level"] = peak / noise
    rows["semimajor_axis"], rows["semiminor_axis"], rows["parallactic_angle"] = smaj, smin, pa
    rows["error_radius"] = radius
    rows["gaussian_fit"] = fitted
    rows["chisq"], rows["reduced_chisq"] = chisq, chisq / dof
    rows["is_force_fit"] = False
    rows["x"], rows["y"] = x, y
    # the beam is the same in pixels everywhere: the source's shape less it, turned onto the sky where it lies
    set_intrinsic_shapes(rows, as_triples(geo.pixel_cov_to_sky(cov - image.beam_cov, jac) * 3600.0**2))
    return add_uncertainties(rows, params.ew_sys_err, params.ns_sys_err)


def pair_rows(image: PreparedImage, params: ExtractionParams, fits: PairFits) -> np.ndarray:
    """SOURCE_DTYPE rows (n, 2) of the components of joint pair fits (``peak_flux`` =
    ``int_flux``, the beam's shape, ``is_force_fit`` False); NaN fluxes where not ``fits.ok``."""
    n = len(fits.ok)
    rows = np.zeros((n, 2), dtype=SOURCE_DTYPE)
    rows["int_flux"] = rows["peak_flux"] = np.nan
    ok = fits.ok
    if not ok.any():
        return rows
    beam = np.tile(inverse_params(image.beam_cov[None]), (int(ok.sum()), 1))
    for k in (0, 1):
        part = slice(3 * k, 3 * k + 3)
        fit, cov = fits.params[ok, part], fits.cov[ok][:, part, part]
        peak_err = np.sqrt(cov[:, 0, 0])
        errors = SourceErrors(peak_err=peak_err, int_flux=fit[:, 0], int_flux_err=peak_err, pos_cov=cov[:, 1:, 1:])
        rows[ok, k] = source_rows(image, params, np.column_stack([fit, beam]), errors,
                                  local_noise(image, fit[:, 1], fit[:, 2]), fits.chisq[ok],
                                  np.maximum(fits.npix[ok] - 6, 1), np.ones(int(ok.sum()), bool))
    return rows
