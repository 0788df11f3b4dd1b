"""The export store on every backend: lifecycle, one-transaction commits, types."""

from datetime import datetime

import numpy as np
import pytest
from conftest import postgres_settings
from sqlalchemy import inspect, select, text

from trap_dask.config import Config
from trap_dask.db import schema
from trap_dask.db.backends import DatabaseError, DatabaseSettings, drop_database
from trap_dask.db.store import ExportStore, last_of_each_key
from trap_dask.sources import empty_sources

TRAP_TABLES = {
    "config", "images", "extracted_sources", "frequencybands", "variability",
    "runningcatalog", "newsource", "runs", "schema_version", "monitor",
}


def image_row(im_id, run):
    return {
        "id": im_id, "run": run, "url": f"/data/img{im_id}.fits", "rejected": False, "freq_band": 1,
        "freq_eff": 1.5e8, "freq_bw": 2e6, "taustart_ts": datetime(2021, 3, 4, 5, 6, 7), "rms": 1e-3,
        "centre_ra": 123.456789012345, "centre_dec": -45.678901234567,
    }


def test_create_refuses_existing_database_unless_overwrite(db_settings):
    ExportStore.create(db_settings, overwrite=False).close()
    with pytest.raises(DatabaseError, match="--db_overwrite"):
        ExportStore.create(db_settings, overwrite=False)
    store = ExportStore.create(db_settings, overwrite=True)
    assert TRAP_TABLES <= set(inspect(store.engine).get_table_names())
    store.close()



def test_overwrite_replaces_only_an_export_database_or_an_empty_one(db_settings, tmp_path):
    """--db_overwrite never destroys, nor changes, what is not a trap-dask export database: another
    application's tables, in any schema, also one with a ``schema_version`` table of its own (a
    migration tool's), or (SQLite) any other file, such as an input image given as --db_name by
    mistake; an empty database (an administrator's, an empty file) is replaced."""
    import sqlite3

    from trap_dask.db.backends import create_database, make_engine

    sqlite = db_settings.backend == "sqlite"

    def make(*statements: str) -> None:  # another application's database, as it would make it
        drop_database(db_settings)
        if sqlite:
            with sqlite3.connect(db_settings.name) as conn:
                for statement in statements:
                    conn.execute(statement)
            return
        create_database(db_settings)
        engine = make_engine(db_settings)
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
        engine.dispose()

    make()  # empty
    ExportStore.create(db_settings, overwrite=True).close()
    others = [("CREATE TABLE observations (id INTEGER)",),
              ("CREATE TABLE schema_version (installed_rank INTEGER, version TEXT)",
               "CREATE TABLE customers (id INTEGER)")]
    if not sqlite:
        others.append(("CREATE SCHEMA app", "CREATE TABLE app.observations (id INTEGER)"))
    for statements in others:
        make(*statements)
        with pytest.raises(DatabaseError, match="not a trap-dask export database; --db_overwrite replaces only those"):
            ExportStore.create(db_settings, overwrite=True)
        table = statements[-1].split()[2]  # the last one made: still there
        if sqlite:  # untouched: not even switched to the export database's WAL journal
            with sqlite3.connect(db_settings.name) as conn:
                assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        else:
            engine = make_engine(db_settings)
            with engine.connect() as conn:
                assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0
            engine.dispose()
    if sqlite:
        image = tmp_path / "epoch0.fits"
        image.write_bytes(b"SIMPLE  =                    T" + b" " * 2850)
        with pytest.raises(DatabaseError, match="file is not a database; --db_overwrite replaces only those"):
            ExportStore.create(DatabaseSettings("sqlite", str(image)), overwrite=True)
        assert image.read_bytes().startswith(b"SIMPLE  =")


def test_image_commit_round_trips_in_double_precision(db_settings):
    store = ExportStore.create(db_settings, overwrite=False)
    run = store.start_run(Config(db_name="x", db_password="hunter2").exportable(), None)
    sources = empty_sources(2)
    sources["ra"] = [123.456789012345, 0.000000123456789]
    sources["dec"] = [-45.678901234567, 89.99999999999]
    sources["peak_flux"] = [1.5, np.nan]
    ids = {"id": np.array([1, 2]), "src_id": np.array([1, 2]), "parent": np.array([-1, -1]),
           "is_duplicate": np.array([False, True])}
    band = {"band_id": 1, "freq_low": 1.49e8, "freq_central": 1.5e8, "freq_high": 1.51e8}
    store.commit_image(image_row(1, run), band_rows=[band], sources=sources, source_ids=ids)
    with store.engine.connect() as conn:
        rows = conn.execute(select(schema.extracted_sources).order_by(schema.extracted_sources.c.id)).all()
        config_rows = conn.execute(select(schema.config)).mappings().all()
    assert rows[0].ra == 123.456789012345 and rows[1].dec == 89.99999999999
    assert rows[1].peak_flux is None                      # NaN is stored as NULL on every backend
    assert rows[1].is_duplicate is True and rows[0].is_force_fit is False
    assert config_rows and "hunter2" not in repr([dict(r) for r in config_rows])
    assert "db_password" not in {r["key"] for r in config_rows} and store.latest_config()["db_name"] == "x"
    store.close()


def test_failed_commit_leaves_nothing_of_the_image(db_settings):
    store = ExportStore.create(db_settings, overwrite=False)
    run = store.start_run(Config().exportable(), None)
    band = {"band_id": 1, "freq_low": 1.49e8, "freq_central": 1.5e8, "freq_high": 1.51e8}
    bad_ids = {"id": np.array([1, 1]), "src_id": np.array([1, 2]), "parent": np.array([-1, -1]),
               "is_duplicate": np.array([False, False])}  # duplicate primary key: must roll back
    with pytest.raises(DatabaseError):
        store.commit_image(image_row(1, run), band_rows=[band], sources=empty_sources(2), source_ids=bad_ids)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM images")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM frequencybands")).scalar() == 0
    store.close()


def test_a_lock_held_by_another_session_fails_the_commit_after_the_wait_naming_it(db_settings, monkeypatch):
    """A write transaction left open elsewhere (a sqlite3 shell, a notebook, another client's LOCK
    TABLE) holds the writer LOCK_WAIT_S at most, then the commit fails saying what held it."""
    from trap_dask.db import backends, postgresql, sqlite

    for module in (backends, postgresql, sqlite):
        monkeypatch.setattr(module, "LOCK_WAIT_S", 1)
    store = ExportStore.create(db_settings, overwrite=False)
    run = store.start_run(Config().exportable(), None)
    band = {"band_id": 1, "freq_low": 1.49e8, "freq_central": 1.5e8, "freq_high": 1.51e8}
    other = db_settings.impl.make_engine()
    with other.connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if db_settings.backend == "sqlite" else "BEGIN")
        if db_settings.backend == "postgres":
            conn.exec_driver_sql("LOCK TABLE images IN ACCESS EXCLUSIVE MODE")
        held = r"(database is locked after 1 s: another process holds a write transaction open on the file" \
               r"|canceling statement due to lock timeout after 1 s: another session held a lock on a table)"
        with pytest.raises(DatabaseError, match=held):
            store.commit_image(image_row(1, run), band_rows=[band])
        conn.rollback()
    other.dispose()
    store.commit_image(image_row(1, run), band_rows=[band])  # the lock gone, the same commit goes through
    store.close()


def test_sqlite_page_cache_follows_the_transaction_size(tmp_path):
    """A SQLite transaction's page cache grows with the measurements it inserts (~1 KiB each, at
    least 4 MiB, at most 64): a batch written behind keeps its src_id-index pages cached, a writer
    that keeps up stays at 4 MiB."""
    store = ExportStore.create(DatabaseSettings(backend="sqlite", name=str(tmp_path / "x.db")), overwrite=False)
    run = store.start_run(Config().exportable(), None)
    band = {"band_id": 1, "freq_low": 1.49e8, "freq_central": 1.5e8, "freq_high": 1.51e8}

    def commit(im_ids: list[int], per_image: int) -> int:
        """Commit images of ``per_image`` measurements in one transaction; the cache after it (KiB)."""
        with store.batch():
            for im_id in im_ids:
                ids = {"id": im_id * 100_000 + np.arange(per_image), "src_id": np.arange(per_image),
                       "parent": np.full(per_image, -1), "is_duplicate": np.zeros(per_image, bool)}
                store.commit_image(image_row(im_id, run), band_rows=[band] if im_id == 1 else [],
                                   sources=empty_sources(per_image), source_ids=ids)
        with store.engine.connect() as conn:  # the pool's one connection: the one that wrote
            return -conn.exec_driver_sql("PRAGMA cache_size").scalar()

    assert commit([1, 2, 3, 4], 1000) == 4096
    assert commit(list(range(5, 21)), 1000) == 16000
    assert commit([21], 100_000) == 65536
    assert commit([22], 10) == 4096
    store.close()


@pytest.mark.parametrize("name", ['x"; DROP DATABASE postgres; --', "Mixed Case-ünïcode"])
def test_postgres_odd_names_are_identifiers_never_sql(name):
    settings = postgres_settings(name)
    drop_database(settings)
    try:
        ExportStore.create(settings, overwrite=False).close()
        assert postgres_settings("postgres")  # the maintenance database still exists
        with pytest.raises(DatabaseError, match="already exists"):
            ExportStore.create(settings, overwrite=False)
    finally:
        drop_database(settings)


def test_postgres_wrong_password_is_one_clear_line_without_the_password():
    settings = postgres_settings("trap_dask_never_created")
    wrong = DatabaseSettings(backend="postgres", name="x", host=settings.host, port=1, user="nobody",
                             password="Sup3rS3cret")
    with pytest.raises(DatabaseError) as err:
        ExportStore.create(wrong, overwrite=False)
    message = str(err.value)
    assert "Sup3rS3cret" not in message and "\n" not in message
    assert "cannot connect" in message


def test_last_of_each_key_keeps_the_last_row_of_each_key_in_key_order():
    src = np.array([5, 3, 5, 3, 7, 5])
    band = np.array([0, 0, 1, 0, 0, 0])
    assert last_of_each_key([src]).tolist() == [3, 5, 4]           # src 3 (row 3), 5 (row 5), 7 (row 4)
    assert last_of_each_key([src, band]).tolist() == [3, 5, 2, 4]  # (3,0) (5,0) (5,1) (7,0)
    assert last_of_each_key([np.zeros(0, int)]).tolist() == []


def test_a_lost_connection_is_named_as_such_with_what_ends_one():
    """psycopg2 reports a session the server ended (pg_terminate_backend, a restart, a dropped
    database) as the rollback's "connection already closed": said alone, that hides why."""
    import psycopg2

    from trap_dask.db.backends import driver_reason

    lost = driver_reason(psycopg2.InterfaceError("connection already closed"))
    assert lost.startswith("the connection to the database server was lost (connection already closed): ")
    assert "pg_terminate_backend" in lost and "network" in lost
    assert driver_reason(psycopg2.OperationalError("disk full\nDETAIL: x")) == "disk full"


def test_a_new_database_whose_tables_cannot_be_made_is_removed_and_the_error_says_so(db_settings, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from trap_dask.db.backends import database_exists

    def lost(self, engine):
        raise OperationalError("CREATE TABLE", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(type(db_settings.impl), "create_tables", lost)
    with pytest.raises(DatabaseError, match=r"^cannot create the tables in .*: the connection to the database server "
                                            r"was lost .*; the new database was removed: run the same command again$"):
        ExportStore.create(db_settings, overwrite=False)
    assert not database_exists(db_settings)


def test_a_sqlite_file_deleted_is_not_made_again_by_a_later_connection(tmp_path):
    """A writer's committer process connects after the run started: if the file was deleted by
    then, connecting fails instead of making an empty file at the path (which hid the deletion)."""
    from pathlib import Path

    settings = DatabaseSettings(backend="sqlite", name=str(tmp_path / "gone.db"))
    store = ExportStore.create(settings, overwrite=False)
    run = store.start_run(Config().exportable(), None)
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{settings.name}{suffix}").unlink(missing_ok=True)
    later = ExportStore(settings)
    with pytest.raises(DatabaseError, match="unable to open database file"):
        later.commit_image(image_row(1, run))
    later.close()
    assert not Path(settings.name).exists()
