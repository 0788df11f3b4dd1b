"""Source extraction on synthetic images with known sources, and on a real AMI-LA image.

The synthetic noise is correlated like the beam (as in synthesis images); the error pulls
(measured - true) / reported error must be centred on 0 with unit width.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from tests._synth import (
    Shape,
    correlated_noise,
    gaussians,
    make_wcs,
    match,
    robust_std,
    scattered_positions,
)
from trap_dask.extraction import forced
from trap_dask.extraction.extract import extract, extract_sources, extraction_radius_deg, noise_range, prepare_image
from trap_dask.extraction.forced import fit_beside_detections, fit_pairs, forced_fit
from trap_dask.extraction.params import ExtractionParams
from trap_dask.image import Beam
from trap_dask.sources import SOURCE_DTYPE

DATA = Path(__file__).parent / "data"
PIX = 5.0  # arcsec
BEAM = Shape(6.0, 4.0, 30.0)  # FWHM in pixels, PA deg
RMS = 1e-3
N = 768


def _pull_ok(pull: np.ndarray) -> bool:
    return abs(np.median(pull)) < 0.2 and 0.85 < robust_std(pull) < 1.2


def _dra(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a - b + 180.0) % 360.0 - 180.0


@pytest.fixture(scope="module")
def field():
    """High-dec field straddling RA = 0 with ~250 point sources of 10-60 sigma."""
    rng = np.random.default_rng(2024)
    wcs = make_wcs(N, N, 359.95, 70.0, PIX, "TAN")
    x, y = scattered_positions(250, (N, N), 35, 20, rng)
    peak = rng.uniform(10, 60, len(x)) * RMS
    data = correlated_noise((N, N), BEAM, RMS, rng) + gaussians((N, N), x, y, peak, BEAM.cov()) + 0.003
    params = ExtractionParams()
    image = prepare_image(data.astype(np.float32), wcs, BEAM.beam(PIX), params)
    ra, dec = wcs.pixel_to_world_values(x, y)
    return dict(image=image, params=params, x=x, y=y, peak=peak, ra=ra % 360, dec=dec, data=data, wcs=wcs,
                sources=extract_sources(image, params))


def test_finds_every_bright_source_and_little_else(field):
    s = field["sources"]
    assert s.dtype == SOURCE_DTYPE
    m = match(field["x"], field["y"], s["x"], s["y"], 2.0)
    assert (m >= 0).all()
    assert len(s) - len(np.unique(m)) <= 2  # spurious detections
    assert s["gaussian_fit"].mean() > 0.98
    assert (s["ra"] > 359).any() and (s["ra"] < 1).any()  # the field straddles RA = 0


def test_every_column_is_filled(field):
    s = field["sources"]
    for name in SOURCE_DTYPE.names:
        assert np.isfinite(s[name].astype(float)).all(), name
    assert ((s["ra"] >= 0) & (s["ra"] < 360)).all()
    assert (s["ra_fit_err"] > 0).all() and (s["dec_fit_err"] > 0).all()
    cosd = np.cos(np.radians(s["dec"]))
    # error_radius is the largest 1-sigma offset: at least the RA and Dec errors on the sky
    assert (s["error_radius"] >= 0.999 * 3600 * np.maximum(s["ra_fit_err"] * cosd, s["dec_fit_err"])).all()
    assert np.allclose(s["uncertainty_ew"], np.hypot(field["params"].ew_sys_err, s["error_radius"]) / 3600)
    assert np.allclose(s["significance_detection_level"], s["peak_flux"] / field["image"].rms[
        np.rint(s["y"]).astype(int), np.rint(s["x"]).astype(int)])
    assert not s["is_force_fit"].any()


def test_error_pulls_of_free_fits(field):
    s = field["sources"]
    m = match(field["x"], field["y"], s["x"], s["y"], 2.0)
    d = s[m]
    cosd = np.cos(np.radians(field["dec"]))
    pulls = {
        "peak": (d["peak_flux"] - field["peak"]) / d["peak_flux_err"],
        "int": (d["int_flux"] - field["peak"]) / d["int_flux_err"],
        "ra": _dra(d["ra"], field["ra"]) / d["ra_fit_err"],
        "dec": (d["dec"] - field["dec"]) / d["dec_fit_err"],
    }
    for name, pull in pulls.items():
        assert _pull_ok(pull), (name, np.median(pull), robust_std(pull))
    # ra_fit_err is along the RA coordinate: 1/cos(dec) = 2.9 times the on-sky error here
    assert np.median(d["ra_fit_err"] * cosd / d["dec_fit_err"]) == pytest.approx(1.0, abs=0.35)


def test_point_sources_have_the_beam_shape(field):
    s = field["sources"]
    beam = field["image"].beam
    assert np.median(s["semimajor_axis"]) == pytest.approx(beam.smaj * 3600, rel=0.03)
    assert np.median(s["semiminor_axis"]) == pytest.approx(beam.smin * 3600, rel=0.03)
    pa = np.median((s["parallactic_angle"] - beam.pa + 90) % 180 - 90)
    assert abs(pa) < 3.0


def test_forced_fits_at_sources_and_on_empty_sky(field):
    image, params = field["image"], field["params"]
    f = forced_fit(image, field["ra"], field["dec"], params)
    assert f.dtype == SOURCE_DTYPE and len(f) == len(field["ra"]) and f["is_force_fit"].all()
    assert _pull_ok((f["peak_flux"] - field["peak"]) / f["peak_flux_err"])
    assert np.allclose(f["int_flux"], f["peak_flux"])
    assert np.allclose(f["semimajor_axis"], image.beam.smaj * 3600)
    # empty sky: positions at least 4 beam FWHM from every source
    rng = np.random.default_rng(5)
    xe, ye = rng.uniform(15, N - 15, (2, 3000))
    far = np.hypot(xe[:, None] - field["x"], ye[:, None] - field["y"]).min(1) > 24
    ra, dec = field["wcs"].pixel_to_world_values(xe[far][:300], ye[far][:300])
    e = forced_fit(image, ra, dec, params)
    pull = e["peak_flux"] / e["peak_flux_err"]
    assert len(pull) >= 200 and _pull_ok(pull)
    assert np.median(e["peak_flux_err"]) == pytest.approx(RMS * np.sqrt(4 / 3), rel=0.1)  # not rms/sqrt(npix)


def test_forced_fit_of_resolved_sources_with_their_shape(monkeypatch):
    """Gaussians 1.5-3 beams across, force-fitted with their intrinsic shape (arcsec**2, east-north):
    the integrated flux comes out with honest errors, and the rows carry the shape fitted; with
    the beam's shape the same fits measure a fraction of it."""
    rng = np.random.default_rng(77)
    n = 768
    wcs = make_wcs(n, n, 150.0, 30.0, PIX, "SIN")
    x, y = scattered_positions(120, (n, n), 60, 40, rng)
    scale, turn = rng.uniform(1.5, 3.0, len(x)), rng.uniform(0, np.pi, len(x))
    # intrinsic shapes in pixels, then on the sky: x grows to the west, y to the north
    axes = np.stack([np.cos(turn), np.sin(turn)], -1)
    sigma = BEAM.fwhm_major / 2.3548 * scale
    intrinsic = (sigma**2)[:, None, None] * (np.einsum("ni,nj->nij", axes, axes) * 0.8 + 0.2 * np.eye(2))
    observed = BEAM.cov() + intrinsic
    area = np.sqrt(np.linalg.det(observed) / np.linalg.det(BEAM.cov()))
    integrated = rng.uniform(20, 80, len(x)) * RMS
    data = correlated_noise((n, n), BEAM, RMS, rng) + gaussians((n, n), x, y, integrated / area, observed)
    params = ExtractionParams()
    image = prepare_image(data.astype(np.float32), wcs, BEAM.beam(PIX), params)
    ra, dec = wcs.pixel_to_world_values(x, y)
    shape = PIX**2 * np.stack([intrinsic[:, 0, 0], -intrinsic[:, 0, 1], intrinsic[:, 1, 1]], -1)
    f = forced_fit(image, ra, dec, params, shape)
    assert _pull_ok((f["int_flux"] - integrated) / f["int_flux_err"])
    assert _pull_ok((f["peak_flux"] - integrated / area) / f["peak_flux_err"])
    fwhm = 2.0 * np.sqrt(2.0 * np.log(2.0)) * np.sqrt(np.linalg.eigvalsh(observed)) * PIX
    assert np.allclose(f["semimajor_axis"], fwhm[:, 1] / 2, rtol=0.01)
    assert np.allclose(f["semiminor_axis"], fwhm[:, 0] / 2, rtol=0.01)
    as_points = forced_fit(image, ra, dec, params)  # TraP 1.x: the beam's shape
    assert np.median(as_points["int_flux"] / integrated) < 0.6
    # a source without a shape (zeros), or of one not finite or wider than MAX_PROFILE_BEAMS beams
    # (a fit gone wrong), is fitted with the beam's, as without shapes
    odd = np.array([[0.0, 0.0, 0.0], [np.nan, 0.0, np.nan], [np.inf, 0.0, 1.0], [1e8, 0.0, 1e8], [1e300, 0, 1e300]])
    assert np.array_equal(forced_fit(image, ra[:5], dec[:5], params, odd), as_points[:5])
    # fitted in batches of cutouts of about one size (a batch's cutout is its widest: the same but for
    # the wings of the profile beyond +-1.5 FWHM), each as it is alone
    monkeypatch.setattr(forced, "MAX_BATCH_PIXELS", 5000)
    alone = np.concatenate([forced_fit(image, ra[i : i + 1], dec[i : i + 1], params, shape[i : i + 1])
                            for i in range(10)])
    np.testing.assert_allclose(forced_fit(image, ra[:10], dec[:10], params, shape[:10])["int_flux"],
                               alone["int_flux"], rtol=1e-4)


def test_forced_fit_off_image_or_blank_gives_nan(field):
    image = field["image"]
    blanked = prepare_image(np.where(np.arange(N) < 100, np.nan, field["data"]).astype(np.float32),
                            field["wcs"], image.beam, field["params"])
    ra, dec = field["wcs"].pixel_to_world_values(np.array([50.0, -40.0, 400.0]), np.array([300.0, 300.0, 400.0]))
    f = forced_fit(blanked, ra, dec, field["params"])
    assert np.isnan(f["peak_flux"][:2]).all() and np.isnan(f["peak_flux_err"][:2]).all()
    assert np.isfinite(f["peak_flux"][2]) and not f["gaussian_fit"][:2].any()


def test_margin_and_radius_exclusion(field):
    image, x, y = field["image"], field["x"], field["y"]
    for params, inside in [
        (ExtractionParams(margin=150), (x >= 150) & (x <= N - 151) & (y >= 150) & (y <= N - 151)),
        (ExtractionParams(radius=250.0), np.hypot(x - (N - 1) / 2, y - (N - 1) / 2) <= 250),
    ]:
        s = extract_sources(image, params)
        near_edge = np.abs(np.hypot(x - (N - 1) / 2, y - (N - 1) / 2) - 250) < 2 if params.radius else (
            np.minimum(np.abs(x - 150), np.abs(x - N + 151)) < 2) | (
            np.minimum(np.abs(y - 150), np.abs(y - N + 151)) < 2)
        m = match(x, y, s["x"], s["y"], 2.0)
        assert ((m >= 0) == inside)[~near_edge].all()
        assert len(s) <= inside.sum() + near_edge.sum() + 2
    radius_deg = extraction_radius_deg(image, ExtractionParams(radius=250.0))
    assert radius_deg == pytest.approx(250 * PIX / 3600, rel=1e-3)
    half_diagonal = np.hypot(N - 20, N - 20) / 2
    assert extraction_radius_deg(image, ExtractionParams(margin=10)) == pytest.approx(
        half_diagonal * PIX / 3600, rel=1e-3)


def test_noise_range_is_that_of_the_noise_map_in_the_extraction_region():
    """An image's rms_min and rms_max are the extremes of its noise map inside the margins and the
    radius (TraP's meaning), not those of its centre: noise rising towards the edges as under a primary
    beam (2x at the sides, 4x in the corners) gives a range of ~4, which a margin or a radius narrows."""
    rng = np.random.default_rng(8)
    n = 512
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    gain = np.exp(-0.5 * (x**2 + y**2) / (n / 2 / np.sqrt(2 * np.log(2))) ** 2)  # 0.5 at the sides
    data = (correlated_noise((n, n), BEAM, RMS, rng) / gain).astype(np.float32)
    image = prepare_image(data, make_wcs(n, n, 10.0, 10.0, PIX), BEAM.beam(PIX), ExtractionParams())
    for params in (ExtractionParams(), ExtractionParams(margin=100), ExtractionParams(radius=150.0)):
        inside = np.zeros((n, n), bool)
        inside[params.margin : n - params.margin, params.margin : n - params.margin] = True
        if params.radius:
            inside &= np.hypot(x, y) <= params.radius
        low, high = noise_range(image, params)
        assert low == pytest.approx(image.rms[inside].min(), rel=0.01), params
        assert high == pytest.approx(image.rms[inside].max(), rel=0.01), params
    assert noise_range(image, ExtractionParams())[1] > 3.0 * noise_range(image, ExtractionParams())[0]
    assert noise_range(image, ExtractionParams(radius=150.0))[1] < 0.5 * noise_range(image, ExtractionParams())[1]
    assert np.isnan(noise_range(image, ExtractionParams(margin=256))).all()


BLANKS = {  # blank pixels of a 512^2 image, by their distance (px) from its centre in x and y
    "outside a circle (a primary-beam cut)": lambda x, y: np.hypot(x, y) > 230,
    "a border of 1 px": lambda x, y: np.maximum(np.abs(x), np.abs(y)) > 254.5,
    "a border of 3 px": lambda x, y: np.maximum(np.abs(x), np.abs(y)) > 252.5,
    "every 7th pixel": lambda x, y: np.arange(x.size).reshape(x.shape) % 7 == 0,
}


@pytest.mark.parametrize("blank", BLANKS)
@pytest.mark.parametrize("noise", ["primary beam", "ramp"])
def test_noise_range_is_that_of_the_pixels_with_data(blank, noise):
    """Images with blank pixels, their noise rising towards the edges as under a primary beam (2x at
    the sides) or from one side to the other (1x to 3x): rms_min and rms_max are those of the
    noise map where the image has data, within 3% (TraP's noise map is masked where the image is
    blank). The map is extrapolated over blank areas: in the corners outside a primary-beam cut it
    is 8% above any pixel with data, which once made rms_max."""
    rng = np.random.default_rng(8)
    n = 512
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    fwhm = n / 2 / np.sqrt(2 * np.log(2))
    gain = np.exp(-0.5 * (x**2 + y**2) / fwhm**2) if noise == "primary beam" else 1.0 / (1.0 + 2.0 * (x + n / 2) / n)
    data = (correlated_noise((n, n), BEAM, RMS, rng) / gain).astype(np.float32)
    data[BLANKS[blank](x, y)] = np.nan
    image = prepare_image(data, make_wcs(n, n, 10.0, 10.0, PIX), BEAM.beam(PIX), ExtractionParams())
    seen = np.isfinite(data)
    low, high = noise_range(image, ExtractionParams())
    assert low == pytest.approx(image.rms[seen].min(), rel=0.03)
    assert high == pytest.approx(image.rms[seen].max(), rel=0.03)
    if noise == "primary beam" and blank.startswith("outside"):
        assert np.nanmax(image.rms) > 1.05 * high  # the blank corners, extrapolated


def test_margins_that_leave_no_pixel_leave_no_extraction_region():
    """A margin of half the image or more leaves nothing: no radius, whichever side is longer."""
    assert ExtractionParams(margin=256).region_radius((512, 1024)) == 0.0
    assert ExtractionParams(margin=300, radius=100.0).region_radius((1024, 512)) == 0.0
    assert ExtractionParams(margin=200).region_radius((512, 1024)) == pytest.approx(0.5 * np.hypot(112, 624))


def _resolved_field(seed: int, peak_snr: tuple[float, float], axis_ratio: tuple[float, float]) -> dict:
    """30 Gaussians of 1.5-3 beam sizes, peak S/N and minor/major ratio (relative to the beam's)
    drawn uniformly from the ranges given, south field (SIN, dec -30), 512^2 pixels."""
    rng = np.random.default_rng(seed)
    n = 512
    wcs = make_wcs(n, n, 150.0, -30.0, PIX, "SIN")
    x, y = scattered_positions(30, (n, n), 60, 40, rng)
    scale = rng.uniform(1.5, 3.0, len(x))
    pa = rng.uniform(0, 180, len(x))
    ratio = rng.uniform(*axis_ratio, len(x)) if axis_ratio[0] < axis_ratio[1] else np.full(len(x), axis_ratio[0])
    shapes = [Shape(BEAM.fwhm_major * s, BEAM.fwhm_minor * s * r, p) for s, r, p in zip(scale, ratio, pa)]
    covs = np.array([sh.cov() for sh in shapes])
    peak = (rng.uniform(*peak_snr, len(x)) if peak_snr[0] < peak_snr[1] else np.full(len(x), peak_snr[0])) * RMS
    data = correlated_noise((n, n), BEAM, RMS, rng) + gaussians((n, n), x, y, peak, covs)
    flux = peak * np.array([sh.fwhm_major * sh.fwhm_minor for sh in shapes]) / (BEAM.fwhm_major * BEAM.fwhm_minor)
    return dict(data=data.astype(np.float32), wcs=wcs, x=x, y=y, flux=flux, shapes=shapes, scale=scale)


@pytest.fixture(scope="module")
def resolved():
    """Resolved Gaussians of 1.5-3 beam sizes at peak S/N 100."""
    return _resolved_field(11, (100.0, 100.0), (0.8, 0.8))



@pytest.mark.parametrize("unit", [1e-5, 1e4])
def test_fits_do_not_depend_on_the_flux_unit(field, resolved, unit):
    """An image in other units (here its pixels times ``unit``: rms 1e-8 or 10 Jy/beam) gives the
    same sources, its fluxes times ``unit``: at rms 1e-7 Jy/beam the fits once stopped near their
    first guesses (sizes up to 7" off), the damping's floor set by the amplitude's curvature."""
    for sky, params in ((field, field["params"]), (resolved, ExtractionParams(back_size_x=128, back_size_y=128))):
        rows = [extract_sources(prepare_image(sky["data"].astype(np.float32) * np.float32(scale), sky["wcs"],
                                              BEAM.beam(PIX), params), params) for scale in (1.0, unit)]
        assert len(rows[0]) == len(rows[1]) >= 25 and rows[1]["gaussian_fit"].all()
        for name in ("ra", "dec"):
            assert np.abs(_dra(rows[1][name], rows[0][name])).max() * 3600 < 1e-4
        for name in ("semimajor_axis", "semiminor_axis"):
            np.testing.assert_allclose(rows[1][name], rows[0][name], rtol=1e-5)
        for name in ("peak_flux", "int_flux", "peak_flux_err", "int_flux_err"):
            np.testing.assert_allclose(rows[1][name] / unit, rows[0][name], rtol=1e-5)

def test_resolved_sources_flux_and_shape(resolved):
    params = ExtractionParams(back_size_x=128, back_size_y=128)
    image = prepare_image(resolved["data"], resolved["wcs"], BEAM.beam(PIX), params)
    s = extract_sources(image, params)
    m = match(resolved["x"], resolved["y"], s["x"], s["y"], 2.0)
    assert (m >= 0).all() and len(s) == len(resolved["x"])  # none cut in two (blends.hidden_pairs)
    d = s[m]
    assert d["gaussian_fit"].all()
    assert np.abs(d["int_flux"] / resolved["flux"] - 1).max() < 0.05
    smaj = np.array([sh.fwhm_major for sh in resolved["shapes"]]) * PIX / 2
    smin = np.array([sh.fwhm_minor for sh in resolved["shapes"]]) * PIX / 2
    assert np.abs(d["semimajor_axis"] / smaj - 1).max() < 0.1
    assert np.abs(d["semiminor_axis"] / smin - 1).max() < 0.1
    pa_true = np.array([sh.pa for sh in resolved["shapes"]])
    assert np.abs((d["parallactic_angle"] - pa_true + 90) % 180 - 90).max() < 5


def test_force_beam_keeps_the_beam_shape(resolved):
    params = ExtractionParams(force_beam=True, back_size_x=128, back_size_y=128)
    beam = BEAM.beam(PIX)
    s = extract_sources(prepare_image(resolved["data"], resolved["wcs"], beam, params), params)
    assert len(s) >= len(resolved["x"])
    assert np.allclose(s["semimajor_axis"], beam.smaj * 3600, rtol=2e-3)
    assert np.allclose(s["semiminor_axis"], beam.smin * 3600, rtol=2e-3)
    assert np.allclose(s["int_flux"], s["peak_flux"], rtol=2e-3)


def test_deblending_separates_a_close_pair():
    rng = np.random.default_rng(3)
    n = 128
    wcs = make_wcs(n, n, 30.0, 45.0, PIX)
    sep = 1.5 * BEAM.fwhm_major  # 1.5 beams, along the beam's major axis (PA 30)
    t = np.radians(BEAM.pa)
    x = 64 + np.array([-0.5, 0.5]) * sep * -np.sin(t)
    y = 64 + np.array([-0.5, 0.5]) * sep * np.cos(t)
    data = correlated_noise((n, n), BEAM, RMS, rng) + gaussians((n, n), x, y, np.array([80, 60]) * RMS, BEAM.cov())
    plain = ExtractionParams(deblend_nthresh=0)
    image = prepare_image(data.astype(np.float32), wcs, BEAM.beam(PIX), plain)
    assert len(extract_sources(image, plain)) == 1
    s = extract_sources(image, ExtractionParams(deblend_nthresh=32))
    assert len(s) == 2
    m = match(x, y, s["x"], s["y"], 1.0)
    assert sorted(m) == [0, 1]
    assert np.allclose(s["peak_flux"][m], [0.080, 0.060], rtol=0.1)


def test_deblending_keeps_a_wing_bump_below_the_detection_threshold_in_its_source():
    n = 128
    wcs = make_wcs(n, n, 30.0, 45.0, PIX)
    t = np.radians(BEAM.pa)
    noise = correlated_noise((n, n), BEAM, RMS, np.random.default_rng(5))
    counts = []
    # companions along the major axis: S/N 7 at 1.8 beams (one island with the 80-sigma source at
    # the analysis threshold, its peak below the detection threshold), S/N 20 at 1.5 beams
    for companion, beams in ((7.0, 1.8), (20.0, 1.5)):
        sep = beams * BEAM.fwhm_major
        x, y = 64 + np.array([0.0, sep * -np.sin(t)]), 64 + np.array([0.0, sep * np.cos(t)])
        data = noise + gaussians((n, n), x, y, np.array([80.0, companion]) * RMS, BEAM.cov())
        for nthresh in (0, 32):
            params = ExtractionParams(deblend_nthresh=nthresh)
            image = prepare_image(data.astype(np.float32), wcs, BEAM.beam(PIX), params)
            counts.append(len(extract_sources(image, params)))
    assert counts == [1, 1, 1, 2]


def test_all_nan_image_gives_an_empty_table():
    wcs = make_wcs(64, 64, 10.0, 10.0, PIX)
    params = ExtractionParams()
    image = prepare_image(np.full((64, 64), np.nan, dtype=np.float32), wcs, BEAM.beam(PIX), params)
    s = extract_sources(image, params)
    assert s.dtype == SOURCE_DTYPE and len(s) == 0
    f = forced_fit(image, np.array([10.0]), np.array([10.0]), params)
    assert len(f) == 1 and np.isnan(f["peak_flux"][0])


def test_islands_measured_in_batches_as_in_one(field, monkeypatch):
    """A crowded image's islands are fitted and given errors in batches of MAX_BATCH_PIXELS pixels
    (bounded memory): the same fits, and errors to rounding, as all islands at once."""
    from trap_dask.extraction import gaussian

    calls = []
    real = gaussian.levenberg_marquardt
    monkeypatch.setattr(gaussian, "levenberg_marquardt", lambda p0, *a, **k: calls.append(len(p0)) or real(p0, *a, **k))
    monkeypatch.setattr(gaussian, "MAX_BATCH_PIXELS", 4000)
    batched = extract_sources(field["image"], field["params"])
    assert len(calls) > 5 and sum(calls) >= len(batched)
    whole = field["sources"]
    for name in ("ra", "dec", "peak_flux", "int_flux", "semimajor_axis", "chisq"):
        assert np.array_equal(batched[name], whole[name]), name
    for name in ("ra_fit_err", "dec_fit_err", "peak_flux_err", "int_flux_err"):
        np.testing.assert_allclose(batched[name], whole[name], rtol=1e-12, err_msg=name)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_corrupt_block_of_1e30_pixels_gets_finite_errors():
    """A block of corrupt pixels (1e30 Jy/beam) large enough not to be cut as a pixel artefact
    overflows the fit covariance's float32 sums: its detection takes Condon's errors, finite, so its
    catalogue position stays a number. A small block (3 x 3) and a block of infinite pixels are left
    out as artefacts. None of them fills the log with numpy's warnings."""
    rng = np.random.default_rng(5)
    wcs = make_wcs(128, 128, 10.0, 10.0, PIX)
    data = correlated_noise((128, 128), BEAM, RMS, rng) + gaussians((128, 128), np.array([40.0]), np.array([40.0]),
                                                                    np.array([30 * RMS]), BEAM.cov())
    data[70:90, 70:90] = 1e30
    data[100:103, 20:23] = 1e30
    data[20:23, 100:103] = np.inf
    params = ExtractionParams()
    found = extract(prepare_image(data.astype(np.float32), wcs, BEAM.beam(PIX), params), params)
    rows = found.sources
    corrupt = rows[rows["peak_flux"] > 1e20]
    assert len(corrupt) == 1 and len(rows) == 2 and 70 < corrupt["x"][0] < 90
    cut = found.artefacts[np.argsort(found.artefacts[:, 0])]  # the small 1e30 block, then the infinite one
    assert len(cut) == 2 and (np.abs(cut[:, :2] - [[21, 101], [101, 21]]) <= 1).all()
    for name in ("ra", "dec", "ra_fit_err", "dec_fit_err", "peak_flux_err", "int_flux_err", "error_radius"):
        assert np.isfinite(rows[name]).all(), name


@pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")
def test_real_ami_image():
    path = DATA / "GRB120422A-120429.fits"
    with fits.open(path) as hdul:
        header, data = hdul[0].header, hdul[0].data[0, 0]
    beam = Beam(header["BMAJ"] / 2, header["BMIN"] / 2, header["BPA"])
    params = ExtractionParams(detection_threshold=5.0)
    image = prepare_image(data, WCS(header), beam, params)
    s = extract_sources(image, params)
    assert 1 <= len(s) < 100
    assert np.isfinite(s["peak_flux"]).all() and (s["peak_flux"] > 0).all()
    assert (s["peak_flux_err"] > 0).all() and (s["peak_flux"] / s["peak_flux_err"] > 3).all()
    assert (s["peak_flux"] < 1.0).all()  # Jy/beam: AMI sources in this field are mJy
    # the noise map is the per-pixel noise of the central region
    centre = data[156:356, 156:356]
    assert np.median(image.rms) == pytest.approx(1.4826 * np.median(np.abs(centre - np.median(centre))), rel=0.3)
    # fitted shapes are at least about the beam
    assert (s["semimajor_axis"][s["gaussian_fit"]] > 0.7 * beam.smaj * 3600).all()
    assert np.allclose(s["ra"], 136.91, atol=0.5) and np.allclose(s["dec"], 14.02, atol=0.5)


def _island_pixels(centres: np.ndarray, half: int, rng: np.random.Generator):
    """A PixelSet of square islands of side 2 * half + 1 around integer centres, unit-ish weights."""
    from trap_dask.extraction.gaussian import PixelSet

    dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
    x = (centres[:, :1] + dx.ravel()).ravel().astype(float)
    y = (centres[:, 1:] + dy.ravel()).ravel().astype(float)
    island = np.repeat(np.arange(len(centres)), dx.size)
    weight = rng.uniform(0.5, 2.0, len(x))
    return PixelSet(x, y, rng.normal(size=len(x)), weight, island, np.arange(len(centres)) * dx.size)


def _ragged_islands(centres: np.ndarray, half: int, rng: np.random.Generator):
    """:func:`_island_pixels` with ~15% of each island's pixels left out (its first kept)."""
    from trap_dask.extraction.gaussian import PixelSet

    full = _island_pixels(centres, half, rng)
    keep = rng.uniform(size=len(full.x)) < 0.85
    keep[full.starts] = True
    return PixelSet(*(v[keep] for v in (full.x, full.y, full.value, full.weight, full.island)),
                    np.searchsorted(full.island[keep], np.arange(len(centres))))


def _dense_sandwich(pixels, island: int, jac: np.ndarray, beam_cov: np.ndarray, prior=0.0) -> np.ndarray:
    """The beam-correlated sandwich covariance of one island from its Jacobian (npix, k), summed
    over every pair of its pixels."""
    sel = pixels.island == island
    x, y = pixels.x[sel], pixels.y[sel]
    lag = np.stack([x[:, None] - x, y[:, None] - y], -1)
    rho = np.exp(-0.5 * np.einsum("ijk,kl,ijl->ij", lag, np.linalg.inv(beam_cov), lag))
    scaled = np.sqrt(pixels.weight[sel])[:, None] * jac
    h_inv = np.linalg.inv(scaled.T @ scaled + prior)
    return h_inv @ scaled.T @ rho @ scaled @ h_inv


def test_gram_matrices_match_dense_sums_for_small_and_large_islands():
    """FFT beam-correlated sums (float32: small islands, float64: large) against dense ones."""
    from trap_dask.extraction.gaussian import _FLOAT64_MIN_PIXELS, PixelSet, _gram_matrices

    rng = np.random.default_rng(5)
    full = _island_pixels(np.array([[20, 30], [80, 64], [150, 40]]), 12, rng)  # 625 pixels each
    keep = rng.uniform(size=len(full.x)) < np.where(full.island == 0, 0.3, 0.8)  # irregular islands
    keep[full.starts] = True
    pixels = PixelSet(*(v[keep] for v in (full.x, full.y, full.value, full.weight, full.island)),
                      np.searchsorted(full.island[keep], np.arange(3)))
    counts = np.diff(np.append(pixels.starts, len(pixels.x)))
    assert counts[0] <= _FLOAT64_MIN_PIXELS < counts[1:].min()  # both precisions are exercised
    beam_cov = BEAM.cov()
    vectors = rng.normal(size=(len(pixels.x), 4))
    plain, correlated = _gram_matrices(vectors, pixels, beam_cov)
    beam_inv = np.linalg.inv(beam_cov)
    for i in range(3):
        sel = pixels.island == i
        v, x, y = vectors[sel], pixels.x[sel], pixels.y[sel]
        lag = np.stack([x[:, None] - x, y[:, None] - y], -1)
        rho = np.exp(-0.5 * np.einsum("ijk,kl,ijl->ij", lag, beam_inv, lag))
        assert np.allclose(plain[i], v.T @ v, rtol=1e-5, atol=1e-5 * np.abs(v.T @ v).max())
        dense = v.T @ rho @ v
        assert np.allclose(correlated[i], dense, rtol=1e-4, atol=1e-5 * np.abs(dense).max())


@pytest.mark.parametrize("sigmas", [(5.0, 1.0, 90.0), (2.0, 1.5, 0.0), (3.0, 1.5, 17.0)])
def test_gram_matrices_of_small_islands_under_wide_beams_match_dense_sums(sigmas):
    """A grid smaller than the beam cuts it off, and its transform dips below zero: those terms
    count with their sign (clipped to zero they put the sums 3e-4 to 1e-3 off here)."""
    from trap_dask.extraction.gaussian import PixelSet, _gram_matrices

    major, minor, angle = sigmas
    turn = np.deg2rad(angle)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    beam_cov = rotation @ np.diag([major**2, minor**2]) @ rotation.T
    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[0:5, 0:7]
    x, y = xx.ravel() + 100.0, yy.ravel() + 40.0
    pixels = PixelSet(x, y, np.zeros(len(x)), np.ones(len(x)), np.zeros(len(x), int), np.array([0]))
    vectors = rng.normal(size=(len(x), 3)) + 2.0
    _, correlated = _gram_matrices(vectors, pixels, beam_cov)
    lag = np.stack([x[:, None] - x, y[:, None] - y], -1)
    rho = np.exp(-0.5 * np.einsum("ijk,kl,ijl->ij", lag, np.linalg.inv(beam_cov), lag))
    dense = vectors.T @ rho @ vectors
    assert np.abs(correlated[0] - dense).max() < 1e-5 * np.abs(dense).max()


def test_fft_grids_hold_their_islands_in_few_fast_sizes():
    """Grid sizes hold the cells asked for, are FFT-friendly (2^a 3^b 5^c) and come in few sizes."""
    from trap_dask.extraction.gaussian import _grid_size

    cells = np.append(np.arange(1, 3001), 10**8 + 7)
    sizes = _grid_size(cells)
    assert (sizes >= cells).all()
    for size in np.unique(sizes):
        for factor in (2, 3, 5):
            while size % factor == 0:
                size //= factor
        assert size == 1
    assert len(np.unique(sizes[:-1])) <= 32  # of the 123 fast lengths up to 3000


def test_normal_equations_and_fit_covariance_match_direct_sums():
    """The batched shortcuts (monomial moments, exp-factorised beam correlation) against dense sums."""
    from trap_dask.extraction.gaussian import _linearise, fit_covariance

    rng = np.random.default_rng(11)
    pixels = _island_pixels(np.array([[20, 30], [60, 64], [100, 40]]), 6, rng)
    beam_cov = BEAM.cov()
    inv = np.linalg.inv(np.array([[4.0, 1.0], [1.0, 3.0]]))
    params = np.array([[a, cx + 0.3, cy - 0.2, inv[0, 0], inv[0, 1], inv[1, 1]]
                       for a, (cx, cy) in zip([1.0, 2.0, 0.5], [[20, 30], [60, 64], [100, 40]])])

    def model(p, i):
        sel = pixels.island == i
        dx, dy = pixels.x[sel] - p[1], pixels.y[sel] - p[2]
        return p[0] * np.exp(-0.5 * (p[3] * dx * dx + 2 * p[4] * dx * dy + p[5] * dy * dy)), sel

    jtj, grad, chisq = _linearise(params, pixels, None)
    cov = fit_covariance(params, pixels, beam_cov, False)
    beam_inv = np.linalg.inv(beam_cov)
    for i, p in enumerate(params):
        m, sel = model(p, i)
        steps = 1e-6 * np.eye(6)
        jac = np.column_stack([(model(p + h, i)[0] - model(p - h, i)[0]) / 2e-6 for h in steps])
        w = pixels.weight[sel]
        assert np.allclose(jtj[i], jac.T @ (w[:, None] * jac), rtol=1e-5)
        assert np.allclose(grad[i], jac.T @ (w * (pixels.value[sel] - m)), rtol=1e-5)
        assert np.isclose(chisq[i], np.sum(w * (pixels.value[sel] - m) ** 2))
        x, y = pixels.x[sel], pixels.y[sel]
        lag = np.stack([x[:, None] - x, y[:, None] - y], -1)
        rho = np.exp(-0.5 * np.einsum("ijk,kl,ijl->ij", lag, beam_inv, lag))
        scaled = np.sqrt(w)[:, None] * jac
        h_inv = np.linalg.inv(scaled.T @ scaled)
        expected = h_inv @ scaled.T @ rho @ scaled @ h_inv
        assert np.allclose(cov[i], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("fixed_shape", [False, True])
@pytest.mark.parametrize("half", [6, 11])  # 169 pixels (float32 sums) and up to 529 (float64)
def test_fit_covariance_matches_the_dense_sandwich(fixed_shape, half):
    """fit_covariance's sums of monomials made along y from rows transformed along x (DyExpansion)
    against the dense sandwich of the Jacobian's columns, for free and beam-fixed shapes, on
    irregular islands whose fitted centres lie off their middle."""
    from trap_dask.extraction.gaussian import _FLOAT64_MIN_PIXELS, fit_covariance, inverse_params

    centres = np.array([[20, 30], [70, 64], [120, 40]])
    pixels = _ragged_islands(centres, half, np.random.default_rng(12 + half))
    assert (pixels.counts > _FLOAT64_MIN_PIXELS).all() == (half == 11)
    beam_cov = BEAM.cov()
    source_cov = beam_cov if fixed_shape else np.array([[5.0, 1.5], [1.5, 3.0]])
    shape = inverse_params(source_cov[None])[0]
    offsets = np.array([[1.7, -2.4], [-3.1, 0.6], [0.2, 2.9]])
    params = np.column_stack([[1.0, 2.0, 0.5], centres + offsets, np.tile(shape, (3, 1))])
    cov = fit_covariance(params, pixels, beam_cov, fixed_shape)
    k = 3 if fixed_shape else 6
    assert cov.shape == (3, k, k)

    def model(p, sel):
        a, b, c = p[3:6] if not fixed_shape else shape
        dx, dy = pixels.x[sel] - p[1], pixels.y[sel] - p[2]
        return p[0] * np.exp(-0.5 * (a * dx * dx + 2 * b * dx * dy + c * dy * dy))

    for i, p in enumerate(params):
        sel = pixels.island == i
        steps = 1e-6 * np.eye(6)[:k]
        jac = np.column_stack([(model(p + h, sel) - model(p - h, sel)) / 2e-6 for h in steps])
        expected = _dense_sandwich(pixels, i, jac, beam_cov)
        assert np.allclose(cov[i], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("half", [6, 11])
def test_pair_covariance_matches_the_dense_sandwich(half):
    """The pair fits' covariance (correlated_covariance of the Jacobian of two beam-shaped
    components, with a prior on the positions) against the dense sandwich."""
    from trap_dask.extraction.blends import _model_and_jacobian
    from trap_dask.extraction.gaussian import correlated_covariance, inverse_params

    centres = np.array([[20, 30], [70, 64], [120, 40]])
    pixels = _ragged_islands(centres, half, np.random.default_rng(3 + half))
    beam_cov = BEAM.cov()
    beam = inverse_params(beam_cov[None])[0]
    first = np.column_stack([[1.0, 2.0, 0.5], centres + [[1.7, -2.4], [-3.1, 0.6], [0.2, 2.9]]])
    second = np.column_stack([[0.3, 1.0, 0.8], centres + [[-1.2, 2.0], [2.5, 1.1], [-0.4, -3.3]]])
    prior = np.zeros((3, 6, 6))
    prior[:, [1, 2, 4, 5], [1, 2, 4, 5]] = 0.5
    cov = correlated_covariance(_model_and_jacobian(np.column_stack([first, second]), pixels, beam)[1], pixels,
                                beam_cov, prior)

    def model(p, sel):
        dx, dy = pixels.x[sel] - p[1], pixels.y[sel] - p[2]
        return p[0] * np.exp(-0.5 * (beam[0] * dx * dx + 2 * beam[1] * dx * dy + beam[2] * dy * dy))

    for i in range(3):
        sel = pixels.island == i
        p = np.concatenate([first[i], second[i]])
        steps = 1e-6 * np.eye(6)
        jac = np.column_stack([(model((p + h)[:3], sel) + model((p + h)[3:], sel)
                                - model((p - h)[:3], sel) - model((p - h)[3:], sel)) / 2e-6 for h in steps])
        expected = _dense_sandwich(pixels, i, jac, beam_cov, prior[i])
        assert np.allclose(cov[i], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("force_beam", [True, False])
@pytest.mark.parametrize("beam_b", [0.0, 1.0])  # beam axes along the pixels, and turned
@pytest.mark.parametrize("off_row", [0.0, 1e-3, None])  # the fit's y on its row, just off it, as fitted
def test_an_island_one_pixel_high_gets_condons_errors(force_beam, beam_b, off_row):
    """An island of one row leaves the fit's y unconstrained: J^T W J is singular, or nearly so
    (its inverse rounding noise, negative variances among it). numpy refused to invert the whole
    stack for an exactly singular one, which made the image fail; a nearly singular one gave
    nonsense errors. Its errors are now Condon's, and the other islands keep theirs."""
    from trap_dask.extraction.gaussian import PixelSet, condon_errors, fit_islands, measurement_errors, shape_cov

    beam_cov = np.array([[4.0, beam_b], [beam_b, 2.56]])
    row_x, row_y = np.arange(40, 49.0), np.full(9, 50.0)
    box_y, box_x = (a.ravel() + 20.0 for a in np.mgrid[0:9, 0:9])
    x, y = np.concatenate([row_x, box_x]), np.concatenate([row_y, box_y])
    offset = np.stack([x - np.where(x > 30, 44.3, 24.1), y - np.where(x > 30, 50.2, 23.8)])
    value = 10 * np.exp(-0.5 * np.einsum("in,ij,jn->n", offset, np.linalg.inv(beam_cov), offset))
    pixels = PixelSet(x, y, value, np.ones(len(x)), np.repeat([0, 1], [9, 81]), np.array([0, 9]))
    params, _, fitted = fit_islands(pixels, np.array([0.3, 0.1]), beam_cov, force_beam)
    assert fitted.all() and abs(params[0, 2] - 50.0) < 0.1
    if off_row is not None:
        params[0, 2] = 50.0 + off_row
    errors = measurement_errors(params, fitted, pixels, np.ones(2), beam_cov, force_beam)
    condon = condon_errors(params[:1, 0], shape_cov(params[:1]), np.ones(1), beam_cov, fixed_shape=force_beam)
    assert errors.peak_err[0] == condon.peak_err[0] and np.array_equal(errors.pos_cov[0], condon.pos_cov[0])
    alone = measurement_errors(params[1:], fitted[1:], pixels.select(np.array([False, True])), np.ones(1), beam_cov,
                               force_beam)
    assert np.allclose(errors.pos_cov[1], alone.pos_cov[0]) and np.isclose(errors.peak_err[1], alone.peak_err[0])
    assert errors.peak_err[1] != condon_errors(params[1:, 0], shape_cov(params[1:]), np.ones(1), beam_cov,
                                               fixed_shape=force_beam).peak_err[0]


def test_segment_reductions_row_by_row_equal_numpys():
    """segment_reduce reduces (..., npix) arrays one row at a time: numpy's own reduceat numbers."""
    from trap_dask.extraction.gaussian import segment_reduce, segment_sum

    rng = np.random.default_rng(2)
    values, starts = rng.normal(size=(2, 3, 500)), np.array([0, 7, 8, 200, 499])
    assert np.array_equal(segment_sum(values, starts), np.add.reduceat(values, starts, axis=-1))
    assert np.array_equal(segment_reduce(np.minimum, values[0], starts), np.minimum.reduceat(values[0], starts, axis=1))
    assert np.array_equal(segment_reduce(np.maximum, values[0, 0], starts), np.maximum.reduceat(values[0, 0], starts))


def test_deblending_never_joins_neighbouring_islands():
    """Islands one pixel apart, also on the image edges, each split in two, never share a label."""
    from trap_dask.extraction.deblend import deblend
    from trap_dask.extraction.islands import find_islands

    profile = np.array([5.0, 30.0, 8.0, 4.0, 8.0, 30.0, 5.0, 0.0])  # two peaks per 7-pixel island
    snr = np.tile(profile, 7)[None, :] * np.array([1.0, 1.0, 0.0] * 14)[:, None]
    labels, islands = find_islands(snr, 3.0, 5.0)
    components = deblend(islands, snr, snr, 3.0, 8, detection=5.0)
    assert islands.n == int(labels.max()) == 7 * 14
    assert len(components) == len(islands.flat) == int((labels > 0).sum())
    pairs = np.unique(np.column_stack([labels.ravel()[islands.flat], components]), axis=0)
    assert len(pairs) == len(np.unique(pairs[:, 1])) == 2 * islands.n  # two parts each, none shared
    assert (components > 0).all()


def _pairs_field(sep_beams: float, flux_b: tuple[float, float], seed: int):
    """A 768x768 image of 144 pairs ``sep_beams`` beam FWHM apart (random orientation), the
    first member 20-80 sigma, the second ``flux_b`` sigma; their true pixel positions and peaks."""
    rng = np.random.default_rng(seed)
    g = np.arange(40.0, N - 40, 60.0)
    cx, cy = (a.ravel() for a in np.meshgrid(g, g))
    angle = rng.uniform(0, np.pi, len(cx))
    half = 0.5 * sep_beams * BEAM.fwhm_major * np.stack([np.cos(angle), np.sin(angle)], 1)
    x, y = np.stack([cx - half[:, 0], cx + half[:, 0]], 1), np.stack([cy - half[:, 1], cy + half[:, 1]], 1)
    peak = np.stack([rng.uniform(20, 80, len(cx)), rng.uniform(*flux_b, len(cx))], 1) * RMS
    wcs = make_wcs(N, N, 30.0, 45.0, PIX)
    data = correlated_noise((N, N), BEAM, RMS, rng) + gaussians((N, N), x.ravel(), y.ravel(), peak.ravel(), BEAM.cov())
    image = prepare_image(data.astype(np.float32), wcs, BEAM.beam(PIX), ExtractionParams())
    return image, wcs, x, y, peak, rng


@pytest.mark.parametrize("sep_beams", [0.6, 1.2])
def test_pair_fits_measure_blended_neighbours_with_honest_errors(sep_beams, monkeypatch):
    """Two point sources closer than the beam make one island; fitted together from starts
    0.15 beam off, both fluxes come out with honest errors, where a forced fit of the fainter one
    at its position also takes in its neighbour's light."""
    from trap_dask.extraction import blends

    image, wcs, x, y, peak, rng = _pairs_field(sep_beams, (10, 40), 5)
    params = ExtractionParams()
    if sep_beams < 0.8:  # one Gaussian an island sees one source per pair (the hidden pairs' fits split some)
        with monkeypatch.context() as m:
            m.setattr(blends, "HIDDEN_MIN_EXTENT", np.inf)
            assert len(extract_sources(image, params)) <= 1.1 * len(x)
    off = 0.15 * BEAM.fwhm_major
    moved_x, moved_y = x + rng.normal(0, off, x.shape), y + rng.normal(0, off, y.shape)
    ra, dec = wcs.pixel_to_world_values(moved_x.ravel(), moved_y.ravel())
    rows, ok = fit_pairs(image, ra.reshape(-1, 2), dec.reshape(-1, 2), params)
    assert ok.mean() >= 0.95
    for k in (0, 1):
        pull = (rows["int_flux"][ok, k] - peak[ok, k]) / rows["int_flux_err"][ok, k]
        assert _pull_ok(pull), (k, np.median(pull), robust_std(pull))
    assert np.allclose(rows["int_flux"][ok], rows["peak_flux"][ok])
    assert not rows["is_force_fit"].any() and rows["gaussian_fit"][ok].all()
    if sep_beams < 0.8:
        single = forced_fit(image, ra.reshape(-1, 2)[:, 1], dec.reshape(-1, 2)[:, 1], params)
        assert np.median((single["int_flux"] - peak[:, 1]) / single["int_flux_err"]) > 2


def test_pair_fit_of_a_vanished_neighbour_gives_zero_flux():
    image, wcs, x, y, peak, rng = _pairs_field(0.8, (0, 0), 6)
    ra, dec = wcs.pixel_to_world_values(x.ravel(), y.ravel())
    rows, ok = fit_pairs(image, ra.reshape(-1, 2), dec.reshape(-1, 2), ExtractionParams())
    assert ok.mean() >= 0.95
    pull = rows["int_flux"][ok, 1] / rows["int_flux_err"][ok, 1]
    assert abs(np.median(pull)) < 0.3 and robust_std(pull) < 1.3
    assert _pull_ok((rows["int_flux"][ok, 0] - peak[ok, 0]) / rows["int_flux_err"][ok, 0])


def test_pair_fit_off_the_image_is_not_ok(field):
    rows, ok = fit_pairs(field["image"], np.array([[10.0, 10.0]]), np.array([[10.0, 10.0]]), field["params"])
    assert ok.tolist() == [False] and np.isnan(rows["int_flux"]).all()


def test_deblended_pairs_are_refitted_together(monkeypatch):
    """Pairs 1.2 beams apart are deblended; fitted one at a time on their own pixels each Gaussian
    takes in its neighbour's wing (fluxes ~6% high, pulls ~+1.7), fitted together they are right."""
    import trap_dask.extraction.extract as extract

    image, wcs, x, y, peak, rng = _pairs_field(1.2, (20, 80), 8)

    def pulls():
        s = extract_sources(image, ExtractionParams())
        m = match(x.ravel(), y.ravel(), s["x"], s["y"], 2.0)
        assert np.mean(m >= 0) >= 0.97
        found = m >= 0
        return (s["int_flux"][m[found]] - peak.ravel()[found]) / s["int_flux_err"][m[found]]

    assert _pull_ok(pulls())
    monkeypatch.setattr(extract, "SIBLING_MAX_EXTENT", 0.0)  # no joint refit
    assert np.median(pulls()) > 1.0


def _both_found_and_bright_pulls(image, x, y, peak) -> tuple[float, np.ndarray, np.ndarray]:
    """The fraction of pairs with both members detected, the brighter members' flux pulls, and the
    detections."""
    s = extract_sources(image, ExtractionParams())
    m = match(x.ravel(), y.ravel(), s["x"], s["y"], 0.5 * BEAM.fwhm_major).reshape(-1, 2)
    bright = m[:, 0] >= 0
    return (m >= 0).all(1).mean(), (s["int_flux"][m[bright, 0]] - peak[bright, 0]) / s["int_flux_err"][m[bright, 0]], s


def test_a_faint_neighbour_inside_a_bright_sources_island_is_found_and_both_measured(monkeypatch):
    """Pairs a beam apart, one 20-80 sigma, the other 10-16: the island has one peak and the
    deblender leaves it whole. One Gaussian fitted to it takes in the neighbour's light (pulls of
    the bright one ~+2.7) and the neighbour goes unseen in most pairs; fitted as two point sources
    where that fits better (blends.hidden_pairs), both are found and measured."""
    from trap_dask.extraction import blends

    image, wcs, x, y, peak, rng = _pairs_field(1.0, (10, 16), 21)
    both, pulls, _ = _both_found_and_bright_pulls(image, x, y, peak)
    assert both >= 0.85
    assert abs(np.median(pulls)) < 0.4 and robust_std(pulls) < 1.4
    monkeypatch.setattr(blends, "HIDDEN_MIN_EXTENT", np.inf)
    both, pulls, _ = _both_found_and_bright_pulls(image, x, y, peak)
    assert both < 0.5 and np.median(pulls) > 2.0


def test_nearest_in_tables_of_any_size_is_the_nearest(monkeypatch):
    rng = np.random.default_rng(2)
    x, y, to_x, to_y = rng.uniform(0, 100, (4, 300))
    expected = np.argmin(np.hypot(x[:, None] - to_x, y[:, None] - to_y), axis=1)
    for cells in (1, 299, 1000, 1 << 20):  # one row at a time ... all at once
        monkeypatch.setattr(forced, "DISTANCE_CELLS", cells)
        near, dist = forced._nearest(x, y, to_x, to_y)
        assert np.array_equal(near, expected)
        np.testing.assert_allclose(dist, np.hypot(x - to_x[near], y - to_y[near]))


@pytest.mark.parametrize("length", [1.0, 1.2])
def test_a_bright_source_a_beam_long_of_another_shape_is_never_cut_in_two(length):
    """A uniform bar a beam long (a point source smeared along a line, a short jet) at S/N ~300: no
    Gaussian fits it down to its noise, and a pair of halves fits it better, in some images and
    not others. Cut in two in some images only, its light curve would jump by half (found by a
    review: eta up to 53800); the hidden pairs' fit must reach the noise and be unequal."""
    rng = np.random.default_rng(17)
    n = 512
    wcs = make_wcs(n, n, 30.0, 45.0, PIX)
    x, y = scattered_positions(20, (n, n), 60, 40, rng)
    angle = rng.uniform(0, np.pi, len(x))
    along = np.linspace(-0.5, 0.5, 41) * length * BEAM.fwhm_major
    bx = (x[:, None] + along * np.cos(angle)[:, None]).ravel()
    by = (y[:, None] + along * np.sin(angle)[:, None]).ravel()
    bars = gaussians((n, n), bx, by, np.ones(bx.size), BEAM.cov())
    bars *= 300 * RMS / bars.max()
    for _ in range(4):  # four images of the same sky
        data = (bars + correlated_noise((n, n), BEAM, RMS, rng)).astype(np.float32)
        s = extract_sources(prepare_image(data, wcs, BEAM.beam(PIX), ExtractionParams()), ExtractionParams())
        assert (match(x, y, s["x"], s["y"], 0.5 * BEAM.fwhm_major) >= 0).all() and len(s) == len(x)


def test_a_new_source_beside_a_detection_of_the_image_before_is_measured_with_it(monkeypatch):
    """The backfill of a faint source first found beside a bright one: in the image before, the
    bright one's detection held both (here the hidden pairs are not looked for); fitted as a pair
    with that detection, the faint one's flux is near the truth, where a forced fit alone counts
    its neighbour's light too."""
    from trap_dask.extraction import blends

    monkeypatch.setattr(blends, "HIDDEN_MIN_EXTENT", np.inf)
    image, wcs, x, y, peak, rng = _pairs_field(1.15, (10, 16), 21)
    _, _, blended = _both_found_and_bright_pulls(image, x, y, peak)
    ra, dec = wcs.pixel_to_world_values(x[:, 1], y[:, 1])
    beside = fit_beside_detections(image, ra, dec, blended, ExtractionParams())
    alone = forced_fit(image, ra, dec, ExtractionParams())
    assert beside["is_force_fit"].all() and np.isfinite(beside["int_flux"]).all()
    assert np.allclose(beside["ra"], alone["ra"]) and np.allclose(beside["dec"], alone["dec"])
    assert np.median((beside["int_flux"] - peak[:, 1]) / beside["int_flux_err"]) < 1.3
    assert np.median((alone["int_flux"] - peak[:, 1]) / alone["int_flux_err"]) > 2.0
    # with no detections known (the image read again), the forced fits alone
    none = fit_beside_detections(image, ra, dec, blended[:0], ExtractionParams())
    np.testing.assert_array_equal(none["int_flux"], alone["int_flux"])


@pytest.mark.parametrize("shape", [(50, 61), (40, 40), (1, 30), (30, 1), (5, 7)])
def test_run_labels_equal_ndimage_labels(shape):
    """Islands labelled from runs of pixels: the same pixels, numbers and 8-connectivity as
    scipy.ndimage.label, across rows, diagonals and image edges."""
    from scipy import ndimage

    from trap_dask.extraction.islands import EIGHT_CONNECTED, label_runs

    rng = np.random.default_rng(sum(shape))
    for fill in (0.0, 0.2, 0.5, 1.0):
        mask = rng.uniform(size=shape) < fill
        labels, _ = ndimage.label(mask, structure=EIGHT_CONNECTED)
        flat = np.flatnonzero(mask)
        found = label_runs(flat, shape[1])
        assert np.array_equal(flat, np.flatnonzero(labels))
        assert np.array_equal(found, labels.ravel()[flat])


@pytest.mark.parametrize("shape", [(60, 70), (12, 9)])
def test_grown_rings_are_the_dilation_into_free_pixels(shape):
    """Rings grown from the pixels next to the islands only: each ring is the 8-connected
    dilation of the last into the free (finite, S/N <= analysis) pixels not yet taken, up to the
    image edges; every added pixel touches its own island's previous ring; peaks unchanged."""
    from scipy import ndimage

    from trap_dask.extraction.islands import EIGHT_CONNECTED, grow_into_background, label_islands

    rng = np.random.default_rng(sum(shape))
    snr = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) * 4.0
    snr[rng.uniform(size=shape) < 0.05] = np.nan
    _, _, islands = label_islands(snr, 1.0, 1.5)
    assert islands.n > 1
    with np.errstate(invalid="ignore"):
        free = np.isfinite(snr) & (snr <= 1.0)
    done = np.zeros(shape, bool)
    done.flat[islands.flat] = True
    grown = grow_into_background(islands, snr, 1.0, 2)
    owner = np.full(shape, -1)
    owner.flat[grown.flat] = grown.island
    assert np.array_equal(grown.peak_flat, islands.peak_flat) and len(np.unique(grown.flat)) == len(grown.flat)
    for _ in range(2):
        previous = np.where(done, owner, -1)
        ring = ndimage.binary_dilation(done, EIGHT_CONNECTED) & free & ~done
        for y, x in zip(*np.nonzero(ring)):  # a small image: each pixel touches its island's last ring
            assert owner[y, x] in previous[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
        done |= ring
    assert np.array_equal(done, owner >= 0)


def test_snr_map_made_where_looked_at_equals_the_full_array(field):
    """Islands, deblended components and grown rings from an SNRMap (S/N made band by band and
    at the pixels looked at) are those of the S/N array, on a simulated field."""
    from trap_dask.extraction.deblend import deblend
    from trap_dask.extraction.islands import SNRMap, flat_above, grow_into_background, label_islands

    image = field["image"]
    lazy = SNRMap(image.residual, image.rms)
    with np.errstate(invalid="ignore", divide="ignore"):
        full = image.residual / image.rms
    assert np.array_equal(flat_above(lazy, 3.0), np.flatnonzero(full > 3.0))
    found = [label_islands(snr, 3.0, 5.0) for snr in (lazy, full)]
    for a, b in zip(found[0][:2], found[1][:2]):
        assert np.array_equal(a, b)
    islands = found[0][2]
    assert islands.n > 10 and np.array_equal(islands.peak_snr, found[1][2].peak_snr)
    parts = [deblend(islands, snr, image.residual, 3.0, 32, detection=5.0) for snr in (lazy, full)]
    assert np.array_equal(*parts)
    grown = [grow_into_background(islands, snr, 3.0, 2) for snr in (lazy, full)]
    assert np.array_equal(grown[0].flat, grown[1].flat) and np.array_equal(grown[0].island, grown[1].island)


def test_a_noise_map_made_where_looked_at_measures_the_same_sources(field, monkeypatch):
    """An image of more than FULL_NOISE_MAP_PIXELS gets a NoiseMap, not an array: its sources,
    forced fits and pair fits are those measured with the array (the same interpolation, to float32
    rounding), on a simulated field."""
    from trap_dask.extraction import background
    from trap_dask.extraction.blends import fit_point_pairs
    from trap_dask.extraction.forced import forced_fit

    monkeypatch.setattr(background, "FULL_NOISE_MAP_PIXELS", N * N - 1)
    params = field["params"]
    lazy = prepare_image(field["data"].astype(np.float32), field["wcs"], BEAM.beam(PIX), params)
    array = field["image"]
    assert isinstance(lazy.rms, background.NoiseMap) and isinstance(array.rms, np.ndarray)
    assert np.array_equal(lazy.residual, array.residual, equal_nan=True)
    found, expected = extract_sources(lazy, params), field["sources"]
    assert len(found) == len(expected) > 200
    for column in ("ra", "dec", "peak_flux", "peak_flux_err", "int_flux", "int_flux_err", "ra_fit_err"):
        assert np.allclose(found[column], expected[column], rtol=1e-5, atol=0), column
    ra, dec = field["ra"][:40], field["dec"][:40]
    forced = [forced_fit(image, ra, dec, params) for image in (lazy, array)]
    assert np.allclose(forced[0]["peak_flux"], forced[1]["peak_flux"], rtol=1e-5, equal_nan=True)
    start = np.stack([np.column_stack([field["x"][:10], field["y"][:10]]),
                      np.column_stack([field["x"][:10] + 3.0, field["y"][:10]])], 1)
    pairs = [fit_point_pairs(image.residual, image.rms, image.beam_cov, start) for image in (lazy, array)]
    assert np.array_equal(pairs[0].ok, pairs[1].ok) and pairs[0].ok.any()
    assert np.allclose(pairs[0].params[pairs[0].ok], pairs[1].params[pairs[1].ok], rtol=1e-5)


def test_a_resolved_source_cut_along_a_noise_dip_is_one_source(monkeypatch):
    """Faint resolved Gaussians (1.5-3 beams, S/N 10-30): the deblending cuts the flat tops of some
    along a dip of the noise, and each part's fit reaches over the whole source. Joined again
    (:func:`~trap_dask.extraction.deblend.rejoined`), every one is one source with its flux."""
    import trap_dask.extraction.extract as extract

    field = _resolved_field(2, (10.0, 30.0), (0.5, 1.0))
    x, y, scale, flux = field["x"], field["y"], field["scale"], field["flux"]
    params = ExtractionParams(back_size_x=128, back_size_y=128)
    image = prepare_image(field["data"], field["wcs"], BEAM.beam(PIX), params)

    def detections_per_source() -> tuple[np.ndarray, np.ndarray]:
        s = extract_sources(image, params)
        near = np.hypot(s["x"] - x[:, None], s["y"] - y[:, None]) < 1.5 * BEAM.fwhm_major * scale[:, None]
        return near.sum(1), s

    counts, s = detections_per_source()
    assert (counts >= 1).all() and (counts > 1).sum() <= 1  # one join stays undone at 6.2 (> JOIN_MAX_CHISQ)
    m = match(x, y, s["x"], s["y"], 0.5 * BEAM.fwhm_major)
    assert (m >= 0).all() and np.median(np.abs(s["int_flux"][m] / flux - 1)) < 0.1
    monkeypatch.setattr(extract, "JOIN_MAX_CHISQ", np.inf)
    assert (detections_per_source()[0] > 1).sum() == 0
    monkeypatch.setattr(extract, "rejoined", lambda parent, fit: np.arange(len(parent)))
    assert (detections_per_source()[0] > 1).sum() == 2


def test_a_point_source_on_a_resolved_ones_flank_is_not_joined_to_it(monkeypatch):
    """81 Gaussians 3 beams across (S/N 8-20), each with a point source of S/N 8-15 a beam from
    its centre, which the deblending separates. Their parts' fits both reach over the resolved
    source, but one Gaussian fits the pair of them worse than they do (by more than
    JOIN_MAX_CHISQ): the point sources stay sources of their own (a transient in its host)."""
    import trap_dask.extraction.extract as extract

    rng = np.random.default_rng(7)
    n = 768
    centres = np.arange(50.0, n - 50, 75.0)
    cx, cy = (a.ravel() for a in np.meshgrid(centres, centres))
    angle = rng.uniform(0, np.pi, len(cx))
    px, py = cx + BEAM.fwhm_major * np.cos(angle), cy + BEAM.fwhm_major * np.sin(angle)
    hosts = np.array([Shape(3 * BEAM.fwhm_major, 3 * BEAM.fwhm_minor * rng.uniform(0.6, 1), pa).cov()
                      for pa in rng.uniform(0, 180, len(cx))])
    host_peak, point_peak = rng.uniform(8, 20, len(cx)) * RMS, rng.uniform(8, 15, len(cx)) * RMS
    data = (correlated_noise((n, n), BEAM, RMS, rng) + gaussians((n, n), cx, cy, host_peak, hosts)
            + gaussians((n, n), px, py, point_peak, BEAM.cov()))
    image = prepare_image(data.astype(np.float32), make_wcs(n, n, 30.0, 45.0, PIX), BEAM.beam(PIX), ExtractionParams())

    def points_found() -> int:
        s = extract_sources(image, ExtractionParams())
        return int((match(px, py, s["x"], s["y"], 0.5 * BEAM.fwhm_major) >= 0).sum())

    gated = points_found()
    monkeypatch.setattr(extract, "JOIN_MAX_CHISQ", np.inf)
    ungated = points_found()
    monkeypatch.setattr(extract, "rejoined", lambda parent, fit: np.arange(len(parent)))
    apart = points_found()
    assert gated >= apart - 1 and ungated <= apart - 5


def test_only_parts_that_each_hold_the_others_centre_are_joined():
    """Islands 0-3: two wide fits 1 pixel apart (joined); two beam-sized fits a beam apart, as a
    deblended pair (apart); a wide fit holding a beam-sized one's centre but not the reverse
    (apart); a failed fit (NaN, apart). Island 4: three parts, the first two joined."""
    from trap_dask.extraction.deblend import rejoined
    from trap_dask.extraction.gaussian import inverse_params

    wide, beam = inverse_params(np.array([np.eye(2) * 100.0, BEAM.cov()]))
    fwhm = BEAM.fwhm_major
    rows = [(0, 10, 10, wide), (0, 11, 10, wide), (1, 50, 50, beam), (1, 50, 50 + fwhm, beam),
            (2, 90, 90, wide), (2, 90 + 0.8 * fwhm, 90, beam), (3, 130, 130, wide), (3, 130, 130, np.full(3, np.nan)),
            (4, 170, 170, wide), (4, 172, 170, wide), (4, 170, 200, wide)]
    parent = np.array([r[0] for r in rows])
    fit = np.array([(1.0, r[1], r[2], *r[3]) for r in rows])
    assert rejoined(parent, fit).tolist() == [0, 0, 2, 3, 4, 5, 6, 7, 8, 8, 10]
