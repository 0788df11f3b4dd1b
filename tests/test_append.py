"""Appending to an export database and resuming killed runs, on every backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _runs import COMPARED, dump, run, same_tables, schema_versions, spawn, to_schema_7
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, OperationalError

from trap_dask.db import schema
from trap_dask.db.backends import DatabaseSettings, database_exists, drop_database, make_engine
from trap_dask.db.lock import RunLock
from trap_dask.pipeline import PipelineError
from trap_dask.shapes import SHAPE_SUMS
from trap_dask.simulate import SurveySpec, load_truth, simulate_survey
from trap_dask.writer import MAX_BATCH

pytestmark = pytest.mark.slow

SPEC = SurveySpec(n_epochs=7, shape=(256, 256), n_steady=10, n_variable=3, n_transient=2, n_resolved=0,
                  n_pairs=1, min_separation=4.0, jitter=0.1, seed=21)
#: For the tests that stop a run between two transactions: more images than one transaction holds
#: (a writer writes at most MAX_BATCH images at once).
LONG_SPEC = replace(SPEC, n_epochs=MAX_BATCH + 4)


def _paths_in_time_order(directory: Path, spec: SurveySpec) -> list[str]:
    truth = load_truth(simulate_survey(directory, spec))
    return [image["path"] for image in sorted(truth["images"], key=lambda i: i["epoch"])]


@pytest.fixture(scope="module")
def epochs(tmp_path_factory):
    """The survey's image paths in time order, last modified an hour ago (files just written get no
    stamp: tasks.FRESH_NS)."""
    paths = _paths_in_time_order(tmp_path_factory.mktemp("append_survey"), SPEC)
    for path in paths:
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns - 3600 * 10**9))
    return paths


@pytest.fixture(scope="module")
def long_epochs(tmp_path_factory):
    """A longer survey's image paths in time order (LONG_SPEC)."""
    return _paths_in_time_order(tmp_path_factory.mktemp("long_survey"), LONG_SPEC)


def sibling(settings: DatabaseSettings, suffix: str) -> DatabaseSettings:
    """Another database on the same backend (cleaned up with the fixture's for sqlite's tmp dir)."""
    return replace(settings, name=settings.name + suffix)


def _one_run(settings: DatabaseSettings, inputs: list[str]):
    """The tables of all ``inputs`` processed in one run (a sibling database, dropped after)."""
    ref = sibling(settings, "_ref")
    run(ref, inputs)
    yield dump(ref)
    if ref.backend == "postgres":
        drop_database(ref)


@pytest.fixture
def reference(db_settings, epochs):
    """All epochs processed in one run."""
    yield from _one_run(db_settings, epochs)


@pytest.fixture
def long_reference(db_settings, long_epochs):
    """All epochs of the longer survey processed in one run."""
    yield from _one_run(db_settings, long_epochs)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_append_in_two_parts_equals_one_run(db_settings, epochs, reference, k):
    run(db_settings, epochs[:k])
    summary = run(db_settings, epochs, db_append=True)   # the first k are recognised and skipped
    assert summary.n_skipped == k and summary.n_images == len(epochs) - k
    assert dump(db_settings) == reference


def test_appending_the_same_images_twice_adds_nothing(db_settings, epochs):
    run(db_settings, epochs[:3])
    before = dump(db_settings)
    summary = run(db_settings, epochs[:3], db_append=True)
    assert summary.n_images == 0 and summary.n_skipped == 3
    assert dump(db_settings) == before



def _checksums_counted(monkeypatch) -> list[str]:
    """The paths tasks.file_checksum reads from now on (the files an append cannot recognise unread)."""
    from trap_dask import tasks

    read, checksum = [], tasks.file_checksum
    monkeypatch.setattr(tasks, "file_checksum", lambda path, kind: read.append(path) or checksum(path, kind))
    return read


def _stamps(settings: DatabaseSettings) -> list[tuple]:
    engine = make_engine(settings)
    with engine.connect() as conn:
        rows = conn.execute(select(schema.images.c.url, schema.images.c.file_size, schema.images.c.file_mtime)
                            .order_by(schema.images.c.id)).all()
    engine.dispose()
    return [tuple(row) for row in rows]


def test_an_append_reads_only_the_files_it_does_not_know(db_settings, epochs, reference, tmp_path, monkeypatch):
    """Each image row keeps its file's size and modification time: an append recognises a file at the
    same path with both unchanged without reading it, and checksums the others (new files, and a file
    touched since, which its checksum still recognises)."""
    run(db_settings, epochs[:3])
    assert _stamps(db_settings) == [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in epochs[:3]]
    read = _checksums_counted(monkeypatch)
    summary = run(db_settings, epochs, db_append=True)
    assert (summary.n_skipped, summary.n_images) == (3, len(epochs) - 3)
    assert sorted(read) == sorted(epochs[3:])
    assert dump(db_settings) == reference
    read.clear()
    touched = tmp_path / "touched.fits"   # the same bytes at a new path, then a new time at an old one
    touched.write_bytes(Path(epochs[1]).read_bytes())
    os.utime(epochs[2], ns=(os.stat(epochs[2]).st_atime_ns, os.stat(epochs[2]).st_mtime_ns + 10**9))
    summary = run(db_settings, [*epochs, str(touched)], db_append=True)
    assert (summary.n_images, summary.n_skipped) == (0, len(epochs) + 1)
    assert sorted(read) == sorted([epochs[2], str(touched)])


def test_a_file_modified_as_it_is_read_gets_no_stamp(db_settings, epochs, tmp_path, monkeypatch):
    """A file written less than 2 s before it is read may be written again within the same tick of a
    coarse clock, keeping its size and modification time over other bytes: its image gets no stamp,
    and the next append reads it."""
    fresh = tmp_path / "fresh.fits"
    fresh.write_bytes(Path(epochs[0]).read_bytes())
    run(db_settings, [str(fresh), *epochs[1:3]])
    assert [stamp[1] is None for stamp in _stamps(db_settings)] == [True, False, False]
    read = _checksums_counted(monkeypatch)
    assert run(db_settings, [str(fresh), *epochs[1:3]], db_append=True).n_skipped == 3
    assert read == [str(fresh)]


def test_an_append_of_images_older_than_the_database_holds_is_refused(db_settings, epochs):
    """Images before the latest one in the database cannot join its light curves afterwards (their
    parents and new sources would point forward in time): the append stops before it records
    anything, and names the images and what to do; the images already there do not count."""
    run(db_settings, epochs[3:5])
    before = dump(db_settings)
    with pytest.raises(PipelineError, match=r"^3 of the images to append start before the latest image .*"
                                            rf"e\.g\. {epochs[0]} .*without --db_append"):
        run(db_settings, epochs[:5], db_append=True)
    assert dump(db_settings) == before
    assert run(db_settings, epochs[3:], db_append=True).n_images == len(epochs) - 5

def test_changed_association_parameters_need_consent(db_settings, epochs):
    run(db_settings, epochs[:2])
    with pytest.raises(PipelineError, match=r"de_ruiter_r_max: 5\.68 -> 3\.0.*pass --de_ruiter_r_max 5\.68 to "
                                            r"continue.*--accept_config_change"):
        run(db_settings, epochs, db_append=True, de_ruiter_r_max=3.0)
    with pytest.raises(PipelineError, match=r"pass --association_method optimal to continue"):
        run(db_settings, epochs, db_append=True, association_method="greedy")
    with pytest.raises(PipelineError, match=r"remove_image_shift: True -> False\); pass --remove_image_shift to "):
        run(db_settings, epochs, db_append=True, remove_image_shift=False)  # the catalogue's frame
    run(db_settings, epochs, db_append=True, de_ruiter_r_max=3.0, accept_config_change=True)
    assert parameter_by_run(db_settings, "de_ruiter_r_max") == [5.68, 3.0]   # every run's parameters are kept


def test_a_database_from_before_widen_sys_err_continues_as_it_was_made(db_settings, epochs):
    """Runs before the parameter existed associated with set position errors as given: the advice
    to continue such a catalogue names --no-widen_sys_err with the numbers, in one error; a catalogue
    made under 'auto' followed the data either way and is not asked about the switch."""
    def forget_widen() -> None:
        engine = make_engine(db_settings)
        with engine.begin() as conn:
            conn.execute(schema.config.delete().where(schema.config.c.key == "widen_sys_err"))
        engine.dispose()

    run(db_settings, epochs[:2])
    forget_widen()
    run(db_settings, epochs[:3], db_append=True)
    with pytest.raises(PipelineError, match=r"\(ew_sys_err: 'auto' -> 3\.0; ns_sys_err: 'auto' -> 3\.0\); pass "
                                            r"--ew_sys_err auto --ns_sys_err auto to continue as its catalogue was "
                                            r"made, or --accept_config_change"):  # and nothing of widen_sys_err
        run(db_settings, epochs[:4], db_append=True, ew_sys_err="3", ns_sys_err="3")
    run(db_settings, epochs[:4], db_append=True, ew_sys_err="3", ns_sys_err="3", accept_config_change=True)
    forget_widen()
    with pytest.raises(PipelineError, match=r"\(widen_sys_err: False -> True\); pass --no-widen_sys_err to "):
        run(db_settings, epochs[:5], db_append=True, ew_sys_err="3", ns_sys_err="3")
    with pytest.raises(PipelineError, match=r"pass --ew_sys_err 3\.0 --ns_sys_err 3\.0 --no-widen_sys_err to continue"):
        run(db_settings, epochs[:5], db_append=True)  # back to 'auto': all three restore the catalogue's making
    run(db_settings, epochs[:5], db_append=True, ew_sys_err="3", ns_sys_err="3", widen_sys_err=False)
    assert parameter_by_run(db_settings, "widen_sys_err") == [None, None, None, False]


def test_an_append_asks_about_the_duplicate_reach_only_where_it_acts(db_settings, epochs):
    """A catalogue made with set position errors and TraP's duplicate reach (0) continues only with
    it or with consent; made under 'auto' errors, 'auto' and 0 are the same and nothing is asked."""
    run(db_settings, epochs[:2], ew_sys_err="3", ns_sys_err="3", duplicate_reach="0")
    with pytest.raises(PipelineError, match=r"\(duplicate_reach: 0\.0 -> 'auto'\); pass --duplicate_reach 0\.0 "):
        run(db_settings, epochs[:3], db_append=True, ew_sys_err="3", ns_sys_err="3")
    run(db_settings, epochs[:3], db_append=True, ew_sys_err="3", ns_sys_err="3", duplicate_reach="0")
    run(db_settings, epochs[:2], db_overwrite=True, duplicate_reach="0")
    run(db_settings, epochs[:3], db_append=True)
    assert parameter_by_run(db_settings, "duplicate_reach") == [0.0, None]


def test_a_database_dropped_or_deleted_during_the_run_is_not_to_be_resumed(db_settings, epochs, monkeypatch):
    """The second transaction finds the database gone (a PostgreSQL database dropped, its sessions
    ended; a SQLite file deleted): the run stops and tells to run again without --db_append, not
    to resume what is not there."""
    from trap_dask import writer as writer_module
    from trap_dask.db.backends import drop_database

    written = []
    original = writer_module.write_batch

    def write_batch(store, images):
        written.append(len(images))
        if len(written) == 2:
            drop_database(db_settings)
        return original(store, images)

    monkeypatch.setattr(writer_module, "write_batch", write_batch)
    sqlite = db_settings.backend == "sqlite"
    stopped = (r"deleted or replaced while this run wrote to it.*Run the command again" if sqlite
               else r"no longer exists: run the same command without --db_append$")
    with pytest.raises(PipelineError, match=stopped) as stop:
        run(db_settings, epochs)
    assert "to resume" not in str(stop.value) and len(written) == 2


def test_a_live_run_blocks_a_second_writer(db_settings, epochs):
    with RunLock(db_settings):
        with pytest.raises(PipelineError, match="another trap-dask run"):
            run(db_settings, epochs[:1])
    run(db_settings, epochs[:1])  # the lock is free again


def test_append_refuses_a_database_of_another_schema_version(db_settings, epochs):
    run(db_settings, epochs[:1])
    engine = make_engine(db_settings)
    with engine.begin() as conn:
        conn.execute(schema.schema_version.update().values(version=999))
    engine.dispose()
    with pytest.raises(PipelineError, match="schema version"):
        run(db_settings, epochs, db_append=True)


def parameter_by_run(settings: DatabaseSettings, key: str) -> list:
    """One parameter of every run, in run order (None where the run did not know it)."""
    engine = make_engine(settings)
    config = schema.config.c
    with engine.connect() as conn:
        runs = conn.execute(select(schema.runs.c.id).order_by(schema.runs.c.id)).scalars().all()
        query = select(config.run, config.key, config.value, config.type).where(config.key == key)
        rows = conn.execute(query).mappings().all()
    engine.dispose()
    values = {row["run"]: schema.config_values([row])[key] for row in rows}
    return [values.get(r) for r in runs]


def assert_upgraded(upgraded: dict[str, list[tuple]], reference: dict[str, list[tuple]]) -> None:
    """A database upgraded past schema 7 holds what one run made, but for its shape sums, which the
    upgrade fills from the stored axes less the beam at the image's centre where a run takes the
    beam away in pixels: the same weights, and mean shapes within 0.5 arcsec**2 (the beam's sigma**2 is
    160 arcsec**2: the projection turns the beam by ~1e-3 across these images)."""
    first = list(schema.runningcatalog.c.keys()).index("acc_shape_weight")
    assert {name: rows for name, rows in upgraded.items() if name != "runningcatalog"} == \
        {name: rows for name, rows in reference.items() if name != "runningcatalog"}
    mine, theirs = ([row[:first] for row in tables["runningcatalog"]] for tables in (upgraded, reference))
    assert mine == theirs
    for row, expected in zip(upgraded["runningcatalog"], reference["runningcatalog"]):
        weight, *sums = row[first:]
        assert weight == pytest.approx(expected[first], rel=1e-9)
        if weight > 0:
            assert np.allclose(np.array(sums) / weight, np.array(expected[first + 1:]) / weight, rtol=0, atol=0.5)


def test_append_to_a_database_made_before_a_parameter_existed(db_settings, epochs, reference):
    run(db_settings, epochs[:3])
    engine = make_engine(db_settings)
    with engine.begin() as conn:   # as a trap-dask without the worker_timeout parameter made it
        conn.execute(schema.config.delete().where(schema.config.c.key == "worker_timeout"))
    engine.dispose()
    run(db_settings, epochs, db_append=True)
    assert dump(db_settings) == reference
    assert parameter_by_run(db_settings, "worker_timeout") == [None, 600.0]


def to_version_2_config(conn) -> None:
    """Turn the key/value ``config`` table back into version 2's: a column per parameter."""
    from sqlalchemy import Column, Integer, MetaData, Table, insert

    rows = conn.execute(select(schema.config)).mappings().all()
    runs = sorted({row["run"] for row in rows})
    values = {r: schema.config_values([row for row in rows if row["run"] == r]) for r in runs}
    types = {"bool": "BOOLEAN", "int": "INTEGER", "float": "DOUBLE PRECISION", "str": "TEXT"}
    kinds = {row["key"]: row["type"] for row in rows}
    conn.exec_driver_sql("DROP TABLE config")
    conn.exec_driver_sql("CREATE TABLE config (run INTEGER NOT NULL REFERENCES runs (id), "
                         + ", ".join(f"{key} {types[kind]}" for key, kind in kinds.items()) + ", PRIMARY KEY (run))")
    wide = Table("config", MetaData(), Column("run", Integer), *(Column(k) for k in kinds))
    for r in runs:
        conn.execute(insert(wide).values(run=r, **values[r]))


def test_append_upgrades_a_version_2_database(db_settings, epochs, reference):
    """A database of export schema version 2 (a config column per parameter) is upgraded in place
    by an append: every earlier run's parameters become key/value rows, and the light curves
    continue as in one run."""
    run(db_settings, epochs[:3], worker_timeout=300.0)
    engine = make_engine(db_settings)
    with engine.begin() as conn:
        to_version_2_config(conn)
        conn.execute(schema.schema_version.update().values(version=2))
    engine.dispose()
    with pytest.raises(PipelineError, match=r"de_ruiter_r_max: 5\.68 -> 3\.0"):  # read from the old layout
        run(db_settings, epochs, db_append=True, de_ruiter_r_max=3.0)
    run(db_settings, epochs, db_append=True)
    assert schema_versions(db_settings) == [schema.SCHEMA_VERSION]
    assert parameter_by_run(db_settings, "worker_timeout") == [300.0, 600.0]
    assert parameter_by_run(db_settings, "fit_blends") == [True, True]
    assert parameter_by_run(db_settings, "monitor_loc") == ["[[150.01, 30.01]]"] * 2
    links = {name: [row[:4] for row in rows] for name, rows in dump(db_settings).items() if name == "extracted_sources"}
    assert links == {"extracted_sources": [row[:4] for row in reference["extracted_sources"]]}


def image_foreign_keys(settings: DatabaseSettings) -> list[dict]:
    """The foreign keys of extracted_sources.im_id."""
    from sqlalchemy import inspect

    engine = make_engine(settings)
    with engine.connect() as conn:
        keys = [key for key in inspect(conn).get_foreign_keys("extracted_sources")
                if key["constrained_columns"] == ["im_id"]]
    engine.dispose()
    return keys


def test_append_upgrades_a_version_3_database(db_settings, epochs, reference):
    """Version 3 had a foreign key from extracted_sources.im_id to images on both backends; an
    append drops it on PostgreSQL (SQLite keeps it) and continues the light curves as one run."""
    run(db_settings, epochs[:3])
    engine = make_engine(db_settings)
    with engine.begin() as conn:
        if db_settings.backend == "postgres":  # SQLite's version 3 table is the same as version 4's
            conn.exec_driver_sql("ALTER TABLE extracted_sources ADD CONSTRAINT extracted_sources_im_id_fkey "
                                 "FOREIGN KEY (im_id) REFERENCES images (id)")
        conn.execute(schema.schema_version.update().values(version=3))
    engine.dispose()
    assert len(image_foreign_keys(db_settings)) == 1
    run(db_settings, epochs, db_append=True)
    assert schema_versions(db_settings) == [schema.SCHEMA_VERSION]
    assert len(image_foreign_keys(db_settings)) == (1 if db_settings.backend == "sqlite" else 0)
    assert_upgraded(dump(db_settings), reference)


def variability_indexes(settings: DatabaseSettings) -> list[str]:
    """The names of the indexes on variability (its primary key left out)."""
    from sqlalchemy import inspect

    engine = make_engine(settings)
    with engine.connect() as conn:
        names = [index["name"] for index in inspect(conn).get_indexes("variability")]
    engine.dispose()
    return names


def test_append_upgrades_a_version_4_database(db_settings, epochs, reference):
    """Version 4 had an index on variability.eta_int; an append drops it and continues the light
    curves as one run."""
    run(db_settings, epochs[:3])
    engine = make_engine(db_settings)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX ix_variability_eta ON variability (eta_int)")
        conn.execute(schema.schema_version.update().values(version=4))
    engine.dispose()
    assert variability_indexes(db_settings) == ["ix_variability_eta"]
    run(db_settings, epochs, db_append=True)
    assert schema_versions(db_settings) == [schema.SCHEMA_VERSION]
    assert variability_indexes(db_settings) == []
    assert_upgraded(dump(db_settings), reference)


OUTLINE = ["xtr_outline"]


@pytest.mark.parametrize("version", [5, 6])
def test_append_upgrades_a_version_5_or_6_database(db_settings, epochs, reference, monkeypatch, version):
    """Version 5 kept no file sizes and modification times, 6 no outlines of the extraction regions:
    an append adds the columns (NULL for the images already there: their files are read to recognise
    them, their circles alone say what they covered), records the new images with them, and
    continues the light curves as one run."""
    run(db_settings, epochs[:3])
    engine = make_engine(db_settings)
    with engine.begin() as conn:
        for column in OUTLINE + (["file_size", "file_mtime"] if version == 5 else []):
            conn.exec_driver_sql(f"ALTER TABLE images DROP COLUMN {column}")
        conn.execute(schema.schema_version.update().values(version=version))
    engine.dispose()
    read = _checksums_counted(monkeypatch)
    run(db_settings, epochs, db_append=True)
    assert sorted(read) == sorted(epochs if version == 5 else epochs[3:])
    stamps = [(os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in epochs]
    kept = [(None, None)] * 3 if version == 5 else stamps[:3]
    assert [stamp[1:] for stamp in _stamps(db_settings)] == kept + stamps[3:]
    engine = make_engine(db_settings)
    with engine.connect() as conn:
        outlines = conn.execute(select(*(schema.images.c[c] for c in OUTLINE)).order_by(schema.images.c.id)).all()
    engine.dispose()
    assert [row[0] is None for row in outlines] == [True] * 3 + [False] * (len(epochs) - 3)
    dumped = [c for c in schema.images.c.keys() if c not in COMPARED["images"]]
    skip = [dumped.index(c) for c in OUTLINE]

    def without_outline(tables: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
        strip = [tuple(v for i, v in enumerate(row) if i not in skip) for row in tables["images"]]
        return tables | {"images": strip}

    assert_upgraded(without_outline(dump(db_settings)), without_outline(reference))


def test_append_upgrades_a_version_7_database(db_settings, epochs, reference):
    """Version 7 kept no sums of the sources' shapes: an append adds them, filled from the
    detections so far as one run would have summed them, and continues the light curves as one run."""
    run(db_settings, epochs[:3])
    to_schema_7(db_settings)
    run(db_settings, epochs, db_append=True)
    assert schema_versions(db_settings) == [schema.SCHEMA_VERSION]
    weights = [row[-len(SHAPE_SUMS)] for row in reference["runningcatalog"]]
    assert sum(w > 0 for w in weights) >= 10  # the detections' shapes were summed
    assert_upgraded(dump(db_settings), reference)


def stored_checksums(settings: DatabaseSettings) -> list[str]:
    engine = make_engine(settings)
    with engine.connect() as conn:
        rows = conn.execute(select(schema.images.c.checksum).order_by(schema.images.c.id)).scalars().all()
    engine.dispose()
    return rows


def test_append_upgrades_a_version_8_database_keeping_its_sha256(db_settings, epochs, reference, monkeypatch):
    """Version 8 recorded the sha256 (hex) of each file: an append to such a database recognises
    its files by it (their modification times differ from those stored, so each is read), records
    the new images with sha256 too, and continues the light curves as one run; a new database
    records XXH3."""
    import hashlib

    from trap_dask.checksums import XXH3, file_checksum, kind_of

    def sha256(path: str) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    assert {kind_of(c) for c in stored_checksums(sibling(db_settings, "_ref"))} == {XXH3}
    assert stored_checksums(sibling(db_settings, "_ref"))[0] == file_checksum(epochs[0])
    run(db_settings, epochs[:3])
    engine = make_engine(db_settings)
    images = schema.images
    with engine.begin() as conn:  # as trap-dask wrote them before schema 9, with stamps that no longer match
        for path in epochs[:3]:
            conn.execute(images.update().where(images.c.url == path).values(checksum=sha256(path), file_mtime=1))
        conn.execute(schema.schema_version.update().values(version=8))
    engine.dispose()
    read = _checksums_counted(monkeypatch)
    summary = run(db_settings, epochs, db_append=True)
    assert (summary.n_images, summary.n_skipped) == (len(epochs) - 3, 3)
    assert sorted(read) == sorted(epochs)
    assert schema_versions(db_settings) == [schema.SCHEMA_VERSION]
    assert stored_checksums(db_settings) == [sha256(p) for p in epochs]
    column = [c for c in schema.images.c.keys() if c not in COMPARED["images"]].index("checksum")

    def without_checksums(tables: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
        return tables | {"images": [row[:column] + row[column + 1:] for row in tables["images"]]}

    assert without_checksums(dump(db_settings)) == without_checksums(reference)


def test_append_upgrades_a_version_1_database(db_settings, epochs, reference):
    """A database of export schema version 1 (running sums in `variability`, before the images'
    astrometry and merges) is upgraded in place by an append, which then links the new images to
    the same light curves as one run does."""
    run(db_settings, epochs[:3])
    engine = make_engine(db_settings)
    added = [c.name for c in schema.images.columns if c.name.startswith("astrometry_") or c.name.endswith("_sys_err")]
    sums = [c for c in schema.variability_running_averages.columns if not c.primary_key]
    with engine.begin() as conn:  # back to the layout of version 1
        for column in sums:
            conn.exec_driver_sql(f"ALTER TABLE variability ADD COLUMN {column.name} "
                                 f"{column.type.compile(dialect=conn.dialect)}")
            conn.exec_driver_sql(f"UPDATE variability SET {column.name} = (SELECT r.{column.name} FROM "
                                 "_variability_running_averages r WHERE r.src_id = variability.src_id "
                                 "AND r.freq_band = variability.freq_band)")
        conn.exec_driver_sql("DROP TABLE _variability_running_averages")
        for name in added:
            conn.exec_driver_sql(f"ALTER TABLE images DROP COLUMN {name}")
        conn.exec_driver_sql("ALTER TABLE runningcatalog DROP COLUMN merged_into")
        conn.exec_driver_sql("DROP TABLE merges")
        to_version_2_config(conn)
        conn.execute(schema.schema_version.update().values(version=1))
    engine.dispose()
    run(db_settings, epochs, db_append=True)
    engine = make_engine(db_settings)
    with engine.connect() as conn:
        assert conn.execute(select(schema.schema_version.c.version)).scalars().all() == [schema.SCHEMA_VERSION]
        counts = conn.execute(select(schema.images.c.astrometry_n).order_by(schema.images.c.id)).scalars().all()
    engine.dispose()
    assert counts[:3] == [None] * 3 and all(n is not None for n in counts[3:])
    links = {name: [row[:4] for row in rows] for name, rows in dump(db_settings).items() if name == "extracted_sources"}
    assert links == {"extracted_sources": [row[:4] for row in reference["extracted_sources"]]}


def _cli(settings: DatabaseSettings, inputs, *extra) -> list[str]:
    args = [sys.executable, "-m", "trap_dask.cli", "run", "--db-backend", settings.backend,
            "--db-name", settings.name, "--detection_threshold", "5", "--monitor_loc", "[[150.01, 30.01]]",
            "--scheduler", "distributed", "--nr_threads", "2", *extra]
    if settings.backend == "postgres":
        args += ["--db-host", settings.host, "--db-port", str(settings.port), "--db-user", settings.user]
    for path in inputs:
        args += ["-i", str(path)]
    return args


@contextmanager
def _writes_held(settings: DatabaseSettings):
    """Block the run's commits while the caller looks; yields the number of committed images (0 before the
    schema exists). The count cannot change until the block ends, so a kill inside it leaves exactly that many."""
    if not database_exists(settings):
        yield 0
        return
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            try:
                if settings.backend == "sqlite":
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                else:
                    conn.exec_driver_sql("BEGIN")
                    conn.exec_driver_sql("LOCK TABLE images IN SHARE MODE")
                count = conn.execute(select(func.count()).select_from(schema.images)).scalar()
            except DBAPIError:   # the schema is not there yet
                count = 0
            yield count
            conn.rollback()
    finally:
        engine.dispose()


def _committed(settings: DatabaseSettings) -> int:
    with _writes_held(settings) as count:
        return count


def _run_until(settings: DatabaseSettings, inputs, log: Path, committed: int, act, *extra: str):
    """Start a run and call ``act(proc)`` once it has committed ``committed`` images, while its next
    commit waits for our lock (so it cannot have gone further); returns (proc, what act returned)."""
    with open(log, "w") as out:
        proc = spawn(_cli(settings, inputs, *extra), stdout=out, stderr=out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with _writes_held(settings) as count:
                if count >= committed:
                    return proc, act(proc)
        except OperationalError:  # SQLite: our connection opened while the run held the file locked; look again
            pass
        time.sleep(0.01)
    raise AssertionError("the run finished before it could be stopped: " + log.read_text()[-2000:])


@pytest.mark.parametrize("kill_after", [1, 4])
def test_sigkill_then_resume_equals_one_run(db_settings, long_epochs, long_reference, tmp_path, kill_after):
    _run_until(db_settings, long_epochs, tmp_path / "run.log", kill_after,
               lambda proc: (os.killpg(proc.pid, signal.SIGKILL), proc.wait()))
    assert kill_after <= _committed(db_settings) < len(long_epochs)
    assert _run_rows(db_settings) == [("running", _committed(db_settings))]   # counted in each transaction
    resumed = subprocess.run(_cli(db_settings, long_epochs, "--db_append"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert dump(db_settings) == long_reference


def _run_rows(settings: DatabaseSettings) -> list[tuple]:
    engine = make_engine(settings)
    with engine.connect() as conn:
        rows = conn.execute(select(schema.runs.c.status, schema.runs.c.n_images).order_by(schema.runs.c.id)).all()
    engine.dispose()
    return [tuple(row) for row in rows]


def test_sigterm_stops_cleanly_and_the_resume_equals_one_run(db_settings, long_epochs, long_reference, tmp_path):
    """What SLURM and PBS send a job before they kill it, to every process of the job."""
    proc, _ = _run_until(db_settings, long_epochs, tmp_path / "run.log", 2,
                         lambda proc: os.killpg(proc.pid, signal.SIGTERM))
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    stderr = (tmp_path / "run.log").read_text()
    assert "terminated (SIGTERM)" in stderr and "--db_append to resume" in stderr and "Traceback" not in stderr
    committed = _committed(db_settings)
    assert 2 <= committed < len(long_epochs)
    assert _run_rows(db_settings) == [("interrupted", committed)]
    assert run(db_settings, long_epochs, db_append=True).n_images == len(long_epochs) - committed
    assert dump(db_settings) == long_reference
    assert _run_rows(db_settings) == [("interrupted", committed), ("completed", len(long_epochs) - committed)]


def test_a_sigterm_whose_exception_python_swallows_still_stops_the_run(tmp_path, long_epochs, monkeypatch):
    """A SIGTERM that arrives while the main thread runs a ``__del__`` (a Dask future's, as it is
    collected) has the exception its handler raises swallowed by Python: the run once went on and
    completed, exit 0. It now stops at its next image, recorded as interrupted, and Python's
    "Exception ignored" with its traceback is not printed (once seen in a full test run)."""
    import trap_dask.pipeline as pipeline

    settings = DatabaseSettings(backend="sqlite", name=str(tmp_path / "term.db"))
    swallowed, printed = [], []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: printed.append(unraisable.exc_type))

    class SigtermInDel:
        def __del__(self) -> None:
            swallowed.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:  # bytecode: the handler runs (and raises) in here
                pass

    counted = pipeline._count

    def count_then_sigterm(*args) -> None:
        counted(*args)
        if not swallowed:
            SigtermInDel()  # collected at once: its __del__ runs in the main thread

    monkeypatch.setattr(pipeline, "_count", count_then_sigterm)
    with pytest.raises(pipeline.Terminated):
        run(settings, long_epochs)
    assert swallowed == [True]  # raised inside __del__, where Python drops it
    assert printed == []  # and does not hand it to its hook, which prints "Exception ignored" and a traceback
    [(status, committed)] = _run_rows(settings)
    assert status == "interrupted" and 1 <= committed < len(long_epochs)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, epochs):
    settings = DatabaseSettings(backend="sqlite", name=str(tmp_path / "int.db"))
    many = SurveySpec(n_epochs=30, shape=(192, 192), n_steady=6, n_variable=1, n_transient=1, n_resolved=0,
                      n_pairs=0, min_separation=4.0, seed=4)
    simulate_survey(tmp_path / "many", many)
    proc = spawn(_cli(settings, [tmp_path / "many"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and _committed(settings) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "--db_append to resume" in stderr and "Traceback" not in stderr
    engine = make_engine(settings)
    with engine.connect() as conn:
        status, n_images = conn.execute(select(schema.runs.c.status, schema.runs.c.n_images)).one()
        assert status == "interrupted" and n_images == conn.execute(
            select(func.count()).select_from(schema.images)).scalar()
    engine.dispose()
    assert 2 <= n_images < many.n_epochs
    resumed = subprocess.run(_cli(settings, [tmp_path / "many"], "--db_append"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _committed(settings) == many.n_epochs


def test_a_run_started_with_ctrl_c_ignored_goes_on_ignoring_it(tmp_path):
    """A background job of a script (``trap-dask run ... &`` without job control) starts with SIGINT
    ignored, so that a Ctrl-C meant for the script does not reach it: the run keeps it so. It once
    installed its own handler a second into the run, and stopped there."""
    settings = DatabaseSettings(backend="sqlite", name=str(tmp_path / "ign.db"))
    many = SurveySpec(n_epochs=12, shape=(192, 192), n_steady=6, n_variable=1, n_transient=1, n_resolved=0,
                      n_pairs=0, min_separation=4.0, seed=4)
    simulate_survey(tmp_path / "many", many)
    proc = spawn(_cli(settings, [tmp_path / "many"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and _committed(settings) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "interrupted" not in stderr and _committed(settings) == many.n_epochs


def test_append_to_an_empty_database_made_beforehand(db_settings, epochs):
    from trap_dask.db.backends import create_database

    if db_settings.backend == "sqlite":
        Path(db_settings.name).touch()   # an empty file is an empty SQLite database
    else:
        create_database(db_settings)     # as an administrator would, for a user without CREATEDB
    summary = run(db_settings, epochs[:2], db_append=True)
    assert summary.n_images == 2 and _committed(db_settings) == 2


@pytest.mark.parametrize("bands, expected, appended_band", [
    # the stored automatic band given again (as other numbers) after a band of no image: reused, id 0
    ("[[1e8, 1.2e8], [149000000, 1.51e8]]", {0: (149e6, 150e6, 151e6), 1: (100e6, 110e6, 120e6)}, 0),
    # a wider band than the stored one: a new band with a fresh id
    ("[[1.45e8, 1.55e8]]", {0: (149e6, 150e6, 151e6), 1: (145e6, 150e6, 155e6)}, 1),
], ids=["matching", "new"])
def test_append_with_fixed_bands_to_automatic_bands(db_settings, epochs, bands, expected, appended_band, capsys):
    run(db_settings, epochs[:2])   # automatic band 0: 150 MHz +- 1 MHz
    capsys.readouterr()
    summary = run(db_settings, epochs[:4], db_append=True, frequency_band=bands, accept_config_change=True)
    assert summary.n_images == 2 and summary.n_rejected == 0
    # a new band over the stored one's frequencies is said, once (the run's log goes to stderr)
    said = [line.split(" WARNING ", 1)[1] for line in capsys.readouterr().err.splitlines()
            if "overlaps band 0 of the database" in line]
    assert said == ([] if appended_band == 0 else
                    ["frequency_band [145000000, 155000000] Hz overlaps band 0 of the database [149000000, "
                     "151000000] Hz: the images appended there go to the new band, and their light curves' "
                     "variability is measured apart from the earlier images'"])
    engine = make_engine(db_settings)
    with engine.connect() as conn:
        stored = {row.band_id: (row.freq_low, row.freq_central, row.freq_high)
                  for row in conn.execute(select(schema.frequencybands))}
        image_bands = conn.execute(select(schema.images.c.freq_band).order_by(schema.images.c.id)).scalars().all()
    engine.dispose()
    assert stored == expected
    assert image_bands == [0, 0, appended_band, appended_band]


def test_an_unreadable_file_is_recorded_once(db_settings, epochs, tmp_path, monkeypatch):
    from trap_dask import tasks

    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"this is not FITS" * 300)
    checksum = tasks.file_checksum

    def failing_disk(path: str, kind: str) -> str:   # its bytes cannot be read: no checksum, as on a failing disk
        if path == str(garbage):
            raise OSError(5, "Input/output error")
        return checksum(path, kind)

    def garbage_rows() -> list[tuple]:
        engine = make_engine(db_settings)
        with engine.connect() as conn:
            rows = conn.execute(select(schema.images.c.rejected, schema.images.c.checksum)
                                .where(schema.images.c.url == str(garbage)).order_by(schema.images.c.id)).all()
        engine.dispose()
        return [(rejected, digest is not None) for rejected, digest in rows]

    inputs = [*epochs[:2], str(garbage)]
    monkeypatch.setattr(tasks, "file_checksum", failing_disk)
    assert run(db_settings, inputs).n_rejected == 1
    summary = run(db_settings, inputs, db_append=True)
    assert (summary.n_images, summary.n_skipped) == (0, 3)
    assert garbage_rows() == [(True, False)]
    monkeypatch.undo()   # readable again: processed, and recorded with its checksum
    summary = run(db_settings, inputs, db_append=True)
    assert (summary.n_images, summary.n_rejected, summary.n_skipped) == (1, 1, 2)
    assert garbage_rows() == [(True, False), (True, True)]
    assert run(db_settings, inputs, db_append=True).n_skipped == 3


def test_append_to_a_missing_database_is_refused_and_creates_nothing(db_settings, epochs):
    with pytest.raises(PipelineError, match=r"does not exist, so there is nothing to append to; "
                                            r"a run without --db_append creates it$"):
        run(db_settings, epochs[:1], db_append=True)
    assert not database_exists(db_settings)
    if db_settings.backend == "sqlite":
        assert not Path(db_settings.name + ".lock").exists()


def test_append_to_a_file_that_is_not_a_database_is_one_line(tmp_path, epochs):
    target = tmp_path / "notes.db"
    target.write_bytes(b"observing notes, not a database\n" * 100)
    before = target.read_bytes(), target.stat().st_mtime_ns
    settings = DatabaseSettings(backend="sqlite", name=str(target))
    result = subprocess.run(_cli(settings, epochs[:1], "--db_append", "--scheduler", "threads"),
                            capture_output=True, text=True)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert errors == [f"trap-dask: error: SQLite file {target} is not a trap-dask export database: "
                      "file is not a database"]
    assert (target.read_bytes(), target.stat().st_mtime_ns) == before


def test_a_gzipped_image_is_processed_like_the_plain_file(tmp_path, epochs):
    import gzip

    packed = tmp_path / "in" / (Path(epochs[1]).name + ".gz")
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(Path(epochs[1]).read_bytes()))
    plain, zipped = (DatabaseSettings(backend="sqlite", name=str(tmp_path / f"{n}.db")) for n in ("plain", "gz"))
    run(plain, epochs[:2])
    run(zipped, [epochs[0], str(packed.parent)])   # found in a directory by its suffix
    a, b = dump(plain), dump(zipped)
    url, checksum = (list(schema.images.c.keys()).index(c) - 1 for c in ("url", "checksum"))  # "run" not dumped
    assert [row[url] for row in b["images"]] == [epochs[0], str(packed)]
    assert b["images"][1][checksum] != a["images"][1][checksum]
    strip = lambda rows: [tuple(v for i, v in enumerate(row) if i not in (url, checksum)) for row in rows]  # noqa: E731
    assert strip(a["images"]) == strip(b["images"]) and a["extracted_sources"] == b["extracted_sources"]


def test_a_copy_in_the_same_run_is_recorded_once(db_settings, epochs, tmp_path, reference, capsys):
    import shutil

    folder = tmp_path / "with_copy"
    folder.mkdir()
    for path in epochs:
        shutil.copy(path, folder)
    original = folder / Path(epochs[2]).name
    copy = folder / (original.stem + "_copy.fits")   # sorts after the original
    shutil.copy(original, copy)
    summary = run(db_settings, [str(folder)])
    assert (summary.n_images, summary.n_duplicates, summary.n_skipped) == (len(epochs), 1, 0)
    assert f"{copy} has the same contents as {original}: recorded once" in capsys.readouterr().err
    assert "1 copy of another input" in summary.describe()
    stored, url = dump(db_settings), list(schema.images.c.keys()).index("url") - 1
    assert str(copy) not in [row[url] for row in stored["images"]]
    without_urls = lambda tables: {name: rows if name != "images" else [row[:url] + row[url + 1:] for row in rows]  # noqa: E731
                                   for name, rows in tables.items()}
    assert without_urls(stored) == without_urls(reference)
    # appending the folder again: all, the copy included, already in the database; the copy, recorded
    # under its original's name, is said to be one (it may have been meant as a new observation)
    capsys.readouterr()
    summary = run(db_settings, [str(folder)], db_append=True)
    assert (summary.n_images, summary.n_skipped) == (0, len(epochs) + 1)
    assert (f"skipped 1 images holding the same bytes as an image in the database under another name, e.g. {copy}"
            in capsys.readouterr().err)


def _worker_processes(pid: int) -> list:
    """The Dask worker processes of a run's local cluster (its nannies restart them)."""
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True)
            if any("multiprocessing.spawn" in part or "spawn_main" in part for part in p.cmdline())]


def test_every_worker_killed_once_the_writers_included_equals_one_run(db_settings, long_epochs, tmp_path):
    def kill_the_workers(proc) -> list:   # the writer's dies as its next commit waits for our lock
        workers = _worker_processes(proc.pid)
        for worker in workers:
            worker.kill()
        return workers

    # the reference: one run on the same cluster (forced fits in worker processes and in the run's
    # own threads agree to ~1e-13 only: numpy's vectorised sums depend on the arrays' alignment)
    ref = sibling(db_settings, "_ref")
    clean = subprocess.run(_cli(ref, long_epochs, "--n_workers", "2"), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    reference = dump(ref)
    if ref.backend == "postgres":
        drop_database(ref)
    log_path = tmp_path / "run.log"
    # two worker processes (up to 4 threads, a local cluster runs them in its own process)
    proc, killed = _run_until(db_settings, long_epochs, log_path, 2, kill_the_workers, "--n_workers", "2")
    assert len(killed) == 2
    assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    assert "starting a new writer from the committed state (restart 1 of at most 3)" in log_path.read_text()
    assert same_tables(dump(db_settings), reference)
    runs = _run_rows(db_settings)
    assert [status for status, _ in runs] == ["killed", "completed"] and sum(n for _, n in runs) == len(long_epochs)


def test_a_copy_of_an_unreadable_file_is_recorded_once(tmp_path, epochs):
    settings = DatabaseSettings(backend="sqlite", name=str(tmp_path / "copies.db"))
    for name in ("garbage.fits", "garbage_copy.fits"):
        (tmp_path / name).write_bytes(b"this is not FITS" * 300)
    summary = run(settings, [epochs[0], str(tmp_path / "garbage.fits"), str(tmp_path / "garbage_copy.fits")])
    assert (summary.n_images, summary.n_rejected, summary.n_duplicates) == (2, 1, 1)
    url = list(schema.images.c.keys()).index("url") - 1
    assert [row[url] for row in dump(settings)["images"]] == [str(tmp_path / "garbage.fits"), epochs[0]]
