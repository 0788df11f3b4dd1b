"""The survey simulator: noise statistics, rendered sources, headers and the truth file."""

from __future__ import annotations

import argparse
import math
from dataclasses import astuple, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from trap_dask.extraction.geometry import (
    HALF_FWHM_PER_SIGMA,
    beam_sky_cov,
    cov_from_axes,
    local_jacobian,
    sky_cov_to_pixel,
    sky_to_pixel,
)
from trap_dask.image import Beam, read_image, read_meta
from trap_dask.simulate import (
    SurveySpec,
    add_simulate_arguments,
    load_truth,
    render_gaussians,
    simulate_from_args,
    simulate_survey,
)

SPEC = SurveySpec(
    n_epochs=4, shape=(256, 300), freqs=(150e6, 170e6), n_steady=6, n_variable=3, n_transient=3,
    n_resolved=2, n_pairs=2, seed=7,
)


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_truth(simulate_survey(tmp_path_factory.mktemp("survey"), SPEC))


@pytest.fixture(scope="module")
def cube_survey(tmp_path_factory: pytest.TempPathFactory) -> dict:
    spec = SurveySpec(n_epochs=2, shape=(128, 128), freqs=(1.4e9,), bandwidth=1e7, n_steady=2, n_variable=0,
                      n_transient=0, n_resolved=0, n_pairs=0, cube=True, centre=(359.99, -60.0))
    return load_truth(simulate_survey(tmp_path_factory.mktemp("cube"), spec))


def _sky_cov(smaj: np.ndarray, smin: np.ndarray, pa: np.ndarray) -> np.ndarray:
    """(n, 2, 2) covariance in deg**2 (east, north) from semi-axes (arcsec) and PA (deg)."""
    sigma = lambda semi: semi / 3600.0 / HALF_FWHM_PER_SIGMA  # noqa: E731
    return cov_from_axes(sigma(smaj), sigma(smin), np.radians(90.0 - pa))


def _model(truth: dict, epoch: int, band: int) -> np.ndarray:
    """Noise-free image of one epoch and band rebuilt from the truth file alone."""
    src = truth["sources"]
    image = next(i for i in truth["images"] if (i["epoch"], i["band"]) == (epoch, band))
    _, wcs = read_image(read_meta(image["path"]))
    x, y = sky_to_pixel(wcs, src["ra_epoch"][:, epoch], src["dec_epoch"][:, epoch])
    cov = sky_cov_to_pixel(_sky_cov(src["smaj"], src["smin"], src["pa"]), local_jacobian(wcs, x, y))
    return render_gaussians(truth["spec"].shape, x, y, src["peak_flux"][:, epoch, band], cov)


def test_noise_level_and_correlation(tmp_path: Path) -> None:
    spec = SurveySpec(n_epochs=1, shape=(512, 512), n_steady=0, n_variable=0, n_transient=0, n_resolved=0,
                      n_pairs=0, rms=2e-3, beam=Beam(15 / 3600, 10 / 3600, 0.0))
    truth = load_truth(simulate_survey(tmp_path, spec))
    data, _ = read_image(read_meta(truth["images"][0]["path"]))
    assert data.std() == pytest.approx(2e-3, rel=0.03)
    assert abs(data.mean()) < 2e-4
    # the noise autocorrelation is the beam: exp(-d**2 / (2 sigma**2)) along each axis (PA = 0)
    sigma_x, sigma_y = (semi / HALF_FWHM_PER_SIGMA / spec.pixel_scale for semi in (10 / 3600, 15 / 3600))
    corr_x = np.corrcoef(data[:, 1:].ravel(), data[:, :-1].ravel())[0, 1]
    corr_y = np.corrcoef(data[1:].ravel(), data[:-1].ravel())[0, 1]
    assert corr_x == pytest.approx(math.exp(-0.5 / sigma_x**2), abs=0.02)
    assert corr_y == pytest.approx(math.exp(-0.5 / sigma_y**2), abs=0.02)
    assert corr_y > corr_x > 0.5


def test_files_and_headers(survey: dict) -> None:
    images = survey["images"]
    assert len(images) == SPEC.n_epochs * len(SPEC.freqs)
    assert {Path(i["path"]).name for i in images} == {
        f"epoch{e:03d}_band{b}.fits" for e in range(SPEC.n_epochs) for b in range(len(SPEC.freqs))
    }
    start = datetime(2024, 1, 1)
    for image in images:
        meta = read_meta(image["path"])
        assert meta.taustart_ts == start + timedelta(seconds=SPEC.cadence * image["epoch"])
        assert datetime.fromisoformat(image["time"]) == meta.taustart_ts
        assert (meta.freq_eff, meta.freq_bw) == (SPEC.freqs[image["band"]], SPEC.bandwidth) == (
            image["freq"], image["bandwidth"])
        assert astuple(meta.beam) == pytest.approx(astuple(SPEC.beam), rel=1e-12)
        assert meta.shape == SPEC.shape and meta.tau_time == SPEC.integration
        assert (meta.centre_ra, meta.centre_dec) == pytest.approx(SPEC.centre, abs=1e-9)
        assert meta.pixel_scale == pytest.approx(SPEC.pixel_scale, rel=1e-6)
        header = fits.getheader(image["path"])
        assert (header["CTYPE1"], header["CTYPE2"], header["BUNIT"], header["TELESCOP"]) == (
            "RA---SIN", "DEC--SIN", "JY/BEAM", "SIMULATED")
        assert fits.getdata(image["path"]).dtype == np.dtype(">f4")


def test_cube_output_reads_as_2d_plane(cube_survey: dict) -> None:
    for image in cube_survey["images"]:
        header = fits.getheader(image["path"])
        assert (header["NAXIS"], header["CTYPE3"], header["CTYPE4"]) == (4, "FREQ", "STOKES")
        assert "RESTFRQ" not in header
        meta = read_meta(image["path"])
        assert (meta.freq_eff, meta.freq_bw, meta.shape) == (1.4e9, 1e7, (128, 128))
        assert (meta.centre_ra, meta.centre_dec) == pytest.approx((359.99, -60.0), abs=1e-9)
        data, wcs = read_image(meta)
        assert data.shape == (128, 128) and wcs.naxis == 2
    ra = cube_survey["sources"]["ra"]
    assert np.all((ra >= 0) & (ra < 360))


def test_images_match_the_truth(survey: dict) -> None:
    rms = SPEC.rms
    for epoch, band in ((0, 0), (3, 1)):
        image = next(i for i in survey["images"] if (i["epoch"], i["band"]) == (epoch, band))
        data, _ = read_image(read_meta(image["path"]))
        residual = data - _model(survey, epoch, band)
        assert residual.std() == pytest.approx(rms, rel=0.05)
        assert np.abs(residual).max() < 6 * rms
        # a point source's brightest pixel is its flux (sampled within half a pixel of the peak)
        src = survey["sources"]
        points = np.flatnonzero((src["kind"] == "steady") & (src["peak_flux"][:, epoch, band] > 50 * rms))
        iy = np.rint(src["y"][points]).astype(int)
        ix = np.rint(src["x"][points]).astype(int)
        stamps = np.stack([data[y - 2 : y + 3, x - 2 : x + 3] for y, x in zip(iy, ix)])
        flux = src["peak_flux"][points, epoch, band]
        np.testing.assert_allclose(stamps.max(axis=(1, 2)), flux, rtol=0.1, atol=4 * rms)


def test_truth_fluxes_and_kinds(survey: dict) -> None:
    src = survey["sources"]
    kind, peak, rms = src["kind"], src["peak_flux"], SPEC.rms
    n_epochs, n_bands = SPEC.n_epochs, len(SPEC.freqs)
    assert peak.shape == src["int_flux"].shape == (len(kind), n_epochs, n_bands)
    assert list(np.unique(kind, return_counts=True)[1]) == [4, 2, 6, 3, 3]  # pair resolved steady transient variable
    np.testing.assert_array_equal(src["id"], np.arange(len(kind)))
    ratio = (SPEC.freqs[1] / SPEC.freqs[0]) ** SPEC.spectral_index
    np.testing.assert_allclose(peak[:, :, 1], peak[:, :, 0] * ratio)
    steady = np.isin(kind, ["steady", "pair", "resolved"])
    assert np.all(peak[steady].std(axis=1) == 0)
    assert np.all(peak[kind == "variable", :, 0].std(axis=1) / peak[kind == "variable", :, 0].mean(axis=1) > 0.05)
    low, high = SPEC.flux_range
    assert np.all((peak[steady, 0, 0] >= low * rms) & (peak[steady, 0, 0] <= high * rms))
    on = src["switch_on_epoch"]
    assert np.all(on[kind != "transient"] == -1)
    low, high = SPEC.transient_decay
    for i in np.flatnonzero(kind == "transient"):
        assert 1 <= on[i] < n_epochs
        assert np.all(peak[i, : on[i]] == 0)
        assert peak[i, on[i], 0] >= SPEC.transient_min_snr * rms
        # then an exponential fade with an e-folding time in the spec's range
        steps = peak[i, on[i] + 1 :, 0] / peak[i, on[i] : -1, 0]
        assert np.all((steps >= np.exp(-1 / low) - 1e-12) & (steps <= np.exp(-1 / high) + 1e-12))
        np.testing.assert_allclose(steps, steps[:1].repeat(len(steps)))
    # point sources: int = peak, beam-shaped; resolved: larger, int = peak * area ratio
    point = kind != "resolved"
    np.testing.assert_allclose(src["int_flux"][point], peak[point])
    np.testing.assert_allclose(src["smaj"][point], SPEC.beam.smaj * 3600)
    np.testing.assert_allclose(src["smin"][point], SPEC.beam.smin * 3600)
    np.testing.assert_allclose(src["pa"][point], SPEC.beam.pa)
    res = kind == "resolved"
    area = src["smaj"][res] * src["smin"][res] / (SPEC.beam.smaj * SPEC.beam.smin * 3600**2)
    assert np.all((src["smaj"][res] > 1.4 * SPEC.beam.smaj * 3600) & (src["smaj"][res] < 3.1 * SPEC.beam.smaj * 3600))
    np.testing.assert_allclose(src["int_flux"][res], peak[res] * area[:, None, None])


def test_rendered_integral_is_the_integrated_flux() -> None:
    cov = np.array([[[9.0, 2.0], [2.0, 4.0]], [[4.0, 0.0], [0.0, 4.0]]])
    image = render_gaussians((128, 128), np.array([40.3, 90.0]), np.array([60.7, 64.0]), np.array([2.0, 1.0]), cov)
    assert image[64, 90] == pytest.approx(1.0)
    left, right = image[:, :70].sum(), image[:, 70:].sum()
    assert left == pytest.approx(2.0 * 2 * np.pi * np.sqrt(np.linalg.det(cov[0])), rel=1e-4)
    assert right == pytest.approx(2 * np.pi * 2.0 * 2.0, rel=1e-4)


def test_geometry_of_the_field(survey: dict) -> None:
    src = survey["sources"]
    fwhm_pix = 2 * SPEC.beam.smaj / SPEC.pixel_scale
    ny, nx = SPEC.shape
    margin = SPEC.margin * fwhm_pix - np.where(src["kind"] == "pair", 1.5 * fwhm_pix, 0.0)  # pair: its centre
    assert np.all((src["x"] >= margin) & (src["x"] <= nx - 1 - margin))
    assert np.all((src["y"] >= margin) & (src["y"] <= ny - 1 - margin))
    pos = np.stack([src["x"], src["y"]], -1)
    dist = np.hypot(*(pos[:, None] - pos[None, :]).transpose(2, 0, 1))
    partner = src["partner"]
    pairs = np.flatnonzero(partner >= 0)
    assert np.all(partner[partner[pairs]] == pairs)
    sep = dist[pairs, partner[pairs]] / fwhm_pix
    assert np.all((sep >= 1.0 - 1e-9) & (sep <= 3.0 + 1e-9))
    unrelated = ~np.eye(len(pos), dtype=bool)
    unrelated[pairs, partner[pairs]] = False
    assert dist[unrelated].min() >= SPEC.min_separation * fwhm_pix
    # jitter: rms offset per coordinate = jitter * FWHM
    east = (src["ra_epoch"] - src["ra"][:, None]) * np.cos(np.radians(src["dec"][:, None]))
    north = src["dec_epoch"] - src["dec"][:, None]
    for offsets in (east, north):
        assert np.sqrt(np.mean(offsets**2)) / (SPEC.jitter * 2 * SPEC.beam.smaj) == pytest.approx(1.0, abs=0.3)


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    spec = SurveySpec(n_epochs=2, shape=(64, 64), n_steady=2, n_variable=1, n_transient=1, n_resolved=0,
                      n_pairs=0, margin=2.0, min_separation=3.0)
    first = simulate_survey(tmp_path / "a", spec)
    second = simulate_survey(tmp_path / "b", spec)
    simulate_survey(tmp_path / "c", replace(spec, seed=1))
    assert first.read_bytes() == second.read_bytes()
    for name in ("epoch000_band0.fits", "epoch001_band0.fits"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_transients_can_stay_on(tmp_path: Path) -> None:
    spec = SurveySpec(n_epochs=4, shape=(96, 96), n_steady=0, n_variable=0, n_transient=2, n_resolved=0,
                      n_pairs=0, margin=2.0, min_separation=3.0, transient_decay=(0.0, 0.0))
    src = load_truth(simulate_survey(tmp_path, spec))["sources"]
    for peak, on in zip(src["peak_flux"][:, :, 0], src["switch_on_epoch"]):
        assert np.all(peak[:on] == 0) and np.all(peak[on:] == peak[on]) and peak[on] >= 15 * spec.rms


def test_resolved_size_sets_the_intrinsic_major_axis(tmp_path: Path) -> None:
    """``resolved_size`` (intrinsic major, in beam majors): sources barely larger than the beam,
    at most sqrt(1 + 0.6**2) = 1.17 beam majors across, their integrated flux the
    peak times the area ratio."""
    spec = SurveySpec(n_epochs=1, shape=(512, 512), n_steady=0, n_variable=0, n_transient=0, n_resolved=30,
                      n_pairs=0, resolved_size=(0.3, 0.6), seed=3)
    src = load_truth(simulate_survey(tmp_path, spec))["sources"]
    intrinsic = _sky_cov(src["smaj"], src["smin"], src["pa"]) - beam_sky_cov(spec.beam)
    major = np.sqrt(np.linalg.eigvalsh(intrinsic)[:, 1]) / (spec.beam.smaj / HALF_FWHM_PER_SIGMA)
    assert np.all((major >= 0.3 - 1e-9) & (major <= 0.6 + 1e-9)) and major.max() - major.min() > 0.15
    assert np.all(src["smaj"] <= np.sqrt(1 + 0.6**2) * spec.beam.smaj * 3600 * (1 + 1e-9))
    area = src["smaj"] * src["smin"] / (spec.beam.smaj * spec.beam.smin * 3600**2)
    np.testing.assert_allclose(src["int_flux"][:, 0, 0], src["peak_flux"][:, 0, 0] * area)


def test_invalid_specs_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="transients need at least two epochs"):
        simulate_survey(tmp_path, SurveySpec(n_epochs=1))
    for decay in ((3.0, 1.0), (5.0, 0.0), (-1.0, -1.0), (1.0, math.inf), (math.nan, math.nan)):
        with pytest.raises(ValueError, match="transient_decay"):
            simulate_survey(tmp_path, SurveySpec(transient_decay=decay))
    with pytest.raises(ValueError, match="cannot place"):
        simulate_survey(tmp_path, SurveySpec(shape=(64, 64), n_steady=200))


def test_command_line(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_simulate_arguments(parser)
    help_text = parser.format_help()
    assert "--n_epochs" in help_text and "--n-epochs" in help_text and "(default: 10)" in help_text
    args = parser.parse_args([
        str(tmp_path), "--n-epochs", "2", "--shape", "96", "128", "--n_steady", "3", "--n-variable", "0",
        "--n-transient", "1", "--n-resolved", "0", "--n-pairs", "0", "--beam", "24", "12", "40",
        "--pixel-scale", "4", "--freqs", "120e6", "160e6", "--cube", "--margin", "3", "--min_separation", "4",
        "--transient-decay", "2", "3",
    ])
    simulate_from_args(args)
    truth = load_truth(tmp_path / "truth.json")
    spec = truth["spec"]
    assert (spec.n_epochs, spec.shape, spec.freqs, spec.cube) == (2, (96, 128), (120e6, 160e6), True)
    assert spec.transient_decay == (2.0, 3.0)
    assert spec.beam == Beam(smaj=12 / 3600, smin=6 / 3600, pa=40.0)
    assert spec.pixel_scale == pytest.approx(4 / 3600)
    assert len(truth["images"]) == 4 and len(truth["sources"]["id"]) == 4
    assert astuple(read_meta(truth["images"][-1]["path"]).beam) == pytest.approx(astuple(spec.beam), rel=1e-12)


def test_jitter_scale_moves_neighbours_together_and_keeps_the_rms(tmp_path):
    spec = SurveySpec(n_epochs=20, shape=(1024, 1024), n_steady=200, n_variable=0, n_transient=0,
                      n_resolved=0, n_pairs=20, jitter=0.3, jitter_scale=10.0)
    src = load_truth(simulate_survey(tmp_path, spec))["sources"]
    offset = (src["dec_epoch"] - src["dec"][:, None]) / (2.0 * spec.beam.smaj)  # beam FWHM
    assert 0.2 < offset.std() < 0.4
    first = np.flatnonzero(src["partner"] >= 0)
    pair = np.corrcoef(offset[first].ravel(), offset[src["partner"][first]].ravel())[0, 1]
    unrelated = np.corrcoef(offset[:100].ravel(), offset[100:200].ravel())[0, 1]
    assert pair > 0.9 and abs(unrelated) < 0.3


@pytest.mark.parametrize("flags, said", [
    (["--n_epochs", "0"], "n_epochs must be >= 1"), (["--shape", "4", "4"], "shape must be at least 16"),
    (["--rms", "-1"], "rms must be > 0"), (["--beam", "0", "0", "0"], "beam must have"),
    (["--centre", "400", "100"], "centre must be"), (["--freqs", "-5"], "freqs must be"),
    (["--cadence", "0"], "cadence must be > 0"), (["--start_time", "garbage"], "start_time 'garbage'"),
    (["--start_time", "now"], "start_time 'now'"), (["--cadence", "inf"], "cadence must be > 0"),
    (["--n_epochs", "1"], "transients need at least two epochs"), (["--flux_range", "5", "1"], "flux_range"),
    (["--shape", "64", "64"], "cannot place 33 sources"),
    (["--beam_scale", "1", "1e6"], "beam_scale must be"), (["--rms_scale", "2", "1"], "rms_scale must be"),
    (["--resolved_size", "0", "1"], "resolved_size must be"),
])
def test_a_survey_no_pipeline_could_read_is_refused_before_anything_is_written(tmp_path, capsys, flags, said):
    """Values a survey cannot have are one line and exit 2, and no folder is made (they were
    tracebacks, some after an empty folder; --freqs -5 and --cadence 0 wrote images the pipeline
    rejects)."""
    from trap_dask.cli import main

    assert main(["simulate", str(tmp_path / "out"), *flags]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_each_epoch_has_its_own_beam_and_noise(tmp_path: Path) -> None:
    """``beam_scale``/``rms_scale``: each image's header carries its epoch's beam, its noise is the
    epoch's, and its sources are the intrinsic shapes under that beam, with their integrated
    fluxes (the truth's ``peak_flux`` follows the beam; the image matches it)."""
    spec = replace(SPEC, freqs=(150e6,), beam_scale=(1.0, 2.0), rms_scale=(1.0, 3.0), n_resolved=4)
    truth = load_truth(simulate_survey(tmp_path, spec))
    src = truth["sources"]
    intrinsic = _sky_cov(src["smaj"], src["smin"], src["pa"]) - beam_sky_cov(spec.beam)
    scales = np.array([(i["beam_scale"], i["rms_scale"]) for i in truth["images"]])
    assert np.ptp(scales[:, 0]) > 0.2 and np.ptp(scales[:, 1]) > 0.5 and (scales >= 1.0).all()
    for image, (beam_scale, rms_scale) in zip(truth["images"], scales):
        meta = read_meta(image["path"])
        data, wcs = read_image(meta)
        assert meta.beam.smaj == pytest.approx(spec.beam.smaj * beam_scale)
        assert meta.beam.smin == pytest.approx(spec.beam.smin * beam_scale)
        beam = beam_sky_cov(meta.beam)
        epoch = image["epoch"]
        x, y = sky_to_pixel(wcs, src["ra_epoch"][:, epoch], src["dec_epoch"][:, epoch])
        cov = sky_cov_to_pixel(intrinsic + beam, local_jacobian(wcs, x, y))
        residual = data - render_gaussians(spec.shape, x, y, src["peak_flux"][:, epoch, 0], cov)
        assert residual.std() == pytest.approx(spec.rms * rms_scale, rel=0.1)
        assert np.abs(residual).max() < 6 * spec.rms * rms_scale
        area = np.sqrt(np.linalg.det(intrinsic + beam) / np.linalg.det(beam))
        np.testing.assert_allclose(src["peak_flux"][:, epoch, 0] * area, src["int_flux"][:, epoch, 0], rtol=1e-9)
