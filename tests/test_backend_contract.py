"""The contract every export-database backend keeps, run against each one (``db_settings`` is
parametrised over SQLite and PostgreSQL; under CI=true a missing PostgreSQL server fails these)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import numpy as np
import pytest
from sqlalchemy import select

from trap_dask.catalogue import LIGHTCURVE_COLUMNS, MERGE_COLUMNS, SOURCE_COLUMNS, empty_columns
from trap_dask.config import Config
from trap_dask.db import schema
from trap_dask.db.backends import DatabaseError, DatabaseSettings, backend_class, drop_database
from trap_dask.db.lock import DatabaseBusy, RunLock
from trap_dask.db.store import ExportStore
from trap_dask.sources import empty_sources

BAND = {"band_id": 0, "freq_low": 1.49e8, "freq_central": 1.5e8, "freq_high": 1.51e8}


def image(im_id: int, run: int, **extra) -> dict:
    return {"id": im_id, "run": run, "url": f"/data/img{im_id}.fits", "rejected": False, "freq_band": 0,
            "taustart_ts": datetime(2021, 3, 4, 5, 6, im_id), "n_sources": 0, "n_forced": 0,
            "checksum": f"{im_id:064x}", **extra}


def sources(first_id: int, src_ids, im_id=None, parent=None) -> tuple[np.ndarray, dict]:
    n = len(src_ids)
    rows = empty_sources(n)
    rows["ra"] = 150.0 + np.arange(n) * 1e-3
    rows["peak_flux"] = np.linspace(1e-3, 2e-3, n)
    ids = {"id": first_id + np.arange(n), "src_id": np.asarray(src_ids),
           "parent": -np.ones(n, int) if parent is None else np.asarray(parent),
           "is_duplicate": np.zeros(n, bool)}
    if im_id is not None:
        ids["im_id"] = np.asarray(im_id)
    return rows, ids


def catalogue(src_ids, last) -> dict:
    cat = empty_columns(SOURCE_COLUMNS, len(src_ids))
    cat["src_id"], cat["last_xtrsrc"], cat["merged_into"] = (np.asarray(src_ids), np.asarray(last),
                                                             -np.ones(len(src_ids), int))
    cat["wm_ra"] = 150.0 + np.asarray(src_ids) * 1e-3
    cat["first_im_id"] = np.zeros(len(src_ids), int)
    return cat


def lightcurves(src_ids, n) -> dict:
    curves = empty_columns(LIGHTCURVE_COLUMNS, len(src_ids))
    curves["src_id"], curves["freq_band"] = np.asarray(src_ids), np.zeros(len(src_ids), int)
    curves["nr_datapoints"][:] = n
    curves["eta_int"][:] = np.nan                        # NULL until two points
    curves["first_detection_time"][:] = datetime(2021, 3, 4, 5, 6, 0)
    return curves


@pytest.fixture
def store(db_settings):
    store = ExportStore.create(db_settings, overwrite=False)
    yield store
    store.close()


def commit(store, im_id, run, src_ids, first_id, **extra):
    rows, ids = sources(first_id, src_ids)
    store.commit_image(image(im_id, run), band_rows=[BAND] if im_id == 0 else None, sources=rows, source_ids=ids,
                       catalogue=catalogue(src_ids, ids["id"]), lightcurves=lightcurves(src_ids, im_id + 1), **extra)


def test_the_backend_is_chosen_once_from_the_settings(db_settings):
    impl = db_settings.impl
    assert type(impl) is backend_class(db_settings.backend) and impl.name == db_settings.backend
    assert impl.describe() == db_settings.describe() and "password" not in impl.describe()
    assert not impl.exists()
    impl.create()
    impl.drop()
    assert not impl.exists()


def test_upserts_and_state_load(store):
    run = store.start_run(Config().exportable(), None)
    commit(store, 0, run, [0, 1], 0)
    commit(store, 1, run, [0, 1, 2], 2)                  # two updated, one new
    state = store.load_state()
    assert state.sources["src_id"] == [0, 1, 2] and state.sources["last_xtrsrc"] == [2, 3, 4]
    assert state.lightcurves["nr_datapoints"] == [2, 2, 2] and state.lightcurves["eta_int"] == [None] * 3
    assert state.lightcurves["first_detection_time"] == [datetime(2021, 3, 4, 5, 6, 0)] * 3
    assert (state.next_image, state.next_xtrsrc, state.next_src_id) == (2, 5, 3)
    assert [b for b in state.bands["band_id"]] == [0]


def test_a_known_source_in_a_second_band_gets_its_own_light_curve(store):
    """The upsert keys on (src_id, freq_band): a source already in band 0 seen in band 1 adds a row
    and leaves its band-0 light curve as it was, while another band-0 curve is updated."""
    run = store.start_run(Config().exportable(), None)
    commit(store, 0, run, [0, 1], 0)
    band1 = {**BAND, "band_id": 1, "freq_low": 1.69e8, "freq_central": 1.7e8, "freq_high": 1.71e8}
    rows, ids = sources(2, [0])
    curves = {name: np.concatenate([a, b]) for (name, a), b in
              zip(lightcurves([0], 1).items(), lightcurves([1], 3).values())}
    curves["freq_band"] = np.array([1, 0])              # source 0 new in band 1, source 1 moved on in band 0
    store.commit_image(image(1, run, freq_band=1), band_rows=[band1], sources=rows, source_ids=ids,
                       catalogue=catalogue([0], [2]), lightcurves=curves)
    state = store.load_state()
    got = sorted(zip(state.lightcurves["src_id"], state.lightcurves["freq_band"], state.lightcurves["nr_datapoints"]))
    assert got == [(0, 0, 1), (0, 1, 1), (1, 0, 3)]


def test_hundreds_of_rows_insert_and_upsert_row_for_row(store):
    """Row counts that split into statements of several sizes (515 = 256 + 256 + 2 + 1 on SQLite)."""
    run = store.start_run(Config().exportable(), None)
    commit(store, 0, run, np.arange(515), 0)
    commit(store, 1, run, np.arange(519)[::-1], 515)     # 515 updated, in another order, and 4 new
    state = store.load_state()
    assert state.sources["src_id"] == list(range(519))
    assert state.sources["last_xtrsrc"] == list(range(515 + 518, 515 - 1, -1))
    assert state.lightcurves["nr_datapoints"] == [2] * 519
    with store.engine.connect() as conn:
        table = schema.extracted_sources
        got = conn.execute(select(table.c.id, table.c.ra, table.c.peak_flux).order_by(table.c.id)).all()
    expected = [(first + i, 150.0 + i * 1e-3, flux) for first, n in ((0, 515), (515, 519))
                for i, flux in enumerate(np.linspace(1e-3, 2e-3, n))]
    assert [tuple(row) for row in got] == expected


def test_update_sets_the_given_columns_of_the_rows_named_by_key(store):
    """A bulk update by key (a merge relabelling earlier measurements): 515 rows in statements of
    several sizes on SQLite, one statement on PostgreSQL; NaN becomes NULL; the other columns, the
    rows not named and a key the table lacks change nothing."""
    check_update(store)


def test_sqlite_before_3_33_updates_row_by_row(tmp_path, monkeypatch):
    """SQLite older than 3.33 (RHEL 8 ships 3.26) has no UPDATE .. FROM: the same update, a statement
    per row."""
    monkeypatch.setattr("trap_dask.db.sqlite.UPDATE_FROM", False)
    store = ExportStore.create(DatabaseSettings(backend="sqlite", name=str(tmp_path / "old.db")), overwrite=False)
    try:
        check_update(store)
    finally:
        store.close()


def check_update(store: ExportStore) -> None:
    """Relabel 515 of 600 measurements (and an id the table lacks) with Backend.update; check every row."""
    run = store.start_run(Config().exportable(), None)
    commit(store, 0, run, np.arange(600), 0)
    ids = np.concatenate([np.arange(3, 518)[::-1], [10_000]])  # 515 rows, in another order, and one absent
    changes = {"id": ids, "src_id": 7000 + ids, "parent": ids - 1, "peak_flux": np.where(ids % 2, 5.0, np.nan)}
    with store.engine.begin() as conn:
        store.backend.update(conn, schema.extracted_sources, changes, ["id"])
    table = schema.extracted_sources
    with store.engine.connect() as conn:
        got = conn.execute(select(table.c.id, table.c.src_id, table.c.parent, table.c.ra, table.c.peak_flux)
                           .order_by(table.c.id)).all()
    relabelled = set(ids[:-1].tolist())
    before = np.linspace(1e-3, 2e-3, 600)
    assert len(got) == 600
    assert [tuple(row) for row in got] == [
        (i, 7000 + i, i - 1, 150.0 + i * 1e-3, 5.0 if i % 2 else None) if i in relabelled
        else (i, i, -1, 150.0 + i * 1e-3, before[i]) for i in range(600)]


def test_known_images_and_stale_runs(store):
    run = store.start_run(Config().exportable(), None)
    commit(store, 0, run, [0], 0)
    store.commit_image(image(1, run, checksum=None, rejected=True, url="/data/unreadable.fits"))
    known = store.known_images()
    assert known.checksums == {f"{0:064x}"} and known.unreadable == {"/data/unreadable.fits"}
    assert store.close_stale_runs() == 2 and store.close_stale_runs() == 0  # the images of the runs it closed
    with store.engine.connect() as conn:
        assert conn.execute(select(schema.runs.c.status, schema.runs.c.n_images)).all() == [("killed", 2)]


def test_a_backfilled_measurement_counts_in_its_image(store):
    run = store.start_run(Config().exportable(), None)
    commit(store, 0, run, [0], 0)
    rows, ids = sources(1, [0, 1], im_id=[1, 0], parent=[0, -1])  # source 1 measured back in image 0
    store.commit_image(image(1, run), sources=rows, source_ids=ids)
    with store.engine.connect() as conn:
        counts = conn.execute(select(schema.images.c.n_forced).order_by(schema.images.c.id)).scalars().all()
    assert counts == [1, 0]


def test_a_merge_retires_the_younger_source(store):
    run = store.start_run(Config().exportable(), None)
    new = {"src_id": np.array([1]), "trigger_xtrsrc": np.array([1]), "im_id": np.array([0]),
           "previous_limits_image": np.array([-1]), "newsource_type": np.array([0]),
           "sigma_rms_min": np.array([np.nan]), "sigma_rms_max": np.array([5.0])}
    commit(store, 0, run, [0, 1], 0, new_sources=new)
    merges = empty_columns(MERGE_COLUMNS, 1)
    merges.update(src_id=np.array([1]), merged_into=np.array([0]), im_id=np.array([1]), separation=np.array([0.5]))
    relabelled = {"id": np.array([1]), "src_id": np.array([0]), "parent": np.array([0])}
    commit(store, 1, run, [0], 2, merges=merges, relabelled=relabelled)
    with store.engine.connect() as conn:
        assert conn.execute(select(schema.newsource)).all() == []
        row = conn.execute(select(schema.merges)).mappings().one()
        relabel = conn.execute(select(schema.extracted_sources.c.src_id, schema.extracted_sources.c.parent)
                               .where(schema.extracted_sources.c.id == 1)).one()
        curves = conn.execute(select(schema.variability.c.src_id)).scalars().all()
    assert (row["src_id"], row["merged_into"], row["newsource_trigger"], row["separation"]) == (1, 0, 1, 0.5)
    assert tuple(relabel) == (0, 0) and curves == [0]


def test_a_batch_commits_all_its_images_or_none(store):
    run = store.start_run(Config().exportable(), None)

    def images():
        with store.engine.connect() as conn:
            return conn.execute(select(schema.images.c.id).order_by(schema.images.c.id)).scalars().all()

    with store.batch():
        commit(store, 0, run, [0, 1], 0)
        commit(store, 1, run, [0, 1], 2)
        assert images() == []                           # nothing committed inside the block
    assert images() == [0, 1]
    with pytest.raises(RuntimeError, match="boom"):
        with store.batch():
            commit(store, 2, run, [0, 1], 4)
            raise RuntimeError("boom")
    with pytest.raises(DatabaseError):
        with store.batch():
            commit(store, 2, run, [0, 1], 4)
            commit(store, 3, run, [0, 1], 4)              # duplicate ids: the whole batch goes
    assert images() == [0, 1] and store.load_state().next_xtrsrc == 4
    commit(store, 2, run, [0, 1], 4)                    # and the store carries on
    assert images() == [0, 1, 2]


def test_prepare_creates_then_checks_appends(db_settings):
    config = Config(db_backend=db_settings.backend, db_name=db_settings.name)
    assert ExportStore.prepare(db_settings, config) == (False, ExportStore.prepare.__globals__["KnownImages"]())
    store = ExportStore.open(db_settings)
    run = store.start_run(config.exportable(), None)
    commit(store, 0, run, [0], 0)
    store.close()
    with pytest.raises(DatabaseError, match=r"de_ruiter_r_max: 5\.68 -> 3\.0"):
        ExportStore.prepare(db_settings, replace(config, db_append=True, de_ruiter_r_max=3.0))
    appending, known = ExportStore.prepare(db_settings, replace(config, db_append=True, de_ruiter_r_max=3.0,
                                                                accept_config_change=True))
    assert appending and known.checksums == {f"{0:064x}"}
    store = ExportStore.open(db_settings)
    assert store.close_stale_runs() == 0                # the run left 'running' was closed
    assert store.latest_config()["de_ruiter_r_max"] == 5.68
    store.close()
    with pytest.raises(DatabaseError, match="already exists"):
        ExportStore.prepare(db_settings, config)


def test_one_writer_at_a_time(db_settings):
    with RunLock(db_settings):
        with pytest.raises(DatabaseBusy, match="another trap-dask run"):
            RunLock(db_settings).acquire()
    with db_settings.impl.lock():                       # free again once released
        pass


def test_values_round_trip_exactly(store):
    run = store.start_run(Config().exportable(), None)
    rows, ids = sources(0, [0, 1])
    rows["ra"] = [123.456789012345, 1e-300]
    rows["dec"] = [-45.678901234567, np.nan]
    rows["gaussian_fit"] = [True, False]
    store.commit_image(image(0, run), band_rows=[BAND], sources=rows, source_ids=ids)
    with store.engine.connect() as conn:
        got = conn.execute(select(schema.extracted_sources.c.ra, schema.extracted_sources.c.dec,
                                  schema.extracted_sources.c.gaussian_fit).order_by(schema.extracted_sources.c.id)).all()
    assert [tuple(r) for r in got] == [(123.456789012345, -45.678901234567, True), (1e-300, None, False)]


def newsource(src_id: int, trigger: int, im_id: int) -> dict:
    return {"src_id": np.array([src_id]), "trigger_xtrsrc": np.array([trigger]), "im_id": np.array([im_id]),
            "previous_limits_image": np.array([-1]), "newsource_type": np.array([0]),
            "sigma_rms_min": np.array([np.nan]), "sigma_rms_max": np.array([5.0])}


def write_run(store: ExportStore, revive: bool = False) -> None:
    """Six images that change the same sources again and again: a new source measured back in an
    earlier image, a rejected image, a merge that retires the newest newsource row, one after it
    (``revive``: which measures the retired source again, as the writer never does)."""
    run = store.start_run(Config().exportable(), None)
    commit(store, 0, run, [0, 1], 0, new_sources=newsource(1, 1, 0))
    rows, ids = sources(2, [0, 1, 2, 2], im_id=[1, 1, 1, 0], parent=[0, 1, -1, -1])
    curves = lightcurves([0, 1, 2], 2)
    curves["eta_int"] = np.array([0.5, 1.5, np.nan])
    store.commit_image(image(1, run), sources=rows, source_ids=ids, catalogue=catalogue([0, 1, 2], [2, 3, 4]),
                       lightcurves=curves, new_sources=newsource(2, 4, 1))
    store.commit_image(image(2, run, rejected=True, rejection_reason="rms too high", checksum=None))
    commit(store, 3, run, [0, 1, 2], 6, catalogue_rows=np.array([0, 2]), lightcurve_rows=np.array([2]))
    merges = empty_columns(MERGE_COLUMNS, 1)
    merges.update(src_id=np.array([2]), merged_into=np.array([1]), im_id=np.array([4]), separation=np.array([0.5]))
    relabelled = {"id": np.array([4, 8]), "src_id": np.array([1, 1]), "parent": np.array([3, 7])}
    commit(store, 4, run, [0, 1], 9, merges=merges, relabelled=relabelled)
    commit(store, 5, run, [0, 1, 2, 3] if revive else [0, 1, 3], 11,
           new_sources=newsource(3, 14 if revive else 13, 5))


def table_rows(store: ExportStore) -> dict[str, list[tuple]]:
    """Every row of the run's tables (not runs, whose times differ), in primary-key order."""
    with store.engine.connect() as conn:
        return {table.name: [tuple(row) for row in conn.execute(
                    select(table).order_by(*(table.primary_key.columns or table.columns)))]
                for table in schema.metadata.sorted_tables if table.name not in ("runs", "schema_version", "config")}


@pytest.mark.parametrize("revive", [False, True])
def test_a_batch_stores_what_its_images_one_by_one_do(store, db_settings, revive):
    """Rows changed by several images of a batch are stored once in their last state; the batch
    leaves the same rows as a transaction per image, merges and backfills included."""
    write_run(store, revive)
    one_by_one = table_rows(store)
    settings = replace(db_settings, name=db_settings.name.replace("export", "export_b") + "_b")
    batched = ExportStore.create(settings, overwrite=False)
    try:
        with batched.batch():
            write_run(batched, revive)
        assert table_rows(batched) == one_by_one
        assert batched.close_stale_runs() == 6  # the run's count moved with its images
    finally:
        batched.close()
        drop_database(settings)
    if revive:  # its light curve, removed by the merge, is back
        assert [row[0] for row in one_by_one["variability"]] == [0, 1, 2, 3]
        return
    curves = {row[0]: row for row in one_by_one["variability"]}
    assert sorted(curves) == [0, 1, 3] and curves[0][11] == 6  # src 2 merged away; nr_datapoints of image 5
    catalogue_rows = {row[0]: row for row in one_by_one["runningcatalog"]}
    assert catalogue_rows[2][schema.runningcatalog.c.keys().index("last_xtrsrc")] == 8  # image 3's state
    assert [row[:2] for row in one_by_one["newsource"]] == [(1, 1), (2, 3)]  # src 2's went with the merge
    assert one_by_one["images"][0][schema.images.c.keys().index("n_forced")] == 1  # backfilled by image 1
