"""End to end: simulated surveys with known truth through `trap-dask run` into SQLite, and the
science checks into PostgreSQL too (``exported``)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _runs import dump, spawn
from astropy.io import fits
from astropy.wcs import WCS
from conftest import BACKENDS, postgres_settings

from trap_dask.config import build_config
from trap_dask.db.backends import DatabaseSettings, drop_database, make_engine
from trap_dask.pipeline import run_pipeline
from trap_dask.simulate import SurveySpec, load_truth, simulate_survey

pytestmark = pytest.mark.slow

SPEC = SurveySpec(n_epochs=8, shape=(384, 384), n_steady=25, n_variable=6, n_transient=3, n_resolved=2,
                  n_pairs=2, seed=7)
MATCH_ARCSEC = 10.0
#: A 10-sigma source is found with certainty only well above the detection threshold.
THRESHOLDS = {"detection_threshold": 5.0, "analysis_threshold": 3.0}


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = tmp_path_factory.mktemp("survey")
    return load_truth(simulate_survey(out, SPEC))


def run(inputs, db, **flags) -> Path:
    values = {"input_images": tuple(str(i) for i in inputs), "db_name": str(db), "scheduler": "threads",
              "nr_threads": 2, **THRESHOLDS, **flags}
    run_pipeline(build_config(values, {}, None))
    return Path(db)


def connect(db: Path) -> sqlite3.Connection:
    """Read-only, so that polling a database never creates it."""
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def query(db: Path | DatabaseSettings, sql: str, *args) -> list[tuple]:
    """Rows of ``sql`` in a SQLite file (``?`` parameters) or a database on any backend (none)."""
    if isinstance(db, DatabaseSettings):
        assert not args
        engine = make_engine(db)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.exec_driver_sql(sql).all()]
        finally:
            engine.dispose()
    with connect(db) as conn:
        return conn.execute(sql, args).fetchall()


def table(db: Path, name: str, drop=()) -> list[tuple]:
    with connect(db) as conn:
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({name})") if r[1] not in drop]
        return conn.execute(f"SELECT {', '.join(cols)} FROM {name} ORDER BY 1, 2").fetchall()


@pytest.fixture(scope="module")
def processed(survey, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "run.db"
    return run([Path(survey["images"][0]["path"]).parent], db)


@pytest.fixture(scope="module", params=BACKENDS)
def exported(request, processed, survey):
    """The survey's export on each backend (SQLite: ``processed``)."""
    if request.param == "sqlite":
        yield processed
        return
    settings = postgres_settings(f"trap_dask_test_{uuid.uuid4().hex[:12]}")
    run([Path(survey["images"][0]["path"]).parent], settings.name, db_backend="postgres", db_host=settings.host,
        db_port=settings.port, db_user=settings.user)
    yield settings
    drop_database(settings)


def detections_by_image(db):
    rows = query(db, "SELECT i.url, x.ra, x.dec, x.src_id, x.is_force_fit FROM extracted_sources x "
                     "JOIN images i ON i.id = x.im_id")
    out: dict[str, list] = {}
    for url, ra, dec, src, forced in rows:
        if not forced:
            out.setdefault(url, []).append((ra, dec, src))
    return {k: np.array(v) for k, v in out.items()}


def match(truth_ra, truth_dec, found):
    """src_id of the nearest detection within MATCH_ARCSEC of each true position (-1: none)."""
    if len(found) == 0:
        return np.full(len(truth_ra), -1)
    dra = (found[None, :, 0] - truth_ra[:, None]) * np.cos(np.deg2rad(truth_dec[:, None]))
    sep = np.hypot(dra, found[None, :, 1] - truth_dec[:, None]) * 3600
    best = sep.argmin(axis=1)
    return np.where(sep[np.arange(len(best)), best] < MATCH_ARCSEC, found[best, 2], -1).astype(int)


def test_export_tables_are_filled(exported, survey):
    n_images = len(survey["images"])
    assert query(exported, "SELECT count(*), sum(CAST(rejected AS INTEGER)) FROM images")[0] == (n_images, 0)
    for name in ("extracted_sources", "variability", "frequencybands", "config", "newsource", "runningcatalog"):
        assert query(exported, f"SELECT count(*) FROM {name}")[0][0] > 0, name
    assert query(exported, "SELECT status, n_images FROM runs") == [("completed", n_images)]


def test_both_backends_export_the_same_tables(exported, processed):
    """The PostgreSQL export equals the SQLite one (on SQLite, ``exported`` is that one)."""
    if exported is processed:
        return
    assert dump(exported) == dump(DatabaseSettings("sqlite", str(processed)))


def test_every_bright_source_found_in_every_image(exported, survey):
    truth, found = survey["sources"], detections_by_image(exported)
    for image in survey["images"]:
        e, b = image["epoch"], image["band"]
        bright = ((truth["peak_flux"][:, e, b] >= 10 * SPEC.rms)
                  & np.isin(truth["kind"], ["steady", "variable", "transient"]))
        ids = match(truth["ra_epoch"][bright, e], truth["dec_epoch"][bright, e], found[image["path"]])
        assert (ids >= 0).all(), f"missed {np.sum(ids < 0)} bright sources in {image['path']}"


def test_steady_sources_keep_one_src_id(exported, survey):
    truth, found = survey["sources"], detections_by_image(exported)
    steady = truth["kind"] == "steady"
    ids = np.array([match(truth["ra_epoch"][steady, i["epoch"]], truth["dec_epoch"][steady, i["epoch"]],
                          found[i["path"]])
                    for i in survey["images"]])
    assert (ids >= 0).all()
    assert (ids == ids[0]).all(), "a steady source was split over several src_ids"
    assert len(np.unique(ids[0])) == steady.sum(), "two steady sources were merged"


def test_transients_are_new_sources_at_switch_on(exported, survey):
    truth = survey["sources"]
    found = detections_by_image(exported)
    epochs = {i["epoch"]: i["path"] for i in survey["images"]}
    new = dict(query(exported, "SELECT n.src_id, i.url FROM newsource n JOIN images i ON i.id = n.im_id"))
    for k in np.flatnonzero(truth["kind"] == "transient"):
        on = int(truth["switch_on_epoch"][k])
        src = match(truth["ra_epoch"][[k], on], truth["dec_epoch"][[k], on], found[epochs[on]])[0]
        assert src >= 0 and new.get(src) == epochs[on]


def test_variability_matches_the_stored_light_curves(exported):
    rows = query(exported, "SELECT x.src_id, i.freq_band, x.int_flux, x.int_flux_err FROM extracted_sources x "
                            "JOIN images i ON i.id = x.im_id")
    curves: dict = {}
    for src, band, flux, err in rows:
        curves.setdefault((src, band), []).append((flux, err))
    stored = query(exported, "SELECT src_id, freq_band, v_int, eta_int, nr_datapoints, lightcurve_max FROM variability")
    assert len(stored) == len(curves)
    for src, band, v, eta, n, lc_max in stored:
        flux, err = np.array(curves[(src, band)]).T
        assert n == len(flux)
        assert lc_max == pytest.approx(flux.max())
        if n < 2:
            continue
        w = 1 / err**2
        assert v == pytest.approx(flux.std(ddof=1) / flux.mean(), rel=1e-6)
        direct_eta = n / (n - 1) * (np.mean(w * flux**2) - np.mean(w * flux) ** 2 / np.mean(w))
        assert eta == pytest.approx(direct_eta, rel=1e-6, abs=1e-9)


def test_every_parent_is_the_previous_measurement(exported):
    """In time order: a new source's forced fit in the previous image is its detection's parent."""
    rows = query(exported, "SELECT x.id, x.src_id, x.parent, x.is_duplicate FROM extracted_sources x "
                            "JOIN images i ON i.id = x.im_id ORDER BY i.taustart_ts, x.id")
    last: dict[int, int] = {}
    by_id = {r[0]: r for r in rows}
    for xid, src, parent, duplicate in rows:
        if duplicate:
            assert parent in by_id and by_id[parent][1] != src
        else:
            assert parent == last.get(src, -1)
        last[src] = xid


def test_shuffled_input_order_gives_the_same_database(processed, survey, tmp_path):
    rng = np.random.default_rng(3)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    paths = [i["path"] for i in survey["images"]]
    names = rng.permutation(len(paths))
    inputs = []
    for path, name in zip(paths, names):  # names no longer sort in time order
        target = shuffled / f"img_{name:03d}.fits"
        shutil.copy(path, target)
        inputs.append(target)
    db = run([inputs[i] for i in rng.permutation(len(inputs))], tmp_path / "s.db")
    for name in ("extracted_sources", "variability", "newsource"):
        assert table(db, name) == table(processed, name), name
    same_file = ("url", "file_size", "file_mtime")  # copies: other paths and stamps (none if read as written)
    assert table(db, "images", drop=same_file) == table(processed, "images", drop=same_file)


def test_worker_count_does_not_change_the_result(survey, tmp_path):
    folder = Path(survey["images"][0]["path"]).parent
    one = run([folder], tmp_path / "one.db", scheduler="distributed", nr_threads=1)
    two = run([folder], tmp_path / "two.db", scheduler="distributed", nr_threads=2)
    for name in ("images", "extracted_sources", "variability", "newsource", "runningcatalog", "frequencybands"):
        stamps = ("file_size", "file_mtime") if name == "images" else ()  # none for a file read as it was written
        assert table(one, name, drop=stamps) == table(two, name, drop=stamps), name


def test_existing_database_is_refused_without_overwrite(processed, survey, tmp_path):
    db = tmp_path / "x.db"
    db.write_bytes(b"")
    code = subprocess.run([sys.executable, "-m", "trap_dask.cli", "run", "-i", survey["images"][0]["path"],
                           "--db-name", str(db)], capture_output=True, text=True)
    assert code.returncode == 1 and "--db_overwrite" in code.stderr


def test_sigkill_leaves_a_consistent_prefix(tmp_path):
    spec = replace(SPEC, n_epochs=40, shape=(256, 256), n_steady=10, n_variable=2, n_transient=1,
                   n_resolved=0, n_pairs=0, min_separation=4.0, seed=11)
    simulate_survey(tmp_path / "long", spec)
    db = tmp_path / "killed.db"
    proc = spawn(
        [sys.executable, "-m", "trap_dask.cli", "run", "-i", str(tmp_path / "long"), "--db-name", str(db),
         "--scheduler", "distributed", "--nr_threads", "2"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr.txt", "w"),
    )
    deadline = time.monotonic() + 120
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            committed = query(db, "SELECT count(*) FROM images")[0][0]
        except sqlite3.Error:
            continue
        if committed >= 5:
            break
    assert proc.poll() is None, ("the run ended before it could be killed: "
                                 + (tmp_path / "stderr.txt").read_text()[-2000:])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    images = query(db, "SELECT id, n_sources, n_forced FROM images ORDER BY id")
    assert 5 <= len(images) < spec.n_epochs
    assert [i[0] for i in images] == list(range(len(images)))  # ids from 0
    for im_id, n_sources, n_forced in images:
        assert query(db, "SELECT sum(NOT is_force_fit), sum(is_force_fit) FROM extracted_sources WHERE im_id = ?",
                     im_id)[0] == (n_sources, n_forced)
    orphans = query(db, "SELECT count(*) FROM extracted_sources WHERE parent <> -1 AND parent NOT IN "
                        "(SELECT id FROM extracted_sources)")[0][0]
    assert orphans == 0
    counts = query(db, "SELECT v.nr_datapoints, (SELECT count(*) FROM extracted_sources x WHERE x.src_id = v.src_id) "
                       "FROM variability v")
    assert all(a == b for a, b in counts)
    assert query(db, "SELECT status FROM runs") == [("running",)]


DATA = Path(__file__).parent / "data"


def test_real_images_and_an_unusable_file_are_all_recorded(tmp_path):
    db = run([DATA], tmp_path / "real.db")
    rows = query(db, "SELECT url, rejected, rejection_reason, n_sources FROM images ORDER BY id")
    assert len(rows) == 4
    by_name = {Path(url).name: (rejected, reason, n) for url, rejected, reason, n in rows}
    rejected, reason, _ = by_name["missing_metadata.fits"]
    assert rejected == 1 and "frequency" in reason
    for name in ("GRB120422A-120429.fits", "SWIFT_554620-130504.fits",
                 "GRB201006A_final_2min_srcs-t0002-image-pb_cutout.fits"):
        rejected, reason, n_sources = by_name[name]
        assert rejected == 0 and reason is None and n_sources > 0, name
    # three fields far apart: every detection starts its own light curve in its own band
    assert query(db, "SELECT count(DISTINCT src_id) = count(*) FROM extracted_sources")[0][0] == 1


def test_inputs_are_files_directories_and_globs_and_broken_links_are_recorded(tmp_path):
    from trap_dask.pipeline import PipelineError, find_images

    deep = tmp_path / "obs" / "night1"
    deep.mkdir(parents=True)
    shutil.copy(DATA / "GRB120422A-120429.fits", deep / "a.fits")
    shutil.copy(DATA / "SWIFT_554620-130504.fits", tmp_path / "obs" / "b.FITS")
    shutil.copy(DATA / "SWIFT_554620-130504.fits", tmp_path / "named.img")
    (deep / "notes.txt").write_text("not an image")
    (deep / "0gone.fits").symlink_to(tmp_path / "deleted.fits")  # sorts first in its directory
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "only.fits").symlink_to(tmp_path / "deleted2.fits")
    (tmp_path / "named.fits").symlink_to(tmp_path / "deleted3.fits")
    found = find_images((str(tmp_path / "obs"), str(tmp_path / "named.img"), str(tmp_path / "ob*")))
    assert sorted(Path(f).name for f in found) == ["0gone.fits", "a.fits", "b.FITS", "named.img"]
    with pytest.raises(PipelineError, match="matches no file"):
        find_images((str(tmp_path / "nothing*.fits"),))
    # a linked-in directory is searched (each real directory once: a link back up is no loop),
    # and fpack's .fits.fz files are found as the other compressed FITS files are
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(DATA / "GRB120422A-120429.fits", elsewhere / "c.fits.fz")
    (elsewhere / "obs").symlink_to(tmp_path / "obs", target_is_directory=True)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "night2").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "up").symlink_to(tmp_path / "linked", target_is_directory=True)  # a loop: linked/night2/up
    found = find_images((str(tmp_path / "linked"),))
    assert sorted(Path(f).name for f in found) == ["0gone.fits", "a.fits", "b.FITS", "c.fits.fz"]
    assert str(deep / "0gone.fits") in found  # a broken link under its real folder, whichever way it was reached
    db = run([tmp_path / "obs", tmp_path / "lonely", tmp_path / "named.fits"], tmp_path / "inputs.db")
    rows = dict(query(db, "SELECT url, rejection_reason FROM images"))
    assert len(rows) == 5
    for link in (deep / "0gone.fits", tmp_path / "lonely" / "only.fits", tmp_path / "named.fits"):
        assert rows[str(link)] == "file not found"
    assert rows[str((deep / "a.fits").resolve())] is None


def test_quality_control_rejects_images_with_their_reason(survey, tmp_path, capsys):
    """Rejected images are recorded with their reason, and the log names each with it."""
    db = run([Path(survey["images"][0]["path"]).parent], tmp_path / "qc.db", rms_max=SPEC.rms / 2)
    rows = query(db, "SELECT url, rejected, rejection_reason FROM images")
    assert len(rows) == len(survey["images"])
    assert all(rejected == 1 and "rms_max" in reason for _, rejected, reason in rows)
    assert query(db, "SELECT count(*) FROM extracted_sources")[0][0] == 0
    logged = [line.split(" WARNING ", 1)[1] for line in capsys.readouterr().err.splitlines()
              if " WARNING rejected " in line]
    assert sorted(logged) == sorted(f"rejected {url}: {reason}" for url, _, reason in rows)


def test_images_with_unusable_headers_are_rejected_and_the_run_goes_on(survey, tmp_path, monkeypatch):
    """A header keyword that is not a number (EXPTIME = 'long') and a header astropy cannot read at
    all (any error of the reader) reject their image with the reason; the other images are processed."""
    import trap_dask.tasks

    inputs = tmp_path / "inputs"
    shutil.copytree(Path(survey["images"][0]["path"]).parent, inputs)
    first, second = sorted(inputs.glob("*.fits"))[2:4]
    with fits.open(first, mode="update") as hdul:
        hdul[0].header["EXPTIME"] = "long"
    real = trap_dask.tasks.read_meta

    def chokes_on_second(path, **kwargs):
        if Path(path).name == second.name:
            raise KeyError("CDELT1")  # what a reader's bug would raise
        return real(path, **kwargs)

    monkeypatch.setattr(trap_dask.tasks, "read_meta", chokes_on_second)
    db = run([inputs], tmp_path / "headers.db")
    rejected = dict(query(db, "SELECT url, rejection_reason FROM images WHERE rejected"))
    assert rejected == {str(first): "unreadable EXPTIME='long': not a number",
                        str(second): "unreadable header: 'CDELT1'"}
    assert query(db, "SELECT count(*) FROM images WHERE NOT rejected")[0][0] == len(survey["images"]) - 2
    assert query(db, "SELECT count(*) FROM images WHERE checksum IS NULL")[0][0] == 0


def test_monitor_position_is_measured_in_every_image(survey, tmp_path):
    truth = survey["sources"]
    k = int(np.flatnonzero(truth["kind"] == "transient")[0])
    on = int(truth["switch_on_epoch"][k])
    position = f"[[{truth['ra'][k]}, {truth['dec'][k]}]]"
    db = run([Path(survey["images"][0]["path"]).parent], tmp_path / "mon.db", monitor_loc=position)
    (src,) = query(db, "SELECT src_id FROM monitor")[0]
    rows = query(db, "SELECT i.taustart_ts, x.peak_flux, x.peak_flux_err, x.is_force_fit FROM extracted_sources x "
                     "JOIN images i ON i.id = x.im_id WHERE x.src_id = ? ORDER BY i.taustart_ts", src)
    assert len(rows) == len(survey["images"]) and all(r[3] for r in rows)
    flux = np.array([r[1] for r in rows])
    err = np.array([r[2] for r in rows])
    true = truth["peak_flux"][k, :, 0]
    assert np.all(np.abs(flux - true) < 5 * err), "forced fluxes disagree with the truth"
    assert np.all(np.abs(flux[:on]) < 5 * err[:on])      # nothing there before switch-on


def test_an_image_that_breaks_the_extractor_is_rejected_and_the_run_goes_on(survey, tmp_path, monkeypatch):
    import threading

    import trap_dask.tasks

    real, calls, lock = trap_dask.tasks.extract_image, [], threading.Lock()

    def fails_once(image, params):
        with lock:
            calls.append(1)
            first = len(calls) == 1
        if first:
            raise RuntimeError("boom")
        return real(image, params)

    monkeypatch.setattr(trap_dask.tasks, "extract_image", fails_once)
    db = run([Path(survey["images"][0]["path"]).parent], tmp_path / "bad.db")
    rejected = query(db, "SELECT rejection_reason, checksum FROM images WHERE rejected")
    assert [r[0] for r in rejected] == ["processing failed: boom"]
    assert rejected[0][1] is not None   # its contents are known: an append skips it, not records it again
    assert query(db, "SELECT count(*) FROM images WHERE NOT rejected")[0][0] == len(survey["images"]) - 1
    monkeypatch.setattr(trap_dask.tasks, "extract_image", real)
    summary = run_pipeline(build_config({"input_images": (str(Path(survey["images"][0]["path"]).parent),),
                                         "db_name": str(db), "db_append": True, "scheduler": "threads",
                                         "nr_threads": 2, **THRESHOLDS}, {}, None))
    assert summary.n_images == 0 and summary.n_skipped == len(survey["images"])


def test_new_sources_are_measured_in_the_previous_image_of_their_band(processed, tmp_path):
    """A new source's light curve starts with a forced fit in the band's previous image, which
    counts in that image's n_forced; --no-backfill_new_sources gives TraP's light curves."""
    news = query(processed, "SELECT n.src_id, n.im_id FROM newsource n")
    assert news
    for src_id, im_id in news:
        rows = query(processed, "SELECT x.im_id, x.is_force_fit FROM extracted_sources x WHERE x.src_id = ? "
                                "AND x.im_id < ? ORDER BY x.im_id", src_id, im_id)
        previous = query(processed, "SELECT max(p.id) FROM images p JOIN images i ON i.id = ? "
                                    "WHERE p.id < i.id AND p.rejected = 0 AND p.freq_band = i.freq_band", im_id)[0][0]
        assert rows == [(previous, 1)], (src_id, im_id, rows)
        (points,) = query(processed, "SELECT nr_datapoints FROM variability WHERE src_id = ?", src_id)[0]
        assert points == len(query(processed, "SELECT id FROM extracted_sources WHERE src_id = ?", src_id))
    counted = query(processed, "SELECT i.n_sources + i.n_forced, count(x.id) FROM images i "
                               "JOIN extracted_sources x ON x.im_id = i.id GROUP BY i.id")
    assert all(a == b for a, b in counted)

    plain = run([Path(query(processed, "SELECT url FROM images")[0][0]).parent], tmp_path / "plain.db",
                backfill_new_sources=False)
    for src_id, im_id in query(plain, "SELECT src_id, im_id FROM newsource"):
        assert not query(plain, "SELECT id FROM extracted_sources WHERE src_id = ? AND im_id < ?", src_id, im_id)


def test_backfill_reads_the_previous_image_again_when_no_worker_holds_it(survey, caplog):
    """Append and resume measure new sources in an image of the earlier run from its file."""
    from trap_dask import tasks
    from trap_dask.catalogue import ForcedRequest
    from trap_dask.config import build_config as config_of
    from trap_dask.pipeline import extraction_params, quality_params

    config = config_of({"input_images": ("x",), **THRESHOLDS}, {}, None)
    params, quality = extraction_params(config), quality_params(config)
    path = survey["images"][0]["path"]
    started = time.process_time()
    held = tasks.process(tasks.scan(path), quality, params)
    assert 0 < held.result.cpu <= time.process_time() - started  # its CPU time, for trap-dask bench
    ra, dec = survey["sources"]["ra"][:5], survey["sources"]["dec"][:5]
    # and a beam north of each: fitted together with the detection there (fit_beside_detections),
    # which the image read again must find too (it is extracted again)
    ra, dec = np.r_[ra, ra], np.r_[dec, dec + 2.0 * held.prepared.beam.smaj]
    none = np.zeros((0, 2))
    request = ForcedRequest(ra[:0], dec[:0], none, none, ra, dec, 0, 1, path)
    from_worker = tasks.backfill(held, request, params, quality)
    from_file = tasks.backfill(None, request, params, quality)
    assert len(from_worker) == 10 and np.isfinite(from_worker["int_flux"]).all()
    alone = tasks.forced_fit(held.prepared, ra, dec, params)
    assert (from_worker["int_flux"][5:] != alone["int_flux"][5:]).all()
    assert from_file.tobytes() == from_worker.tobytes()
    logger = logging.getLogger("trap_dask.tasks")  # (a run before may have kept its messages from the root)
    logger.addHandler(caplog.handler)
    try:
        assert tasks.backfill(None, replace(request, backfill_url=path + ".moved"), params, quality) is None
    finally:
        logger.removeHandler(caplog.handler)
    assert f"{path}.moved: new sources not measured in it (file not found)" in caplog.text


def test_default_window_leaves_room_for_each_bands_held_image():
    from types import SimpleNamespace

    from trap_dask.pipeline import BYTES_PER_PIXEL, default_window

    def metas(n_bands):
        return [SimpleNamespace(shape=(2048, 2048), freq_eff=1.2e8 + 1e6 * (i % n_bands)) for i in range(16)]

    twelve_images = 2 * 12 * BYTES_PER_PIXEL * 2048 * 2048
    assert default_window(metas(1), 8, twelve_images) == 10  # at most threads + 2
    assert default_window(metas(8), 8, twelve_images) == 4
    assert default_window(metas(1), 1, twelve_images) == 3
    assert default_window(metas(16), 8, twelve_images) == 2  # never fewer than 2


def test_the_interpreter_is_tuned_during_a_run_and_restored_after(survey, tmp_path):
    """While the run lasts, its threads (extraction, writer, Dask's loop) hand the GIL over every
    GIL_SWITCH_S and the objects of the imported modules are frozen out of the garbage collector's
    passes; the caller's Python gets its own settings back afterwards."""
    import gc

    from trap_dask.pipeline import GIL_SWITCH_S

    seen = []

    @contextmanager
    def observe(client):
        seen.append((sys.getswitchinterval(), gc.get_freeze_count(), gc.isenabled()))
        yield

    before = sys.getswitchinterval()
    assert gc.get_freeze_count() == 0
    values = {"input_images": (str(Path(survey["images"][0]["path"]).parent),), "db_name": str(tmp_path / "gil.db"),
              "nr_threads": 2, **THRESHOLDS}
    gc.disable()  # as `trap-dask run` leaves it while it imports: the run collects all the same
    try:
        run_pipeline(build_config(values, {}, None), observe=observe)
        collecting_after = gc.isenabled()
    finally:
        gc.enable()
    (interval, frozen, collecting), = seen
    assert interval == GIL_SWITCH_S < before and frozen > 10_000 and collecting  # every module's objects
    assert sys.getswitchinterval() == before and gc.get_freeze_count() == 0 and not collecting_after


_RELEASE = threading.Event()


def _held_task() -> bool:
    """A task that runs until the test releases it (at most 5 s)."""
    return _RELEASE.wait(5.0)


def test_a_stopped_run_waits_for_the_tasks_still_running_before_it_closes_the_cluster():
    """_drain returns once no image's task runs on the workers (a task already running when a run
    stops finishes its writer calls before the cluster, and the writer actor with it, goes away);
    another client's task on a shared cluster is not waited for."""
    from distributed import Client, LocalCluster

    from trap_dask.pipeline import _drain

    _RELEASE.clear()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        running = client.submit(_held_task, key="process-0-held.fits")
        others = client.submit(_held_task, key="someone-else")
        while len(sum(client.run(lambda dask_worker: list(dask_worker.state.executing)).values(), [])) < 2:
            time.sleep(0.01)
        threading.Timer(0.3, _RELEASE.set).start()
        started = time.monotonic()
        _drain(client, 10.0)
        assert running.done() and running.result() is True
        assert 0.2 < time.monotonic() - started < 5.0
        _RELEASE.clear()
        others.result()  # released above; now hold another client's task
        foreign = client.submit(_held_task, key="someone-else-2")
        while not sum(client.run(lambda dask_worker: len(dask_worker.state.executing)).values()):
            time.sleep(0.01)
        started = time.monotonic()
        _drain(client, 10.0)  # no image's task running: returns at once
        assert time.monotonic() - started < 1.0 and not foreign.done()
        _RELEASE.set()


def test_a_new_writer_carries_on_at_the_first_image_not_in_the_database():
    """The client's progress follows each summary's ``written_through``: a copy of an earlier input
    (recorded nothing) does not move it past images still staged, and an image written in a later
    batch moves it on only once a summary says the database holds it."""
    from trap_dask.messages import CommitSummary
    from trap_dask.pipeline import _Progress

    def summary(im_id: int, written_through: int, **kwargs) -> CommitSummary:
        return CommitSummary(im_id, False, 1, 0, 0, staged=True, written_through=written_through, **kwargs)

    progress, where = _Progress(), []
    for index, answer in enumerate([
        summary(0, -1),                      # staged
        summary(-1, -1, copy_of="/a.fits"),  # a copy: nothing recorded, image 0 still staged
        summary(1, -1),                      # staged; images 0 and 1 then in flight
        summary(2, 0),                       # image 0 written
        summary(-1, 0, stored=True),         # in the database already (a lost writer's)
        summary(3, 3),                       # everything written
    ]):
        progress.answered(index, answer)
        where.append(progress.image)
    assert where == [0, 0, 0, 2, 2, 6]


def test_a_run_whose_last_transaction_fails_fails_and_leaves_a_prefix(survey, tmp_path, monkeypatch):
    """The last image's transaction (written when the writer finishes) is refused: the run stops
    with the database's reason and how to resume, is recorded as failed, and the database holds
    the images before it."""
    from trap_dask import writer as writer_module
    from trap_dask.db.backends import DatabaseError
    from trap_dask.pipeline import PipelineError

    real = writer_module.write_batch
    last = len(survey["images"]) - 1

    def write_batch(store, images):
        if any(row["id"] == last for row, _ in images):
            raise DatabaseError("disk full")
        return real(store, images)

    monkeypatch.setattr(writer_module, "write_batch", write_batch)
    db = tmp_path / "full.db"
    with pytest.raises(PipelineError, match=r"disk full.*--db_append"):
        run([Path(i["path"]) for i in survey["images"]], db)
    ids = [i for i, in query(db, "SELECT id FROM images ORDER BY id")]
    assert ids == list(range(len(ids))) and len(ids) < len(survey["images"])
    assert query(db, "SELECT status FROM runs") == [("failed",)]


def test_the_observer_of_a_failed_run_is_told_how_it_ended(survey, tmp_path, monkeypatch):
    """A run that stops (here: its first transaction refused) exits the observer's context with its
    error, so that trap-dask bench asks nothing more of a cluster that may not answer."""

    from trap_dask import writer as writer_module
    from trap_dask.db.backends import DatabaseError
    from trap_dask.pipeline import PipelineError

    def write_batch(store, images):
        raise DatabaseError("disk full")

    monkeypatch.setattr(writer_module, "write_batch", write_batch)
    ended = []

    @contextmanager
    def observe(client):
        try:
            yield
            ended.append(None)
        except BaseException as exc:
            ended.append(type(exc).__name__)
            raise

    values = {"input_images": tuple(i["path"] for i in survey["images"]), "db_name": str(tmp_path / "full.db"),
              "nr_threads": 2, **THRESHOLDS}
    with pytest.raises(PipelineError, match="disk full"):
        run_pipeline(build_config(values, {}, None), observe=observe)
    assert ended == ["DatabaseError"]  # the writer's (the caller gets it as a PipelineError)


@pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")
def test_a_hot_pixel_in_a_later_image_is_no_new_source(survey, tmp_path):
    """One pixel of S/N 200 in the fifth image, far from every source: left out as an artefact (the
    run's summary counts it), so no new source and no light curve appear there; TraP's behaviour
    (--no-drop_pixel_artefacts) makes it both."""
    with fits.open(survey["images"][0]["path"]) as hdul:
        x, y = WCS(hdul[0].header).celestial.all_world2pix(survey["sources"]["ra"], survey["sources"]["dec"], 0)
    gy, gx = (a.ravel() for a in np.mgrid[20:SPEC.shape[0] - 20:4, 20:SPEC.shape[1] - 20:4])
    distance = np.hypot(gx[:, None] - x, gy[:, None] - y).min(1)
    spot = distance.argmax()  # the pixel of the grid farthest from every source
    assert distance[spot] > 20
    glitched = tmp_path / "glitched"
    glitched.mkdir()
    for i, image in enumerate(survey["images"]):
        with fits.open(image["path"]) as hdul:
            data, header = hdul[0].data.copy(), hdul[0].header
        if i == 4:
            data[..., gy[spot], gx[spot]] += 200 * SPEC.rms
        fits.writeto(glitched / Path(image["path"]).name, data, header)
    counts = {}
    for drop in (True, False):
        db = tmp_path / f"drop-{drop}.db"
        values = {"input_images": (str(glitched),), "db_name": str(db), "nr_threads": 2, **THRESHOLDS,
                  "drop_pixel_artefacts": drop}
        summary = run_pipeline(build_config(values, {}, None))
        counts[drop] = (summary.n_artefacts, summary.n_new_sources, summary.n_light_curves)
        assert ("1 pixel artefacts left out" in summary.describe()) == drop
    assert counts[True][0] == 1 and counts[False][0] == 0
    assert counts[False][1:] == (counts[True][1] + 1, counts[True][2] + 1)


def test_images_that_share_a_start_time_are_named_in_a_warning(survey, tmp_path, capsys):
    """Three images of one frequency with one DATE-OBS (a date without its time, say): the run
    goes on, and says so."""
    copies = []
    for image in survey["images"][:3]:
        with fits.open(image["path"]) as hdul:
            hdul[0].header["DATE-OBS"] = "2024-01-01T00:00:00"
            copies.append(tmp_path / Path(image["path"]).name)
            hdul.writeto(copies[-1])
    run(copies, tmp_path / "same.db")
    err = capsys.readouterr().err
    assert (f"WARNING 2 images have the start time and frequency of the image before them, e.g. {copies[0]} "
            f"and {copies[1]}") in err
    assert query(tmp_path / "same.db", "SELECT count(*) FROM images WHERE rejected = 0") == [(3,)]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_as_the_database_is_one_line_and_is_left_alone(survey, tmp_path, overwrite):
    from trap_dask.pipeline import PipelineError

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(PipelineError, match=rf"^--db_name {tmp_path} is a directory: give the SQLite file's path"):
        run([Path(survey["images"][0]["path"])], tmp_path, db_overwrite=overwrite)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_a_new_database_is_removed_when_the_run_fails_before_its_first_image(survey, tmp_path, monkeypatch):
    """The workers cannot read the inputs: the run stops before any image, and the database it
    made goes too, so the same command runs once the inputs are fixed (it said 'already exists')."""
    from trap_dask import cluster
    from trap_dask.pipeline import PipelineError

    def unreadable(client, paths):
        raise cluster.ClusterError("the Dask workers cannot read the inputs")

    inputs, db = [Path(i["path"]) for i in survey["images"][:2]], tmp_path / "new.db"
    monkeypatch.setattr(cluster, "check_inputs_readable", unreadable)
    with pytest.raises(PipelineError, match="cannot read the inputs"):
        run(inputs, db)
    assert not db.exists()
    monkeypatch.undo()
    run(inputs, db)
    assert query(db, "SELECT count(*) FROM images") == [(2,)]


def test_a_writer_that_cannot_be_replaced_says_why(survey, tmp_path, monkeypatch):
    """The writer's worker is lost and no worker comes back within worker_timeout: the run says
    that (it said only that the writer was lost)."""
    import distributed

    from trap_dask import cluster, route
    from trap_dask.pipeline import PipelineError

    def handle(*args, **kwargs):
        raise RuntimeError("the worker holding the writer was lost")

    def wait_for_workers(self, *args, **kwargs):
        raise TimeoutError

    monkeypatch.setattr(route, "handle", handle)
    monkeypatch.setattr(cluster.ClusterSession, "writer_lost",
                        lambda self, timeout=2.0: cluster.WRITER_LOST_MESSAGE.format(address="tcp://gone", why=""))
    monkeypatch.setattr(distributed.Client, "wait_for_workers", wait_for_workers)
    with pytest.raises(PipelineError, match="^no Dask worker left to hold the writer within worker_timeout"):
        run([Path(i["path"]) for i in survey["images"][:3]], tmp_path / "lost.db")


class _Hung(BaseException):
    """Raised in the main thread by :func:`_fails_after` (not an Exception: nothing in the run catches it)."""


@contextmanager
def _fails_after(seconds: float):
    """A run that should stop by itself but hangs fails the test after ``seconds`` instead."""
    def hung(*_):
        raise _Hung(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_workers_paused_at_their_memory_limit_stop_the_run_in_one_line(survey, tmp_path, monkeypatch):
    """Workers whose memory stays above Dask's pause threshold (80% of the limit: an idle worker's
    imports and the writer already above it under a small --memory_limit) run no task, so the run
    waited for ever for its writer. It stops once a worker has been paused with nothing running on
    any worker for PAUSED_S, and says what to change."""
    import dask
    import distributed  # noqa: F401 - its defaults in dask's config before it is set (else undone with them)

    from trap_dask import cluster
    from trap_dask.pipeline import PipelineError

    monkeypatch.setattr(cluster.MemoryWatch, "PAUSED_S", 2.0)
    monkeypatch.setattr(cluster, "QUIET_LOOPS", {})  # the worker looks at its memory every 50 ms, not 1 s
    paused = {"distributed.worker.memory.pause": 0.01, "distributed.worker.memory.terminate": False,
              "distributed.worker.memory.monitor-interval": "50ms"}
    with _fails_after(120), dask.config.set(paused), pytest.raises(PipelineError) as stopped:
        run([Path(i["path"]) for i in survey["images"][:2]], tmp_path / "paused.db", memory_limit="1GiB")
    said = str(stopped.value)
    assert said.startswith("1 of 1 Dask workers have been paused at their memory limit for 2 s, with nothing running")
    assert "of 1024 MiB" in said and "raise --memory_limit, or run fewer threads (--nr_threads)" in said


def test_workers_restarted_for_memory_again_and_again_stop_the_run_in_one_line(survey, tmp_path, monkeypatch):
    """Worker processes that exceed their memory limit before they finish a task (here at once: the
    limit is set below an idle worker's) are restarted by their nannies for ever, and the run waited
    for its writer meanwhile. It stops after RESTARTS_WITHOUT_PROGRESS of them and says why."""
    import dask
    import distributed  # noqa: F401 - its defaults in dask's config before it is set (else undone with them)

    from trap_dask import cluster
    from trap_dask.pipeline import PipelineError

    monkeypatch.setattr(cluster, "QUIET_LOOPS", {})
    restarted = {"distributed.worker.memory.terminate": 0.05, "distributed.worker.memory.pause": False,
                 "distributed.worker.memory.monitor-interval": "50ms"}
    with _fails_after(120), dask.config.set(restarted), pytest.raises(PipelineError) as stopped:
        run([Path(i["path"]) for i in survey["images"]], tmp_path / "restarted.db", scheduler="distributed",
            n_workers=2, nr_threads=2, memory_limit="1GiB")
    said = str(stopped.value)
    assert said.startswith("Dask restarted workers 10 times in a row for exceeding their memory limit")
    assert "and the run could not go on" in said
    assert "run the same command again once the workers have more memory" in said
    assert "raise --memory_limit, or run fewer threads per worker (--threads_per_worker)" in said


def test_background_boxes_narrower_than_the_beam_are_named_in_a_warning(survey, tmp_path, capsys):
    image = Path(survey["images"][0]["path"])
    run([image], tmp_path / "boxes.db", im_back_size_x=8, im_back_size_y=8)  # the beam is 6 x 4 pixels
    assert ("WARNING im_back_size_x = 8 and im_back_size_y = 8 pixels are under 2 beam widths for 1 of 1 images, "
            f"e.g. {image} (beam FWHM 6.0 pixels)") in capsys.readouterr().err
    run([image], tmp_path / "fine.db")
    assert "im_back_size" not in capsys.readouterr().err


def test_position_errors_of_a_beam_or_more_are_named_in_a_warning(survey, tmp_path, capsys):
    image = Path(survey["images"][0]["path"])
    from trap_dask.image import read_meta

    fwhm = 7200.0 * read_meta(image).beam.smaj
    run([image], tmp_path / "large.db", ew_sys_err=str(2 * fwhm), ns_sys_err=str(2 * fwhm))
    err = capsys.readouterr().err
    assert f"WARNING --ew_sys_err {2 * fwhm:g} / --ns_sys_err {2 * fwhm:g} arcsec: 2.0 times the beam" in err
    assert "every known source within 16 beams becomes a candidate" in err
    for sys_err in ("auto", str(0.5 * fwhm)):
        run([image], tmp_path / f"fine_{sys_err}.db", ew_sys_err=sys_err, ns_sys_err=sys_err)
        assert "times the beam" not in capsys.readouterr().err


def test_a_margin_that_leaves_no_pixel_is_named_in_a_warning(survey, tmp_path, capsys):
    image = Path(survey["images"][0]["path"])
    run([image], tmp_path / "margin.db", im_margin=SPEC.shape[0] // 2)
    assert (f"WARNING im_margin = {SPEC.shape[0] // 2} and im_radius = 0 pixels leave no pixel to find sources in "
            f"for 1 of 1 images, e.g. {image} ({SPEC.shape[0]} x {SPEC.shape[1]} pixels)") in capsys.readouterr().err


def test_a_run_whose_first_transaction_fails_removes_its_new_database_and_says_so(survey, tmp_path, monkeypatch,
                                                                                   capsys):
    """Nothing was recorded: the new database goes, and what to do is to run the same command again
    (not --db_append); the writer recorded the run's end before that (no 'could not record' warning)."""
    from trap_dask import writer as writer_module
    from trap_dask.db.backends import DatabaseError
    from trap_dask.pipeline import PipelineError

    real = writer_module.write_batch

    def write_batch(store, images):
        if any(row["id"] == 0 for row, _ in images):
            raise DatabaseError("disk full")
        return real(store, images)

    monkeypatch.setattr(writer_module, "write_batch", write_batch)
    db = tmp_path / "fails.db"
    with pytest.raises(PipelineError, match=r"^the export database could not be written \(disk full\); .*: nothing "
                                            r"was recorded, so the new database was removed: run the same command "
                                            r"again$"):
        run([Path(i["path"]) for i in survey["images"]], db)
    assert not db.exists()
    assert "could not record" not in capsys.readouterr().err


def test_a_monitor_position_outside_every_image_is_named_in_a_warning(survey, tmp_path, capsys):
    """Far away, or just beyond a side of the images (inside the circle round their corners, which
    was all that was looked at): no measurement, and a warning."""
    from trap_dask.image import celestial_wcs, read_meta

    images = [Path(i["path"]) for i in survey["images"][:2]]
    meta = read_meta(images[0])
    beside = celestial_wcs(meta).pixel_to_world_values(-3.0, meta.shape[0] / 2)
    monitors = f"[[150.0, 30.0], [10.0, -40.0], [{beside[0]:.8f}, {beside[1]:.8f}], [150.0, 30.0000001]]"
    db = run(images, tmp_path / "monitor.db", monitor_loc=monitors)
    err = capsys.readouterr().err
    assert ("WARNING 2 of the 4 monitor positions lie outside every image's extraction region (the image inside "
            "its margins and radius), e.g. (10.000000, -40.000000) deg: their light curves stay empty") in err
    assert "WARNING 1 monitor positions are given more than once (within 0.04\"), e.g. (150.000000, 30.000000)" in err
    assert query(db, "SELECT count(DISTINCT m.src_id) FROM monitor m JOIN extracted_sources x "
                     "ON x.src_id = m.src_id")[0][0] == 2  # the two on the images (one given twice)


def test_a_window_larger_than_the_run_and_an_unwritable_log_dir(survey, tmp_path):
    """max_concurrent_images far beyond the number of images submits each image once (a window of
    10^9 spent 48 s submitting nothing); a --log_dir that cannot be written is a one-line error
    before the database is made (it was a traceback)."""
    from trap_dask.pipeline import PipelineError

    folder = Path(survey["images"][0]["path"]).parent
    db = run([folder], tmp_path / "window.db", max_concurrent_images=10**12)
    assert query(db, "SELECT count(*) FROM images")[0][0] == len(survey["images"])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PipelineError, match=r"^--log_dir .*a_file: cannot write the log there"):
        run([folder], tmp_path / "never.db", log_dir=str(tmp_path / "a_file"))
    assert not (tmp_path / "never.db").exists()
