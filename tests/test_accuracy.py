"""Science accuracy against injected truth: pulls, completeness and association (the CI subset of
``benchmarks/accuracy.py``, on one image or a short survey each)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import trap_dask.scoring as tm
from trap_dask.extraction.forced import forced_fit
from trap_dask.extraction.params import ExtractionParams
from trap_dask.simulate import SurveySpec, load_truth, simulate_survey

#: Change to check other seeds (the bounds were checked with seeds 0, 1 and 2).
SEED = int(os.environ.get("TRAP_ACCURACY_SEED", "0"))
NOTHING = dict(n_variable=0, n_transient=0, n_resolved=0, n_pairs=0)


@pytest.fixture(scope="module")
def bright(tmp_path_factory):
    """One 2048x2048 image of 1500 point sources of 10-100 sigma, its truth and detections."""
    spec = SurveySpec(n_epochs=1, shape=(2048, 2048), n_steady=1500, flux_range=(10.0, 100.0),
                      jitter=0.0, seed=SEED, **NOTHING)
    truth = load_truth(simulate_survey(tmp_path_factory.mktemp("bright"), spec))
    params = ExtractionParams(detection_threshold=8.0)
    detections, image = tm.extract_file(truth["images"][0]["path"], params)
    src = truth["sources"]
    idx, _ = tm.match_nearest(src["ra"], src["dec"], detections["ra"], detections["dec"], spec.beam.smaj)
    return truth, detections, image, idx, params


def _true_columns(truth: dict, keep: np.ndarray) -> tuple[np.ndarray, ...]:
    src = truth["sources"]
    return (src["ra_epoch"][keep, 0], src["dec_epoch"][keep, 0], src["peak_flux"][keep, 0, 0],
            src["int_flux"][keep, 0, 0])


def _assert_honest(values: np.ndarray, name: str) -> None:
    median, std = tm.robust_stats(values)
    assert abs(median) <= 0.2 and 0.85 <= std <= 1.2, f"{name} pull: median {median:+.3f}, robust std {std:.3f}"


def test_bright_point_sources_all_found_without_spurious(bright):
    truth, detections, _, idx, _ = bright
    assert np.mean(idx >= 0) >= 0.99
    assert len(detections) - len(np.unique(idx[idx >= 0])) <= 2  # detections of no true source


@pytest.mark.parametrize("name", ["peak", "int_flux", "ra", "dec"])
def test_free_fit_errors_are_honest(bright, name):
    truth, detections, _, idx, _ = bright
    found = idx >= 0
    _assert_honest(getattr(tm.pulls(detections[idx[found]], *_true_columns(truth, found)), name), name)


def test_forced_fit_errors_are_honest_on_sources_and_empty_sky(bright):
    truth, _, image, _, params = bright
    everything = np.ones(len(truth["sources"]["id"]), bool)
    true = _true_columns(truth, everything)
    _assert_honest(tm.pulls(forced_fit(image, true[0], true[1], params), *true).peak, "forced peak")
    # empty sky: the same positions shifted by 5 beam major FWHM in declination, away from sources
    shift = 10.0 * truth["spec"].beam.smaj
    ra, dec = true[0], true[1] + shift
    clear = tm.match_nearest(ra, dec, true[0], true[1], 0.6 * shift)[0] < 0
    empty = forced_fit(image, ra[clear], dec[clear], params)
    empty = empty[np.isfinite(empty["peak_flux"])]
    assert len(empty) > 500
    _assert_honest(empty["peak_flux"] / empty["peak_flux_err"], "empty-sky flux")


def test_completeness_rises_through_the_threshold(tmp_path):
    spec = SurveySpec(n_epochs=1, shape=(2048, 2048), n_steady=1500, flux_range=(4.0, 20.0), jitter=0.0,
                      seed=SEED + 100, **NOTHING)
    truth = load_truth(simulate_survey(tmp_path, spec))
    detections, _ = tm.extract_file(truth["images"][0]["path"], ExtractionParams(detection_threshold=5.0))
    src = truth["sources"]
    found = tm.match_nearest(src["ra"], src["dec"], detections["ra"], detections["dec"], spec.beam.smaj)[0] >= 0
    snr = src["peak_flux"][:, 0, 0] / spec.rms
    assert found[snr >= 10.0].mean() >= 0.99
    assert 0.9 <= found[(snr >= 6.5) & (snr < 10.0)].mean()
    assert 0.2 <= found[(snr >= 4.5) & (snr < 5.5)].mean() <= 0.8  # about half at the threshold
    assert found[snr < 4.5].mean() <= 0.35


@pytest.mark.parametrize("jitter_scale", [0.0, 10.0])
def test_association_neither_splits_nor_mixes_a_jittered_field_with_close_pairs(tmp_path, jitter_scale):
    """0.3-beam jitter, independent per source (a stress test) or as a phase screen of 10 beams
    (neighbours move together, as under the ionosphere): then the eta ranking is checked too."""
    from trap_dask.config import build_config
    from trap_dask.pipeline import run_pipeline

    spec = SurveySpec(n_epochs=8, shape=(2048, 2048), n_steady=900, n_variable=30, n_transient=20,
                      n_resolved=0, n_pairs=60, flux_range=(10.0, 100.0), jitter=0.3, jitter_scale=jitter_scale,
                      seed=SEED + 200)
    truth = load_truth(simulate_survey(tmp_path / "field", spec))
    db = tmp_path / "field.db"
    run_pipeline(build_config(dict(input_images=(str(tmp_path / "field"),), db_name=str(db),
                                   scheduler="threads", nr_threads=2), {}, None))
    figures = tm.association_figures(tm.read_light_curves(str(db), truth), truth, spec.beam.smaj)
    assert figures["split"] <= 0.01
    assert figures["mixed"] <= 0.01
    assert figures["transients_new"] == 1.0
    assert figures["unassigned"] <= 0.02
    if jitter_scale:
        assert figures["top_eta_variable_all"] >= 0.9
    else:  # pairs drift into blends: fitted as pairs (fit_blends) they stay out of the top N
        assert figures["top_eta_variable"] >= 0.8


def test_a_close_pair_seen_first_in_a_new_band_keeps_its_light_curves(tmp_path):
    """Three bands, the first image of the third (1.4 GHz) after the pairs are known from the
    other two: the pair fit starts each member where its flux puts it (a member of 13 mJy beside
    one of 60 no longer starts as if they were equal), so no light curve takes the other member's
    detections and no component of a fit gone wrong is stored as a detection."""
    import sqlite3

    from trap_dask.catalogue import PAIR_MIN_DETECTED_SNR
    from trap_dask.config import build_config
    from trap_dask.pipeline import run_pipeline

    spec = SurveySpec(n_epochs=3, freqs=(150e6, 160e6, 1.4e9), seed=5)
    truth = load_truth(simulate_survey(tmp_path / "field", spec))
    db = tmp_path / "field.db"
    run_pipeline(build_config(dict(input_images=(str(tmp_path / "field"),), db_name=str(db),
                                   scheduler="threads", nr_threads=2), {}, None))
    figures = tm.association_figures(tm.read_light_curves(str(db), truth), truth, spec.beam.smaj)
    assert figures["split"] == 0.0 and figures["mixed"] == 0.0 and figures["extra_ids"] == 0.0
    with sqlite3.connect(db) as conn:
        weakest, = conn.execute("SELECT min(significance_detection_level) FROM extracted_sources "
                                "WHERE is_force_fit = 0").fetchone()
    assert weakest >= PAIR_MIN_DETECTED_SNR

def test_optimal_association_keeps_a_close_pair_that_moved_together():
    # Two catalogue sources 60" apart east-west; both detections shifted 35" east.
    # Greedy gives the bright detection to the faint source's light curve (it is nearer) and
    # starts a new source; the best assignment keeps both light curves.
    from trap_dask.association import associate

    arcsec = 1.0 / 3600.0
    cat_ra, cat_dec = np.array([150.0, 150.0 + 60 * arcsec / np.cos(np.deg2rad(30))]), np.full(2, 30.0)
    shift = np.array([35.0, 0.0]) * arcsec
    det_ra = cat_ra + shift[0] / np.cos(np.deg2rad(30))
    det_dec = cat_dec + shift[1]
    unc = np.full(2, 10 * arcsec)
    greedy = associate(cat_ra, cat_dec, unc, unc, det_ra, det_dec, unc, unc)
    optimal = associate(cat_ra, cat_dec, unc, unc, det_ra, det_dec, unc, unc, optimal=True)
    assert greedy.source.tolist() != [0, 1]
    assert optimal.source.tolist() == [0, 1] and optimal.matched.all() and not optimal.is_duplicate.any()


@pytest.fixture(scope="module")
def small_jittered_field(tmp_path_factory):
    """10 epochs of a 1024x1024 field with close pairs, every position scattered by 0.05 beam
    (1.5") per axis per epoch, independently per source."""
    spec = SurveySpec(n_epochs=10, shape=(1024, 1024), n_steady=220, n_variable=10, n_transient=6,
                      n_resolved=0, n_pairs=15, flux_range=(10.0, 100.0), jitter=0.05, seed=SEED + 300)
    path = tmp_path_factory.mktemp("jittered")
    truth = load_truth(simulate_survey(path, spec))
    return path, truth, 0.05 * 2 * spec.beam.smaj * 3600.0


def _run_jittered(field, tmp_path, sys_err) -> tuple[dict, Path]:
    from trap_dask.config import build_config
    from trap_dask.pipeline import run_pipeline

    path, truth, _ = field
    db = tmp_path / f"field_{sys_err}.db"
    run_pipeline(build_config(dict(input_images=(str(path),), db_name=str(db), scheduler="threads", nr_threads=2,
                                   ew_sys_err=str(sys_err), ns_sys_err=str(sys_err), log_dir=str(tmp_path)), {}, None))
    return tm.association_figures(tm.read_light_curves(str(db), truth), truth, truth["spec"].beam.smaj), db


@pytest.mark.parametrize("factor", ["auto", 0.5, 5.0])
def test_light_curves_stay_whole_whatever_the_systematic_error(small_jittered_field, tmp_path, factor):
    """Issue 11: at half the true scatter (TraP 1.x splits light curves), at five times it, and
    measured ('auto'), one sky source keeps one src_id and the variables rank on top."""
    injected = small_jittered_field[2]
    figures, _ = _run_jittered(small_jittered_field, tmp_path, factor if factor == "auto" else factor * injected)
    assert figures["split"] == 0 and figures["mixed"] == 0 and figures["alive_twice"] == 0
    assert figures["transients_new"] == 1.0
    assert figures["top_eta_variable_all"] >= 0.9
    warned = "exceeds --ew_sys_err" in (tmp_path / "trap-dask.log").read_text()
    assert warned == (factor == 0.5)


def test_the_measured_scatter_is_the_injected_one(small_jittered_field, tmp_path):
    import sqlite3

    _, db = _run_jittered(small_jittered_field, tmp_path, "auto")
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT astrometry_n, astrometry_scatter_ra, astrometry_scatter_dec, ew_sys_err, "
                            "ns_sys_err FROM images ORDER BY id").fetchall()
    n, ra, dec, ew, ns = (np.array(c, dtype=float) for c in zip(*rows))
    injected = small_jittered_field[2]
    assert np.isnan(ra[0]) and (n[1:] >= 50).all()  # nothing to compare the first image with
    assert np.median(ra[1:]) == pytest.approx(injected, rel=0.2)
    assert np.median(dec[1:]) == pytest.approx(injected, rel=0.2)
    assert (ew[1:] >= ra[1:] - 1e-9).all() and (ns[1:] >= dec[1:] - 1e-9).all()  # never below the data's


def test_errors_set_far_below_the_scatter_are_widened_to_it(tmp_path):
    """Positions scattered by 0.2 beam (6") per axis per epoch, associated under a 1" setting:
    TraP 1.x's meaning (--no-widen_sys_err) splits light curves beyond link_radius's reach and
    makes false variables; widened, each image is associated with the scatter measured so far
    (stored as its ew_sys_err/ns_sys_err) and one sky source keeps one src_id."""
    import sqlite3

    from trap_dask.config import build_config
    from trap_dask.pipeline import run_pipeline

    spec = SurveySpec(n_epochs=8, shape=(1024, 1024), n_steady=200, n_variable=0, n_transient=0,
                      n_resolved=0, n_pairs=0, flux_range=(20.0, 100.0), jitter=0.2, seed=SEED + 310)
    truth = load_truth(simulate_survey(tmp_path / "field", spec))
    figures = {}
    for widen in (True, False):
        db = tmp_path / f"widen_{widen}.db"
        run_pipeline(build_config(dict(input_images=(str(tmp_path / "field"),), db_name=str(db), scheduler="threads",
                                       nr_threads=2, ew_sys_err="1", ns_sys_err="1", widen_sys_err=str(widen),
                                       log_dir=str(tmp_path / str(widen))), {}, None))
        figures[widen] = tm.association_figures(tm.read_light_curves(str(db), truth), truth, spec.beam.smaj)
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT astrometry_scatter_ra, ew_sys_err FROM images ORDER BY id").fetchall()
        scatter, used = (np.array(c, dtype=float) for c in zip(*rows))
        assert used[0] == (3.0 if widen else 1.0) and np.nanmedian(scatter) > 4.0  # 3": 0.1 beam, unmeasured
        assert (used[1:] > 4.0).all() if widen else (used == 1.0).all()
        assert ("associating with the scatter" in (tmp_path / str(widen) / "trap-dask.log").read_text()) == widen
    assert figures[False]["split"] > 0.03
    assert figures[True]["split"] <= 0.01 and figures[True]["mixed"] == 0


@pytest.mark.parametrize("dec", [30.0, 89.8])
def test_images_shifted_by_more_than_a_beam_keep_their_light_curves(tmp_path, dec):
    """Whole-field offsets of ~1 beam rms per image (up to ~3 beams between images): few
    detections lie within a beam of their source, so each image's shift is first found as the
    offset most bright pairs share, then taken out. Without the search 98-100% of the sources
    were split here. The same around the celestial pole (the field holds it), where the shift is
    one offset only in the tangent plane at the image's centre: 29% split when it was taken east
    and north at each source. 3.4% (2 sources, 3 extra src_ids) while a source found in a shifted
    image kept that image's offset in the catalogue."""
    from trap_dask.config import build_config
    from trap_dask.pipeline import run_pipeline

    spec = SurveySpec(n_epochs=8, shape=(512, 512), n_steady=50, n_variable=5, n_transient=4, n_resolved=0,
                      n_pairs=0, flux_range=(10.0, 100.0), jitter=0.7, jitter_scale=1000.0, seed=7,
                      centre=(150.0, dec))
    truth = load_truth(simulate_survey(tmp_path / "field", spec))
    db = tmp_path / "field.db"
    run_pipeline(build_config(dict(input_images=(str(tmp_path / "field"),), db_name=str(db), scheduler="threads",
                                   nr_threads=2), {}, None))
    figures = tm.association_figures(tm.read_light_curves(str(db), truth), truth, spec.beam.smaj)
    assert figures["split"] == 0 and figures["mixed"] == 0 and figures["extra_ids"] == 0
    assert figures["transients_new"] == 1.0 and figures["top_eta_variable"] >= 0.8


def test_images_shifted_as_a_whole_keep_their_light_curves(tmp_path):
    """0.3-beam (9") offsets that move the whole field together from image to image (a phase
    screen 100 beams wide): each image's measured shift is taken out before association."""
    from trap_dask.config import build_config
    from trap_dask.pipeline import run_pipeline

    spec = SurveySpec(n_epochs=10, shape=(1024, 1024), n_steady=220, n_variable=10, n_transient=6, n_resolved=0,
                      n_pairs=15, flux_range=(10.0, 100.0), jitter=0.3, jitter_scale=100.0, seed=SEED + 301)
    truth = load_truth(simulate_survey(tmp_path / "field", spec))
    db = tmp_path / "field.db"
    run_pipeline(build_config(dict(input_images=(str(tmp_path / "field"),), db_name=str(db), scheduler="threads",
                                   nr_threads=2), {}, None))
    figures = tm.association_figures(tm.read_light_curves(str(db), truth), truth, spec.beam.smaj)
    assert figures["split"] == 0 and figures["mixed"] == 0 and figures["alive_twice"] == 0
    assert figures["transients_new"] == 1.0 and figures["top_eta_variable_all"] >= 0.9


def test_forced_fits_and_new_sources_follow_each_images_shift(tmp_path):
    """Whole-field offsets of 0.5 beam rms per image: the catalogue keeps its positions in one frame
    (each detection with its image's measured shift taken out) and a forced fit is placed where the
    image shows its source (the catalogue position with the image's shift). Before, forced fits
    were placed at the catalogue positions, 78-94% of them more than a quarter beam from their
    source at 0.3-0.5 beam offsets (fluxes at half their value), and a transient kept the offset of
    the image that found it: at 1-beam offsets its next detection started another light curve."""
    from trap_dask.config import build_config
    from trap_dask.pipeline import run_pipeline
    from trap_dask.sky import haversine

    spec = SurveySpec(n_epochs=12, shape=(512, 512), n_steady=50, n_variable=10, n_transient=8, n_resolved=0,
                      n_pairs=0, flux_range=(10.0, 100.0), transient_decay=(1.0, 2.0), jitter=0.5,
                      jitter_scale=1000.0, seed=SEED + 11)
    truth = load_truth(simulate_survey(tmp_path / "field", spec))
    db = tmp_path / "field.db"
    run_pipeline(build_config(dict(input_images=(str(tmp_path / "field"),), db_name=str(db), scheduler="threads",
                                   nr_threads=2), {}, None))
    lc = tm.read_light_curves(str(db), truth)
    figures = tm.association_figures(lc, truth, spec.beam.smaj)
    assert figures["split"] == 0 and figures["mixed"] == 0 and figures["extra_ids"] == 0
    assert figures["transients_new"] == 1.0
    owner = tm.assign_truth(lc, truth, spec.beam.smaj)
    true_of = dict(zip(lc["src_id"][owner >= 0].tolist(), owner[owner >= 0].tolist()))
    forced = np.flatnonzero(lc["is_force_fit"] & np.isin(lc["src_id"], list(true_of)))
    true = np.array([true_of[s] for s in lc["src_id"][forced].tolist()])
    src, epoch = truth["sources"], lc["epoch"][forced]
    off = 2 * np.arcsin(np.sqrt(haversine(lc["ra"][forced], lc["dec"][forced], src["ra_epoch"][true, epoch],
                                          src["dec_epoch"][true, epoch])))
    assert len(forced) >= 10
    assert np.percentile(np.rad2deg(off), 90) < 0.25 * 2 * spec.beam.smaj


def test_barely_resolved_sources_are_measured_at_their_size_with_honest_errors(tmp_path):
    """Gaussians 1.0-1.5 beams across (intrinsic 0.2-1.1 beam majors), between the point sources
    and the resolved ones the other tests hold: the free fits' integrated fluxes and sizes are
    unbiased, and their flux errors honest."""
    spec = SurveySpec(n_epochs=1, shape=(2048, 2048), n_steady=0, n_resolved=400, resolved_size=(0.2, 1.1),
                      flux_range=(20.0, 200.0), jitter=0.0, seed=SEED + 400,
                      **{k: v for k, v in NOTHING.items() if k != "n_resolved"})
    truth = load_truth(simulate_survey(tmp_path, spec))
    detections, _ = tm.extract_file(truth["images"][0]["path"], ExtractionParams(detection_threshold=8.0))
    src = truth["sources"]
    idx, _ = tm.match_nearest(src["ra"], src["dec"], detections["ra"], detections["dec"], spec.beam.smaj)
    assert (idx >= 0).all() and len(detections) == len(idx)
    found = detections[idx]
    true_flux = src["int_flux"][:, 0, 0]
    _assert_honest((found["int_flux"] - true_flux) / found["int_flux_err"], "integrated flux")
    for name, true in (("int_flux", true_flux), ("semimajor_axis", src["smaj"]), ("semiminor_axis", src["smin"])):
        assert abs(np.median(found[name] / true) - 1.0) < 0.01, name


def test_faint_resolved_sources_are_force_fitted_at_their_integrated_flux(tmp_path):
    """Resolved sources 1.5-3 beams across near the detection threshold go undetected in some
    images: their forced fits measure the integrated flux with their own shape (the default), where
    TraP 1.x's beam-shaped fits measure a fraction of it and make false variables."""
    from trap_dask.config import build_config
    from trap_dask.pipeline import run_pipeline

    spec = SurveySpec(n_epochs=10, shape=(1024, 1024), n_steady=30, n_variable=0, n_transient=0, n_resolved=40,
                      n_pairs=0, flux_range=(6.0, 11.0), jitter=0.05, seed=SEED + 300)
    truth = load_truth(simulate_survey(tmp_path / "field", spec))
    resolved = truth["sources"]["kind"] == "resolved"
    ratio, eta = {}, {}
    for shaped in (True, False):
        db = tmp_path / f"field_{shaped}.db"
        run_pipeline(build_config(dict(input_images=(str(tmp_path / "field"),), db_name=str(db), scheduler="threads",
                                       nr_threads=2, fit_source_shape=shaped), {}, None))
        lc = tm.read_light_curves(str(db), truth)
        detected = tm.assign_truth(lc, truth, spec.beam.smaj)
        # a forced fit belongs to the true source that most of its light curve's detections belong to
        owner = np.full(len(detected), -1)
        for src_id in np.unique(lc["src_id"][detected >= 0]):
            mine = lc["src_id"] == src_id
            owner[mine] = np.bincount(detected[mine & (detected >= 0)]).argmax()
        forced = lc["is_force_fit"] & (owner >= 0) & resolved[np.maximum(owner, 0)]
        true_flux = truth["sources"]["int_flux"][owner[forced], lc["epoch"][forced], 0]
        ratio[shaped] = np.median(lc["int_flux"][forced] / true_flux)
        measured = np.unique(lc["src_id"][forced])
        eta[shaped] = np.median(lc["var_eta"][np.isin(lc["var_src"], measured)])
        assert forced.sum() >= 40  # the test measures forced fits of resolved sources
    # undetected in those images, they are fainter there than on average (0.89 at this seed)
    assert 0.75 <= ratio[True] <= 1.1
    assert ratio[False] <= 0.6
    assert eta[True] < 0.2 * eta[False]
