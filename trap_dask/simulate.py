"""Survey simulator: FITS images of a field with known sources, and a truth file.

Each epoch x band is one FITS image (``epochEEE_bandB.fits``) of Gaussian sources on correlated
noise. The noise is white noise convolved with a Gaussian kernel whose autocorrelation is the
restoring beam (the beam's covariance halved), scaled so that the expected per-pixel standard
deviation is ``rms``: neighbouring pixels are correlated over a beam, as in an interferometric
image. Point sources are the beam sampled at their sub-pixel positions, so their peak equals their
flux (Jy/beam); resolved sources are the beam convolved with an intrinsic Gaussian.

The truth file (``truth.json``) records the spec, every image and every source (see
:func:`simulate_survey`); :func:`load_truth` reads it back with numpy arrays.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import scipy.fft
from astropy.io import fits
from astropy.time import Time, TimeDelta
from astropy.wcs import WCS
from scipy.ndimage import map_coordinates
from scipy.spatial import cKDTree

from trap_dask.config import ConfigError
from trap_dask.extraction.geometry import (
    HALF_FWHM_PER_SIGMA,
    beam_sky_cov,
    cov_from_axes,
    local_jacobian,
    pixel_to_sky,
    shape_on_sky,
    sky_cov_to_pixel,
)
from trap_dask.image import Beam

TRUTH_NAME = "truth.json"
KINDS = ("steady", "variable", "transient", "resolved", "pair")
#: Stamps extend this many Gaussian sigmas from a source's centre.
STAMP_SIGMAS = 5.0


@dataclass(frozen=True)
class SurveySpec:
    """What to simulate.

    Attributes
    ----------
    n_epochs : number of epochs (observation times)
    shape : (ny, nx) pixels of every image
    pixel_scale : pixel size, deg
    centre : (ra, dec) of the image centre, deg
    beam : restoring beam (semi-axes = FWHM / 2 in deg, PA in deg east of north)
    rms : expected per-pixel noise standard deviation, Jy/beam
    freqs : centre frequency of each band, Hz (fluxes are drawn at ``freqs[0]``)
    bandwidth : bandwidth of every band, Hz
    spectral_index : alpha of every source, S ~ freq**alpha
    n_steady, n_variable, n_transient : point sources of each kind
    n_resolved : steady Gaussians, by default 1.5-3x the beam size (image plane; ``resolved_size``)
    n_pairs : pairs of steady point sources 1-3 beam FWHM apart (two sources each)
    resolved_size : (low, high) range of a resolved source's intrinsic major axis, in units of
        the beam's major axis, drawn uniform (its minor axis is 0.5-1x its major); its image-plane
        major is then about sqrt(1 + size**2) beams: 1.5-3 for the default (1.1, 2.8)
    flux_range : (low, high) peak flux at ``freqs[0]`` in units of ``rms``, drawn log-uniform
    transient_min_snr : a transient's peak flux (units of ``rms``) at switch-on is at least this
    transient_decay : (low, high) range of the transients' e-folding decay time after switch-on,
        epochs, drawn log-uniform (radio transients fade); (0, 0) keeps them on at full flux
    modulation : (low, high) range of the lognormal sigma of the variable sources' flux
    jitter : rms position offset per coordinate between epochs, in units of the beam FWHM
    jitter_scale : correlation length of the jitter on the sky, beam FWHM: 0 draws every
        source's offsets independently; > 0 shifts sources by a smooth random displacement
        field per epoch (Gaussian autocorrelation of this sigma), as an ionospheric phase screen
        does, so close neighbours move together
    min_separation : minimum distance between sources of different objects (a pair is one
        object; a resolved source's own extent beyond the beam is added), beam FWHM
    margin : minimum distance of a source (a pair's centre) from the image edge, beam FWHM
    beam_scale : (low, high) range of each epoch's beam size as a multiple of ``beam`` (both
        axes), drawn log-uniform per epoch: resolved sources keep their intrinsic shape and
        integrated flux, so their peak changes; (1, 1): every epoch has ``beam``
    rms_scale : (low, high) range of each epoch's noise as a multiple of ``rms``, drawn the same way
    cadence : time between epochs, s
    integration : integration time of an image, s (header EXPTIME)
    start_time : start of the first epoch, ISO UTC
    seed : random seed; the same spec gives byte-identical files
    cube : write 4-D (STOKES, FREQ, y, x) cubes with a FREQ axis instead of 2-D images with
        RESTFRQ/RESTBW
    """

    n_epochs: int = 10
    shape: tuple[int, int] = (512, 512)
    pixel_scale: float = 5.0 / 3600.0
    centre: tuple[float, float] = (150.0, 30.0)
    beam: Beam = Beam(smaj=15.0 / 3600.0, smin=10.0 / 3600.0, pa=30.0)
    rms: float = 1e-3
    freqs: tuple[float, ...] = (150e6,)
    bandwidth: float = 2e6
    spectral_index: float = -0.7
    n_steady: int = 20
    n_variable: int = 5
    n_transient: int = 3
    n_resolved: int = 3
    n_pairs: int = 2
    resolved_size: tuple[float, float] = (1.1, 2.8)
    flux_range: tuple[float, float] = (10.0, 200.0)
    transient_min_snr: float = 15.0
    transient_decay: tuple[float, float] = (1.0, 5.0)
    modulation: tuple[float, float] = (0.2, 0.5)
    jitter: float = 0.05
    jitter_scale: float = 0.0
    min_separation: float = 4.0
    margin: float = 3.0
    beam_scale: tuple[float, float] = (1.0, 1.0)
    rms_scale: tuple[float, float] = (1.0, 1.0)
    cadence: float = 86400.0
    integration: float = 600.0
    start_time: str = "2024-01-01T00:00:00"
    seed: int = 0
    cube: bool = False

    def __post_init__(self) -> None:
        """ValueError naming the first field that no survey (or no pipeline reading it) can have."""
        counts = ("n_steady", "n_variable", "n_transient", "n_resolved", "n_pairs")
        low, high = self.transient_decay
        problems = [
            (self.n_epochs >= 1, "n_epochs", "must be >= 1"),
            (self.n_transient == 0 or self.n_epochs >= 2, "n_transient",
             "needs n_epochs >= 2: transients need at least two epochs (they switch on at epoch >= 1)"),
            (min(self.shape) >= 16, "shape", "must be at least 16 x 16 pixels"),
            (0 < self.pixel_scale < 10, "pixel_scale", "must be a size > 0"),
            (-90 <= self.centre[1] <= 90 and np.isfinite(self.centre[0]), "centre",
             "must be an RA and a Dec in [-90, 90] deg"),
            (0 < self.beam.smin <= self.beam.smaj < 90, "beam", "must have a major >= minor axis > 0"),
            (0 < self.rms < np.inf, "rms", "must be > 0"),
            (0 < self.flux_range[0] <= self.flux_range[1] < np.inf, "flux_range", "must be 0 < LOW <= HIGH"),
            (0 < self.resolved_size[0] <= self.resolved_size[1] < np.inf, "resolved_size", "must be 0 < LOW <= HIGH"),
            (0 < self.beam_scale[0] <= self.beam_scale[1] and self.beam.smaj * self.beam_scale[1] < 90, "beam_scale",
             "must be 0 < LOW <= HIGH, with the beam times HIGH under 180 deg"),
            (0 < self.rms_scale[0] <= self.rms_scale[1] < np.inf, "rms_scale", "must be 0 < LOW <= HIGH"),
            ((low, high) == (0, 0) or 0 < low <= high < math.inf, "transient_decay",
             "must be 0 0 (no decay) or 0 < LOW <= HIGH (finite), in epochs"),
            (len(self.freqs) >= 1 and all(0 < f < np.inf for f in self.freqs), "freqs", "must be frequencies > 0 Hz"),
            (0 < self.bandwidth < np.inf, "bandwidth", "must be > 0 Hz"),
            (0 < self.cadence < np.inf, "cadence", "must be > 0 s (epochs in time order)"),
            (0 <= self.integration < np.inf, "integration", "must be >= 0 s"),
            (min(getattr(self, name) for name in counts) >= 0, "n_steady..n_pairs", "must be >= 0"),
        ]
        for ok, name, rule in problems:
            if not ok:
                raise ValueError(f"{name} {rule}")
        try:  # as the images' times are made
            Time(self.start_time, scale="utc").to_datetime()
        except (ValueError, TypeError):
            raise ValueError(f"start_time {self.start_time!r} must be an ISO date and time (UTC)") from None


@dataclass(frozen=True)
class _Catalogue:
    """True sources, columnar; shapes and positions in pixels of the (shared) image grid."""

    kind: np.ndarray  # (n,) str
    x: np.ndarray  # (n,) mean position, 0-based pixels
    y: np.ndarray
    dx: np.ndarray  # (n, n_epochs) jitter offsets, pixels
    dy: np.ndarray
    peak: np.ndarray  # (n, n_epochs, n_bands) Jy/beam
    area_ratio: np.ndarray  # (n,) source area / beam area: int_flux = peak * area_ratio
    cov_pix: np.ndarray  # (n, 2, 2) image-plane shape, pixel**2
    cov_sky: np.ndarray  # (n, 2, 2) image-plane shape, deg**2 (east, north)
    jac: np.ndarray  # (n, 2, 2) the WCS's local Jacobian at each source (sky <-> pixel covariances)
    switch_on: np.ndarray  # (n,) transient switch-on epoch, -1 for the others
    partner: np.ndarray  # (n,) id of the other source of a pair, -1 for the others


def simulate_survey(outdir: str | Path, spec: SurveySpec = SurveySpec()) -> Path:
    """Write the images of a simulated survey and its truth file; return the truth file path.

    Truth file (JSON): ``spec`` (the SurveySpec as a dict), ``images`` (one record per file:
    ``path`` relative to the truth file, ``epoch``, ``band``, ``time`` ISO UTC, ``freq`` and
    ``bandwidth`` in Hz) and ``sources``, columns of one entry per source:
    ``id``, ``kind`` (one of ``KINDS``), ``ra``, ``dec`` (deg, mean position), ``x``, ``y``
    (0-based pixels), ``ra_epoch``, ``dec_epoch`` (n, n_epochs: jittered positions, deg),
    ``peak_flux`` (n, n_epochs, n_bands, Jy/beam), ``int_flux`` (same shape, Jy),
    ``smaj``, ``smin`` (image-plane semi-axes = FWHM / 2 under ``spec.beam``, arcsec), ``pa`` (deg
    east of north); each image record also holds its epoch's ``beam_scale`` and ``rms_scale``;
    ``switch_on_epoch`` (transients; -1 otherwise), ``partner`` (pairs; -1 otherwise).
    """
    outdir = Path(outdir)
    # the last child draws each epoch's beam and noise scales: the others are as without it
    seeds = np.random.SeedSequence(spec.seed).spawn(2 + spec.n_epochs * len(spec.freqs))
    base_header = _celestial_header(spec)
    wcs = WCS(base_header)
    cat = _make_catalogue(spec, wcs, np.random.default_rng(seeds[0]))  # (ValueError if they cannot be placed)
    outdir.mkdir(parents=True, exist_ok=True)
    scales = np.random.default_rng(seeds[-1])
    beam_scale, rms_scale = (np.exp(scales.uniform(*np.log(span), spec.n_epochs)).tolist()
                             for span in (spec.beam_scale, spec.rms_scale))
    times = Time(spec.start_time, scale="utc") + TimeDelta(np.arange(spec.n_epochs) * spec.cadence, format="sec")
    digits = max(3, len(str(spec.n_epochs - 1)))
    images, peak, noise_filters = [], cat.peak.copy(), {}
    for epoch in range(spec.n_epochs):
        beam = Beam(spec.beam.smaj * beam_scale[epoch], spec.beam.smin * beam_scale[epoch], spec.beam.pa)
        epoch_spec = replace(spec, beam=beam, rms=spec.rms * rms_scale[epoch])
        if beam not in noise_filters:  # (one for all epochs of one beam: it costs more than the noise)
            noise_filters[beam] = _noise_filter(spec.shape, _beam_pixel_cov(epoch_spec, wcs) / 2.0)
        noise_filter = noise_filters[beam]
        cov_pix = cat.cov_pix
        if beam != spec.beam:  # the intrinsic shapes under this epoch's beam; the integrated fluxes stay
            cov_sky = cat.cov_sky + beam_sky_cov(beam) - beam_sky_cov(spec.beam)
            area_ratio = np.sqrt(np.linalg.det(cov_sky) / np.linalg.det(beam_sky_cov(beam)))
            peak[:, epoch] *= (cat.area_ratio / area_ratio)[:, None]
            cov_pix = sky_cov_to_pixel(cov_sky, cat.jac)
        for band, freq in enumerate(spec.freqs):
            rng = np.random.default_rng(seeds[1 + epoch * len(spec.freqs) + band])
            data = correlated_noise(spec.shape, noise_filter, epoch_spec.rms, rng)
            on = peak[:, epoch, band] != 0.0
            data += render_gaussians(
                spec.shape, cat.x[on] + cat.dx[on, epoch], cat.y[on] + cat.dy[on, epoch],
                peak[on, epoch, band], cov_pix[on],
            ).astype(np.float32)
            name = f"epoch{epoch:0{digits}d}_band{band}.fits"
            header = _image_header(epoch_spec, base_header, freq, times[epoch].isot)
            if spec.cube:
                data = data[np.newaxis, np.newaxis]
            fits.PrimaryHDU(data=data, header=header).writeto(outdir / name, overwrite=True)
            images.append(dict(path=name, epoch=epoch, band=band, time=times[epoch].isot,
                               freq=float(freq), bandwidth=float(spec.bandwidth),
                               beam_scale=beam_scale[epoch], rms_scale=rms_scale[epoch]))
    truth_path = outdir / TRUTH_NAME
    truth = dict(spec=asdict(spec), images=images, sources=_source_columns(cat, wcs, peak))
    truth_path.write_text(json.dumps(truth))
    return truth_path


def load_truth(path: str | Path) -> dict:
    """Read a truth file; image paths become absolute and source columns numpy arrays."""
    path = Path(path)
    truth = json.loads(path.read_text())
    for image in truth["images"]:
        image["path"] = str((path.parent / image["path"]).resolve())
    truth["sources"] = {key: np.asarray(value) for key, value in truth["sources"].items()}
    spec = dict(truth["spec"])
    spec["beam"] = Beam(**spec["beam"])
    truth["spec"] = SurveySpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    return truth


def correlated_noise(
    shape: tuple[int, int], noise_filter: np.ndarray, rms: float, rng: np.random.Generator
) -> np.ndarray:
    """Gaussian noise (float32, Jy/beam) of per-pixel std ``rms``, correlated by ``noise_filter``.

    ``noise_filter`` is the real FFT of a unit-norm convolution kernel (:func:`_noise_filter`), so
    filtering white unit noise keeps a unit per-pixel variance in expectation.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    spectrum = scipy.fft.rfft2(white, workers=-1)
    spectrum *= noise_filter
    noise = scipy.fft.irfft2(spectrum, s=shape, workers=-1, overwrite_x=True)
    noise *= rms
    return noise.astype(np.float32, copy=False)


def render_gaussians(
    shape: tuple[int, int], x: np.ndarray, y: np.ndarray, peak: np.ndarray, cov: np.ndarray
) -> np.ndarray:
    """Sum of elliptical Gaussians sampled at the pixel centres of a (ny, nx) image.

    Parameters
    ----------
    x, y : (n,) centres, 0-based pixels (sub-pixel values allowed)
    peak : (n,) peak values (Jy/beam)
    cov : (n, 2, 2) covariances in pixel**2 (x, y)

    Each source is evaluated on a square stamp reaching ``STAMP_SIGMAS`` of its widest sigma;
    sources are batched by stamp size and all stamps are summed with one ``np.bincount``.
    """
    ny, nx = shape
    half = np.ceil(STAMP_SIGMAS * np.sqrt(np.linalg.eigvalsh(cov)[:, 1])).astype(int)
    inv = np.linalg.inv(cov)
    indices, weights = [np.zeros(0, int)], [np.zeros(0)]
    for h in np.unique(half):
        sel = half == h
        offsets = np.arange(-h, h + 1)
        gx = np.rint(x[sel]).astype(int)[:, None] + offsets  # (m, w)
        gy = np.rint(y[sel]).astype(int)[:, None] + offsets
        ddx = (gx - x[sel, None])[:, None, :]  # (m, 1, w)
        ddy = (gy - y[sel, None])[:, :, None]  # (m, w, 1)
        a, b, c = (inv[sel, i, j][:, None, None] for i, j in ((0, 0), (0, 1), (1, 1)))
        values = peak[sel, None, None] * np.exp(-0.5 * (a * ddx**2 + 2.0 * b * ddx * ddy + c * ddy**2))
        inside = ((gy >= 0) & (gy < ny))[:, :, None] & ((gx >= 0) & (gx < nx))[:, None, :]
        indices.append((gy[:, :, None] * nx + gx[:, None, :])[inside])
        weights.append(values[inside])
    image = np.bincount(np.concatenate(indices), weights=np.concatenate(weights), minlength=ny * nx)
    return image.reshape(shape)


def _celestial_header(spec: SurveySpec) -> fits.Header:
    """SIN-projection celestial WCS with the reference pixel at the image centre."""
    ny, nx = spec.shape
    header = fits.Header()
    for axis, (ctype, crval, cdelt, n) in enumerate(
        (("RA---SIN", spec.centre[0], -spec.pixel_scale, nx), ("DEC--SIN", spec.centre[1], spec.pixel_scale, ny)), 1
    ):
        header[f"CTYPE{axis}"] = ctype
        header[f"CRVAL{axis}"] = float(crval)
        header[f"CDELT{axis}"] = float(cdelt)
        header[f"CRPIX{axis}"] = (n + 1) / 2.0
        header[f"CUNIT{axis}"] = "deg"
    header["RADESYS"] = "ICRS"
    return header


def _image_header(spec: SurveySpec, celestial: fits.Header, freq: float, time_iso: str) -> fits.Header:
    """Full header of one image: WCS, beam (FWHM, deg), time, frequency, units."""
    header = celestial.copy()
    if spec.cube:
        for key, value in (("CTYPE", "FREQ"), ("CRVAL", float(freq)), ("CDELT", float(spec.bandwidth)),
                           ("CRPIX", 1.0), ("CUNIT", "Hz")):
            header[f"{key}3"] = value
        for key, value in (("CTYPE", "STOKES"), ("CRVAL", 1.0), ("CDELT", 1.0), ("CRPIX", 1.0)):
            header[f"{key}4"] = value
    else:
        header["RESTFRQ"] = (float(freq), "[Hz] band centre frequency")
        header["RESTBW"] = (float(spec.bandwidth), "[Hz] bandwidth")
    header["BMAJ"] = (2.0 * spec.beam.smaj, "[deg] restoring beam major axis FWHM")
    header["BMIN"] = (2.0 * spec.beam.smin, "[deg] restoring beam minor axis FWHM")
    header["BPA"] = (spec.beam.pa, "[deg] restoring beam position angle")
    header["DATE-OBS"] = time_iso
    header["TIMESYS"] = "UTC"
    header["EXPTIME"] = (spec.integration, "[s] integration time")
    header["BUNIT"] = "JY/BEAM"
    header["BTYPE"] = "Intensity"
    header["TELESCOP"] = "SIMULATED"
    return header


def _beam_pixel_cov(spec: SurveySpec, wcs: WCS) -> np.ndarray:
    """Restoring-beam covariance (2, 2) in pixel**2 at the image centre."""
    ny, nx = spec.shape
    jac = local_jacobian(wcs, (nx - 1) / 2.0, (ny - 1) / 2.0)
    return sky_cov_to_pixel(beam_sky_cov(spec.beam)[np.newaxis], jac)[0]


def _noise_filter(shape: tuple[int, int], cov: np.ndarray) -> np.ndarray:
    """Real FFT of a unit-norm Gaussian kernel of covariance ``cov`` (pixel**2), centred at (0, 0).

    White noise filtered by it has an autocorrelation of covariance ``2 cov`` and unit variance.
    """
    ny, nx = shape
    dy = np.fft.fftfreq(ny, 1.0 / ny)[:, None]  # wrapped offsets 0, 1, ..., -1
    dx = np.fft.fftfreq(nx, 1.0 / nx)[None, :]
    a, b, c = np.linalg.inv(cov)[[0, 0, 1], [0, 1, 1]]
    kernel = np.exp(-0.5 * (a * dx**2 + 2.0 * b * dx * dy + c * dy**2))
    kernel /= np.sqrt(np.sum(kernel**2))
    return scipy.fft.rfft2(kernel).astype(np.complex64)


def _place(rng: np.random.Generator, radii: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(n, 2) uniform random centres in the box [low, high) for discs of the given radii.

    Two discs never overlap (centres at least ``r_i + r_j`` apart). Each round draws one candidate
    per unplaced disc, largest first, and keeps those that clash with no placed disc and no
    earlier candidate, so placed discs never move.
    """
    pos = np.full((len(radii), 2), np.nan)
    placed, todo = np.zeros(0, int), np.argsort(-radii, kind="stable")
    for _ in range(500):
        if todo.size == 0:
            return pos
        pos[todo] = rng.uniform(low, high, size=(todo.size, 2))
        ids = np.concatenate([placed, todo])
        pairs = cKDTree(pos[ids]).query_pairs(2.0 * radii.max(), output_type="ndarray")
        i, j = ids[pairs[:, 0]], ids[pairs[:, 1]]  # j comes later: always a candidate
        clash = np.hypot(*(pos[i] - pos[j]).T) < radii[i] + radii[j]
        ok = ~np.isin(todo, j[clash])
        placed, todo = np.concatenate([placed, todo[ok]]), todo[~ok]
    raise ValueError(
        f"cannot place {len(radii)} sources apart from each other in the image; "
        "use fewer sources, a larger image or a smaller min_separation"
    )


def _make_catalogue(spec: SurveySpec, wcs: WCS, rng: np.random.Generator) -> _Catalogue:
    """Draw shapes, positions and light curves of all sources."""
    ny, nx = spec.shape
    n_epochs = spec.n_epochs
    fwhm_pix = 2.0 * spec.beam.smaj / spec.pixel_scale
    counts = dict(steady=spec.n_steady, variable=spec.n_variable, transient=spec.n_transient,
                  resolved=spec.n_resolved)
    singles = np.repeat(list(counts), list(counts.values()))
    n_single, n_pairs = len(singles), spec.n_pairs
    kind = np.concatenate([singles, np.full(2 * n_pairs, "pair")])
    n = len(kind)

    # shapes: the beam, convolved with an intrinsic Gaussian for resolved sources
    beam_cov = beam_sky_cov(spec.beam)
    cov_sky = np.broadcast_to(beam_cov, (n, 2, 2)).copy()
    resolved = kind == "resolved"
    n_res = int(resolved.sum())
    beam_sigma = spec.beam.smaj / HALF_FWHM_PER_SIGMA
    major = rng.uniform(*spec.resolved_size, n_res) * beam_sigma
    minor = major * rng.uniform(0.5, 1.0, n_res)
    cov_sky[resolved] += cov_from_axes(major, minor, rng.uniform(0.0, np.pi, n_res))
    area_ratio = np.sqrt(np.linalg.det(cov_sky) / np.linalg.det(beam_cov))

    # positions: pairs are one object of two members 1-3 FWHM apart; an object's exclusion
    # radius grows with its extent, so sources of different objects are min_separation apart
    half_sep = rng.uniform(1.0, 3.0, n_pairs) * fwhm_pix / 2.0
    angle = rng.uniform(0.0, np.pi, n_pairs)
    extent = np.concatenate([(np.sqrt(area_ratio[:n_single]) - 1.0) * fwhm_pix, half_sep])
    margin = spec.margin * fwhm_pix
    centres = _place(rng, spec.min_separation * fwhm_pix / 2.0 + extent, np.array([margin, margin]),
                     np.array([nx - 1 - margin, ny - 1 - margin]))
    offset = half_sep[:, None] * np.stack([np.cos(angle), np.sin(angle)], -1)
    positions = np.vstack([centres[:n_single], centres[n_single:] + offset, centres[n_single:] - offset])
    x, y = positions[:, 0], positions[:, 1]
    partner = np.full(n, -1)
    first = n_single + np.arange(n_pairs)
    partner[first], partner[first + n_pairs] = first + n_pairs, first

    # light curves: peak flux (n, n_epochs, n_bands) in Jy/beam
    transient = kind == "transient"
    low, high = (np.where(transient, max(v, spec.transient_min_snr), v) for v in spec.flux_range)
    flux0 = spec.rms * np.exp(rng.uniform(np.log(low), np.log(high)))
    curve = np.ones((n, n_epochs))
    variable = kind == "variable"
    sigma = rng.uniform(*spec.modulation, size=(int(variable.sum()), 1))
    curve[variable] = np.exp(sigma * rng.standard_normal((len(sigma), n_epochs)) - sigma**2 / 2.0)
    switch_on = np.full(n, -1)
    switch_on[transient] = rng.integers(1, max(n_epochs, 2), int(transient.sum()))
    jitter = _jitter(rng, spec, x, y, fwhm_pix)
    curve[transient] = _transient_curves(rng, spec, switch_on[transient])
    spectrum = (np.asarray(spec.freqs) / spec.freqs[0]) ** spec.spectral_index
    peak = flux0[:, None, None] * curve[:, :, None] * spectrum

    jac = local_jacobian(wcs, x, y)
    return _Catalogue(
        kind=kind, x=x, y=y, dx=jitter[0], dy=jitter[1], peak=peak, area_ratio=area_ratio,
        cov_pix=sky_cov_to_pixel(cov_sky, jac), cov_sky=cov_sky, jac=jac, switch_on=switch_on, partner=partner,
    )


def _transient_curves(rng: np.random.Generator, spec: SurveySpec, switch_on: np.ndarray) -> np.ndarray:
    """(n, n_epochs) relative flux of transients: 0 before ``switch_on``, 1 at it, then an exponential
    decay with an e-folding time (epochs) drawn log-uniform from ``spec.transient_decay``."""
    epochs = np.arange(spec.n_epochs) - switch_on[:, None]
    low, high = spec.transient_decay
    if (low, high) == (0, 0):
        return (epochs >= 0).astype(float)
    decay = np.exp(rng.uniform(np.log(low), np.log(high), (len(switch_on), 1)))
    return np.where(epochs >= 0, np.exp(-np.maximum(epochs, 0) / decay), 0.0)


def _jitter(rng: np.random.Generator, spec: SurveySpec, x: np.ndarray, y: np.ndarray,
            fwhm_pix: float) -> np.ndarray:
    """(2, n, n_epochs) position offsets (pixels) of sources at (x, y) pixels, see ``jitter_scale``.

    A correlated field is drawn on a grid of a quarter correlation length, padded by four
    lengths against the FFT's wrap-around, and interpolated bilinearly to the sources.
    """
    n, sigma = len(x), spec.jitter * fwhm_pix
    if spec.jitter_scale <= 0:
        return rng.normal(0.0, sigma, size=(2, n, spec.n_epochs))
    step = spec.jitter_scale * fwhm_pix / 4.0
    grid = tuple(int(np.ceil(side / step)) + 17 for side in spec.shape)
    screen_filter = _noise_filter(grid, np.eye(2) * 4.0**2 / 2.0)
    coords = np.stack([y / step, x / step])
    fields = [map_coordinates(correlated_noise(grid, screen_filter, 1.0, rng), coords, order=1)
              for _ in range(2 * spec.n_epochs)]
    return sigma * np.stack(fields, -1).reshape(n, 2, spec.n_epochs).transpose(1, 0, 2)


def _source_columns(cat: _Catalogue, wcs: WCS, peak: np.ndarray) -> dict[str, list]:
    """The truth file's ``sources`` columns (JSON-ready lists); ``peak`` (n, n_epochs, n_bands,
    Jy/beam) under each epoch's beam."""
    n, n_epochs = cat.dx.shape
    ra, dec = pixel_to_sky(wcs, cat.x, cat.y)
    ra_e, dec_e = pixel_to_sky(wcs, (cat.x[:, None] + cat.dx).ravel(), (cat.y[:, None] + cat.dy).ravel())
    smaj, smin, pa = shape_on_sky(cat.cov_sky)
    columns = dict(
        id=np.arange(n), kind=cat.kind, ra=ra, dec=dec, x=cat.x, y=cat.y,
        ra_epoch=ra_e.reshape(n, n_epochs), dec_epoch=dec_e.reshape(n, n_epochs),
        peak_flux=peak, int_flux=cat.peak * cat.area_ratio[:, None, None],
        smaj=smaj, smin=smin, pa=pa, switch_on_epoch=cat.switch_on, partner=cat.partner,
    )
    return {key: np.asarray(value).tolist() for key, value in columns.items()}


# -- command line ---------------------------------------------------------------------------------

#: CLI flag -> (SurveySpec field, type, nargs, metavar, help with unit); beam and pixel scale are
#: given in arcsec on the command line (FWHM for the beam).
_FLAGS: dict[str, tuple[type, int | str | None, str | tuple[str, ...] | None, str]] = {
    "n_epochs": (int, None, "N", "number of epochs"),
    "shape": (int, 2, ("NY", "NX"), "image size, pixels"),
    "pixel_scale": (float, None, "ARCSEC", "pixel size, arcsec"),
    "centre": (float, 2, ("RA", "DEC"), "field centre, deg"),
    "beam": (float, 3, ("BMAJ", "BMIN", "BPA"), "restoring beam FWHM major, minor (arcsec) and PA (deg E of N)"),
    "rms": (float, None, "JY", "noise per pixel, Jy/beam"),
    "freqs": (float, "+", "HZ", "band centre frequencies, Hz"),
    "bandwidth": (float, None, "HZ", "bandwidth of each band, Hz"),
    "spectral_index": (float, None, "ALPHA", "spectral index of all sources (S ~ freq**alpha)"),
    "n_steady": (int, None, "N", "steady point sources"),
    "n_variable": (int, None, "N", "variable point sources"),
    "n_transient": (int, None, "N", "transients (off until a switch-on epoch >= 1, then fading)"),
    "n_resolved": (int, None, "N", "resolved steady sources (see --resolved_size)"),
    "resolved_size": (float, 2, ("LOW", "HIGH"), "range of the resolved sources' intrinsic major axis, times the "
                      "beam's (uniform; 1.1 2.8 makes them 1.5-3 beams across)"),
    "n_pairs": (int, None, "N", "close pairs of steady sources, 1-3 beams apart"),
    "flux_range": (float, 2, ("LOW", "HIGH"), "peak flux range, units of rms (log-uniform)"),
    "transient_min_snr": (float, None, "SNR", "minimum transient peak flux at switch-on, units of rms"),
    "transient_decay": (float, 2, ("LOW", "HIGH"),
                        "range of the transients' e-folding decay time, epochs (log-uniform; 0 0: no decay)"),
    "modulation": (float, 2, ("LOW", "HIGH"), "range of the variables' lognormal flux sigma"),
    "jitter": (float, None, "FWHM", "rms position jitter per coordinate between epochs, beam FWHM"),
    "jitter_scale": (float, None, "FWHM", "correlation length of the jitter on the sky, beam FWHM (0: independent)"),
    "min_separation": (float, None, "FWHM", "minimum separation of unrelated sources, beam FWHM"),
    "margin": (float, None, "FWHM", "minimum distance of sources from the image edge, beam FWHM"),
    "beam_scale": (float, 2, ("LOW", "HIGH"), "range of each epoch's beam size, times --beam (log-uniform)"),
    "rms_scale": (float, 2, ("LOW", "HIGH"), "range of each epoch's noise, times --rms (log-uniform)"),
    "cadence": (float, None, "S", "time between epochs, s"),
    "integration": (float, None, "S", "integration time of each image, s"),
    "start_time": (str, None, "ISO", "start time of the first epoch, ISO UTC"),
    "seed": (int, None, "SEED", "random seed"),
}


def _cli_default(name: str, spec: SurveySpec) -> object:
    """Default of a flag in its command-line unit."""
    if name == "pixel_scale":
        return spec.pixel_scale * 3600.0
    if name == "beam":
        return [2.0 * spec.beam.smaj * 3600.0, 2.0 * spec.beam.smin * 3600.0, spec.beam.pa]
    return getattr(spec, name)


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` arguments: OUTDIR and one flag per SurveySpec field.

    Every flag accepts both ``--n_epochs`` and ``--n-epochs`` spellings.
    """
    parser.add_argument("outdir", metavar="OUTDIR", help="directory for the FITS images and truth.json")
    defaults = SurveySpec()
    for name, (kind, nargs, metavar, text) in _FLAGS.items():
        default = _cli_default(name, defaults)
        shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in np.atleast_1d(default))
        spellings = dict.fromkeys((f"--{name}", f"--{name.replace('_', '-')}"))
        parser.add_argument(*spellings, dest=name, type=kind, nargs=nargs, metavar=metavar,
                            default=default, help=f"{text} (default: {shown})")
    parser.add_argument("--cube", action="store_true",
                        help="write 4-D cubes with FREQ and STOKES axes instead of 2-D images (default: 2-D)")


def simulate_from_args(args: argparse.Namespace) -> None:
    """Run :func:`simulate_survey` from parsed ``simulate`` arguments and report what was written."""
    values = {f.name: getattr(args, f.name) for f in fields(SurveySpec) if hasattr(args, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    values["pixel_scale"] = args.pixel_scale / 3600.0
    bmaj, bmin, bpa = args.beam
    values["beam"] = Beam(smaj=bmaj / 7200.0, smin=bmin / 7200.0, pa=bpa)
    try:
        spec = SurveySpec(**values)
        truth = simulate_survey(args.outdir, spec)
    except ValueError as exc:  # a spec no survey can have, or sources that do not fit
        raise ConfigError(f"simulate: {exc}") from None
    n_images = spec.n_epochs * len(spec.freqs)
    print(f"wrote {n_images} images and {truth}")
