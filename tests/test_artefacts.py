"""Pixel artefacts: glitches, hot pixels and blocks of bad pixels are left out of the detections;
every island of beam-convolved sky (sources and noise peaks) is kept."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from tests._synth import Shape, correlated_noise, gaussians, make_wcs, match, scattered_positions
from trap_dask.extraction.artefacts import point_source_pixels
from trap_dask.extraction.extract import extract, prepare_image
from trap_dask.extraction.islands import snr_map
from trap_dask.extraction.params import ExtractionParams
from trap_dask.image import read_image, read_meta

PIX = 5.0  # arcsec
RMS = 1e-3  # Jy/beam
N = 512


@pytest.mark.parametrize("beam", [Shape(6.0, 4.0, 30.0), Shape(2.5, 2.0, -60.0), Shape(12.0, 8.0, 0.0)])
@pytest.mark.parametrize("peak", [5.0, 40.0, 1000.0])
def test_a_point_source_covers_the_pixels_the_beam_predicts(beam, peak):
    """Noiseless point sources (S/N: rms 1) at random sub-pixel positions: the pixels above 3 are
    on average those predicted from the brightest pixel's value, within 10% (or a pixel)."""
    rng = np.random.default_rng(3)
    counted, predicted = [], []
    for x, y in rng.uniform(60, 61, (20, 2)):
        image = gaussians((128, 128), np.array([x]), np.array([y]), np.array([peak]), beam.cov())
        counted.append(np.count_nonzero(image > 3.0))
        predicted.append(point_source_pixels(np.array(image.max()), 3.0, beam.cov()))
    assert np.mean(counted) == pytest.approx(np.mean(predicted), rel=0.1, abs=1.0)


def _field(beam: Shape, seed: int):
    """Correlated noise and ~60 point and resolved sources of S/N 5-200; (data, wcs, x, y)."""
    rng = np.random.default_rng(seed)
    x, y = scattered_positions(60, (N, N), 8 * beam.fwhm_major, 30, rng)
    peak = np.exp(rng.uniform(np.log(5), np.log(200), len(x))) * RMS
    wide = np.where(rng.random(len(x)) < 0.2, 2.0, 1.0)[:, None, None]  # a fifth twice the beam
    data = correlated_noise((N, N), beam, RMS, rng) + gaussians((N, N), x, y, peak, beam.cov() * wide)
    return data.astype(np.float32), make_wcs(N, N, 150.0, 30.0, PIX), x, y


@pytest.mark.parametrize("beam", [Shape(6.0, 4.0, 30.0), Shape(2.5, 2.0, -60.0)])
def test_no_island_of_sky_or_noise_is_cut_at_a_detection_threshold_of_4(beam):
    data, wcs, x, _ = _field(beam, 11)
    params = ExtractionParams(detection_threshold=4.0, analysis_threshold=3.0)
    found = extract(prepare_image(data, wcs, beam.beam(PIX), params), params)
    assert len(found.artefacts) == 0 and len(found.sources) >= 0.9 * len(x)


def test_glitches_are_left_out_and_named_and_sources_of_the_same_peak_kept():
    beam = Shape(6.0, 4.0, 30.0)
    data, wcs, x, y = _field(beam, 12)
    sy, sx = _empty_sky(x, y, 6, 5 * beam.fwhm_major)
    for i, snr in enumerate((15, 40, 400)):  # one pixel
        data[sy[i], sx[i]] += snr * RMS
    data[sy[3]:sy[3] + 2, sx[3]:sx[3] + 2] += 100 * RMS  # a 2 x 2 block
    data[sy[4], sx[4] - 1:sx[4] + 2] += 100 * RMS  # a streak of 3 pixels along a row
    data += gaussians((N, N), sx[5:] + 0.3, sy[5:] - 0.2, np.array([400 * RMS]), beam.cov())  # a source
    params = ExtractionParams()
    found = extract(prepare_image(data, wcs, beam.beam(PIX), params), params)
    assert (match(sx[:5], sy[:5], found.sources["x"], found.sources["y"], 3.0) == -1).all()
    assert (match(sx[:5], sy[:5], found.artefacts[:, 0], found.artefacts[:, 1], 1.5) >= 0).all()
    assert len(found.artefacts) == 5 and found.artefacts[:, 2].max() > 300  # the five glitches, no sky island
    assert match(sx[5:] + 0.3, sy[5:] - 0.2, found.sources["x"], found.sources["y"], 1.0)[0] >= 0
    as_trap = extract(prepare_image(data, wcs, beam.beam(PIX), params), replace(params, drop_pixel_artefacts=False))
    assert len(as_trap.artefacts) == 0 and len(as_trap.sources) == len(found.sources) + 5  # TraP 1.x's sources


def _empty_sky(x: np.ndarray, y: np.ndarray, n: int, distance: float) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of ``n`` whole pixels at least ``distance`` from every source and from one another."""
    gy, gx = (a.ravel() for a in np.mgrid[30:N - 30:8, 30:N - 30:8])
    free = np.hypot(gx[:, None] - x, gy[:, None] - y).min(1) > distance
    chosen: list[int] = []
    for i in np.flatnonzero(free):
        if all(np.hypot(gx[i] - gx[j], gy[i] - gy[j]) > distance for j in chosen):
            chosen.append(i)
    assert len(chosen) >= n
    return gy[chosen[:n]], gx[chosen[:n]]


def test_a_run_names_the_images_with_artefacts_and_counts_them(tmp_path, caplog):
    """A worker's extraction logs each image's artefacts with its file, the result counts them, and
    the run's summary says how many were left out."""
    from trap_dask import tasks
    from trap_dask.pipeline import RunSummary
    from trap_dask.quality import QualityParams

    beam = Shape(6.0, 4.0, 30.0)
    data, wcs, x, y = _field(beam, 13)
    (sy,), (sx,) = _empty_sky(x, y, 1, 5 * beam.fwhm_major)
    data[sy, sx] += 60 * RMS
    header = wcs.to_header()
    b = beam.beam(PIX)
    header.update(BMAJ=2 * b.smaj, BMIN=2 * b.smin, BPA=b.pa, RESTFRQ=150e6, RESTBW=2e6, BUNIT="JY/BEAM",
                  **{"DATE-OBS": "2024-01-01T00:00:00", "EXPTIME": 60.0})
    path = tmp_path / "glitched.fits"
    fits.writeto(path, data, header)
    logger = logging.getLogger("trap_dask.tasks")  # (a run before may have kept its messages from the root)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="trap_dask.tasks"):
            result = tasks.process(tasks.scan(str(path)), QualityParams(), ExtractionParams()).result
    finally:
        logger.removeHandler(caplog.handler)
    assert result.rejection is None and result.n_artefacts == 1
    assert f"{path}: 1 island left out as pixel artefacts" in caplog.text and f"at pixel ({sx}, {sy})" in caplog.text
    summary = RunSummary(db="x", n_images=1, n_skipped=0, n_rejected=0, n_sources=5, n_forced=0, n_new_sources=0,
                         n_light_curves=5, wall_seconds=1.0, rows_committed=1, n_artefacts=1,
                         writer_seconds={"associate": 0.0, "update": 0.0, "commit": 0.0})
    assert "5 detections (1 pixel artefacts left out" in summary.describe()



def test_a_source_with_an_infinite_pixel_on_its_peak_is_measured(tmp_path):
    """An infinite pixel is blank, as NaN is: the source under it is measured from its other pixels
    (as an island of infinite S/N it was cut as a pixel artefact, and the source with it)."""
    from trap_dask import tasks
    from trap_dask.quality import QualityParams

    beam = Shape(6.0, 4.0, 30.0)
    data, wcs, x, y = _field(beam, 13)
    header = wcs.to_header()
    b = beam.beam(PIX)
    header.update(BMAJ=2 * b.smaj, BMIN=2 * b.smin, BPA=b.pa, RESTFRQ=150e6, RESTBW=2e6, BUNIT="JY/BEAM",
                  **{"DATE-OBS": "2024-01-01T00:00:00", "EXPTIME": 60.0})
    found = {}
    for name, value in (("clean", None), ("inf", np.inf), ("nan", np.nan)):
        spoilt = data.copy()
        if value is not None:
            spoilt[np.rint(y).astype(int), np.rint(x).astype(int)] = value
        fits.writeto(tmp_path / f"{name}.fits", spoilt, header)
        result = tasks.process(tasks.scan(str(tmp_path / f"{name}.fits")), QualityParams(), ExtractionParams()).result
        assert result.rejection is None and result.n_artefacts == 0
        found[name] = result.sources
    assert len(found["inf"]) == len(found["clean"]) >= 40
    for column in ("ra", "dec", "peak_flux", "int_flux", "int_flux_err"):
        np.testing.assert_array_equal(found["inf"][column], found["nan"][column])
    peak = np.sort(found["inf"]["peak_flux"])
    assert np.all(np.abs(peak - np.sort(found["clean"]["peak_flux"])) < 4 * np.sort(found["inf"]["peak_flux_err"]))

def test_glitches_added_to_a_field_of_close_pairs_leave_every_source_row_as_it_was():
    """The islands cut before deblending leave the others' labels, deblending and fits exact."""
    beam = Shape(6.0, 4.0, 30.0)
    rng = np.random.default_rng(21)
    x, y = scattered_positions(30, (N, N), 60, 40, rng)
    angle = rng.uniform(0, np.pi, len(x))
    x2, y2 = x + 8 * np.cos(angle), y + 8 * np.sin(angle)  # partners 1.3-2 beams away
    peaks = rng.uniform(10, 80, (2, len(x))) * RMS
    data = correlated_noise((N, N), beam, RMS, rng) + gaussians(
        (N, N), np.r_[x, x2], np.r_[y, y2], np.r_[peaks[0], peaks[1]], beam.cov())
    params = ExtractionParams()
    image = prepare_image(data.astype(np.float32), make_wcs(N, N, 150.0, 30.0, PIX), beam.beam(PIX), params)
    clean = extract(image, params)
    gy, gx = _empty_sky(np.r_[x, x2], np.r_[y, y2], 12, 3 * beam.fwhm_major)
    image.residual[gy, gx] += np.geomspace(30, 1e4, len(gy)).astype(np.float32) * RMS
    glitched = extract(image, params)
    assert len(glitched.artefacts) == len(gy) and len(clean.artefacts) == 0
    assert glitched.sources.tobytes() == clean.sources.tobytes()


def test_sources_on_the_edge_or_by_a_blank_region_are_kept():
    """Islands cut short by the image's edge or blank pixels are never taken for artefacts."""
    beam = Shape(6.0, 4.0, 30.0)
    rng = np.random.default_rng(22)
    data = correlated_noise((N, N), beam, RMS, rng) + gaussians(
        (N, N), np.array([-1.5, 200.0, 300.0]), np.array([100.0, N + 0.5, 302.0]), np.full(3, 300 * RMS), beam.cov())
    data[:, :1] = np.nan  # the first column blank: the first source shows a sliver of itself
    data[290:, 300:] = np.nan  # the third source under a blank corner but its edge
    params = ExtractionParams()
    found = extract(prepare_image(data.astype(np.float32), make_wcs(N, N, 150.0, 30.0, PIX), beam.beam(PIX), params),
                    params)
    assert len(found.artefacts) == 0 and found.kept_too_small == 0
    assert (match(np.array([1.0, 200.0, 298.0]), np.array([100.0, N - 1.0, 300.0]), found.sources["x"],
                  found.sources["y"], 4.0) >= 0).all()


@pytest.mark.parametrize("wider", [2.0, 4.0, 5.0])
def test_a_header_beam_wider_than_the_image_cuts_no_source(wider):
    """Sources at the image's true resolution under a header beam 2x (they still fill enough of it)
    or 4-5x too wide (some or most would be cut: the beam is suspect, and all are measured) are all kept."""
    true = Shape(6.0, 4.0, 30.0)
    data, wcs, x, y = _field(true, 23)
    header = Shape(6.0 * wider, 4.0 * wider, 30.0)
    params = ExtractionParams(back_size_x=64, back_size_y=64)
    found = extract(prepare_image(data, wcs, header.beam(PIX), params), params)
    assert len(found.artefacts) == 0
    assert (found.kept_too_small > 0) == (wider > 2.0)


def test_a_hot_pixel_on_a_faint_source_leaves_the_source():
    """An S/N 6 source under a hot pixel of S/N 30,000: the island holds the source's pixels, far
    more than a glitch's, and is kept (measured as TraP would, hot pixel and all)."""
    beam = Shape(6.0, 4.0, 30.0)
    rng = np.random.default_rng(24)
    data = correlated_noise((N, N), beam, RMS, rng) + gaussians(
        (N, N), np.array([200.0]), np.array([200.0]), np.array([6 * RMS]), beam.cov())
    data[200, 200] += 3e4 * RMS
    params = ExtractionParams(detection_threshold=5.0)
    found = extract(prepare_image(data.astype(np.float32), make_wcs(N, N, 150.0, 30.0, PIX), beam.beam(PIX), params),
                    params)
    assert len(found.artefacts) == 0
    assert match(np.array([200.0]), np.array([200.0]), found.sources["x"], found.sources["y"], 2.0)[0] >= 0


@pytest.mark.parametrize("n_glitches", [2, 6, 20])
def test_many_glitches_in_a_sparse_field_are_all_cut(n_glitches):
    """Four sources and more hot pixels than sources: the glitches are not taken for a wrong beam
    (the median is of the islands that are not cut), so every one goes and every source stays."""
    beam = Shape(6.0, 4.0, 30.0)
    rng = np.random.default_rng(25)
    x, y = np.array([100.0, 400.0, 100.0, 400.0]), np.array([100.0, 100.0, 400.0, 400.0])
    data = correlated_noise((N, N), beam, RMS, rng) + gaussians((N, N), x, y, np.full(4, 50 * RMS), beam.cov())
    gy, gx = _empty_sky(x, y, n_glitches, 40.0)
    data[gy, gx] += 100 * RMS
    params = ExtractionParams()
    found = extract(prepare_image(data.astype(np.float32), make_wcs(N, N, 150.0, 30.0, PIX), beam.beam(PIX), params),
                    params)
    assert len(found.artefacts) == n_glitches and found.kept_too_small == 0
    assert (match(x, y, found.sources["x"], found.sources["y"], 1.0) >= 0).all() and len(found.sources) == 4


@pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")
@pytest.mark.parametrize("name", ["GRB120422A-120429.fits", "SWIFT_554620-130504.fits",
                                  "GRB201006A_final_2min_srcs-t0002-image-pb_cutout.fits"])
def test_hot_pixels_in_real_images_go_and_their_sources_stay(name):
    """Real AMI-LA and LOFAR images at a detection threshold of 4, with three hot pixels (S/N 15, 50
    and 500) where the image has no island: the hot pixels are cut, nothing of the image itself is,
    and every detection of the clean image is there, measured the same."""
    meta = read_meta(str(Path(__file__).parent / "data" / name))
    data, wcs = read_image(meta)
    params = ExtractionParams(detection_threshold=4.0)
    image = prepare_image(data, wcs, meta.beam, params)
    clean = extract(image, params)
    assert len(clean.sources) >= 3 and len(clean.artefacts) == 0
    quiet = np.abs(np.nan_to_num(snr_map(image.residual, image.rms), nan=99.0))
    ny, nx = quiet.shape
    gy, gx = (a.ravel() for a in np.mgrid[20:ny - 20:7, 20:nx - 20:7])
    calm = [i for i in range(len(gy)) if quiet[gy[i] - 6:gy[i] + 7, gx[i] - 6:gx[i] + 7].max() < 2.0]
    spots = np.array(calm)[np.linspace(0, len(calm) - 1, 3).astype(int)]
    assert point_source_pixels(np.array(15.0), params.analysis_threshold, image.beam_cov) > 20  # a glitch is cut
    image.residual[gy[spots], gx[spots]] += np.array([15.0, 50.0, 500.0], np.float32) * image.rms[gy[spots], gx[spots]]
    glitched = extract(image, params)
    assert len(glitched.artefacts) == 3 and glitched.sources.tobytes() == clean.sources.tobytes()
