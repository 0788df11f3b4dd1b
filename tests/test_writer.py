"""The writer's answers to a task retried after its worker was lost (an image is never recorded twice),
and when and where it writes the images it staged: its committer thread, or its committer process
once it falls behind (failures, kill -9 and signals included)."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from test_backend_contract import table_rows
from test_merges import _forced, _image

from trap_dask import committer
from trap_dask import writer as writer_module
from trap_dask.config import build_config
from trap_dask.db import schema
from trap_dask.db.backends import DatabaseSettings, make_engine
from trap_dask.db.store import ExportStore
from trap_dask.messages import CommitSummary, ForcedMeasurements, ForcedRequest
from trap_dask.writer import Writer


def _config(settings: DatabaseSettings):
    server = dict(db_host=settings.host, db_port=settings.port, db_user=settings.user) if settings.user else {}
    return build_config(dict(db_backend=settings.backend, db_name=settings.name, **server), {}, None)


def _writer_on(settings: DatabaseSettings, **options) -> Writer:
    """A writer of a new database on either backend."""
    ExportStore.create(settings, overwrite=False).close()
    return Writer(settings, _config(settings), None, **options)


def _writer(tmp_path, name: str = "w.db", **options) -> tuple[Writer, DatabaseSettings]:
    """A writer of a new SQLite database in ``tmp_path``."""
    settings = DatabaseSettings(backend="sqlite", name=str(tmp_path / name))
    return _writer_on(settings, **options), settings


def _count(settings: DatabaseSettings, table) -> int:
    engine = make_engine(settings)
    with engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(table)).scalar()
    engine.dispose()
    return n


def _tables(*databases: DatabaseSettings) -> list[dict]:
    """Every table's rows of each database."""
    stores = [ExportStore.open(settings) for settings in databases]
    try:
        return [table_rows(store) for store in stores]
    finally:
        for store in stores:
            store.close()


def _commit(writer: Writer, request: ForcedRequest) -> CommitSummary:
    return writer.commit(ForcedMeasurements(_forced(request.ra, request.dec),
                                            backfill=_forced(request.backfill_ra, request.backfill_dec)))


def test_an_image_associated_again_before_its_commit_is_recorded_once(tmp_path):
    writer, settings = _writer(tmp_path)
    first = _image(1, [150.0, 150.2], [30.0, 30.0])
    _commit(writer, writer.associate(first))
    second = _image(2, [150.0, 150.2], [30.0, 30.0])
    writer.associate(second)                        # its worker is lost before the commit ...
    summary = _commit(writer, writer.associate(second))  # ... and the task runs again elsewhere
    writer.finish("completed")
    assert summary.im_id == 1 and _count(settings, schema.images) == 2
    assert _count(settings, schema.extracted_sources) == 4


def test_detections_without_a_finite_position_are_left_out_with_a_warning(tmp_path, caplog, monkeypatch):
    """A detection whose position or position error is NaN never enters the catalogue: the next
    images are associated as usual (a NaN position made every later association fail)."""
    import logging

    import numpy as np

    monkeypatch.setattr(logging.getLogger("trap_dask"), "propagate", True)  # a run in an earlier test turns it off
    writer, settings = _writer(tmp_path)
    first = _image(1, [150.0, 150.2, 150.4], [30.0, 30.0, 30.0])
    first.sources["ra"][1] = np.nan
    first.sources["dec_fit_err"][2] = np.inf
    with caplog.at_level("WARNING", logger="trap_dask.writer"):
        _commit(writer, writer.associate(first))
    assert "/data/image1.fits: 2 detection(s) without a finite position or position error left out" in caplog.text
    summary = _commit(writer, writer.associate(_image(2, [150.0, 150.4], [30.0, 30.0])))
    writer.finish("completed")
    assert summary.n_sources == 2 and summary.n_new == 1
    # 1 + 2 detections, and the new source's forced fit in image 1
    assert _count(settings, schema.extracted_sources) == 4


def test_a_committed_image_asked_again_gets_its_summary_back(tmp_path):
    writer, settings = _writer(tmp_path)
    first, second = _image(1, [150.0], [30.0]), _image(2, [150.0], [30.0])
    done = _commit(writer, writer.associate(first))
    request = writer.associate(second)                 # the next image is being associated ...
    assert writer.associate(first) == done             # ... when the first one's task is retried
    _commit(writer, request)
    writer.finish("completed")
    assert _count(settings, schema.images) == 2 and _count(settings, schema.extracted_sources) == 2


def test_a_commit_asked_again_gets_its_summary_back(tmp_path):
    writer, settings = _writer(tmp_path)
    first, second = _image(1, [150.0], [30.0]), _image(2, [150.0], [30.0])
    request = writer.associate(first)
    done = _commit(writer, request)
    writer.associate(second)
    again = writer.commit(ForcedMeasurements(_forced(request.ra, request.dec)), request.url)  # a retried task
    assert again == done
    writer.finish("completed")
    assert _count(settings, schema.images) == 1 and _count(settings, schema.extracted_sources) == 1


def test_an_image_that_reaches_the_writer_after_the_run_stopped_is_dropped_quietly(tmp_path):
    """A task still running when a run stopped (Ctrl-C, SIGTERM) calls the writer after finish():
    it gets a 'dropped' summary (no error for Dask to report) and nothing is recorded."""
    writer, settings = _writer(tmp_path)
    first, second = _image(1, [150.0], [30.0]), _image(2, [150.0], [30.0])
    request = writer.associate(first)
    writer.finish("interrupted")                  # the run stops between the image's two calls
    late_commit = _commit(writer, request)
    late_associate = writer.associate(second)
    assert late_commit.dropped and not late_commit.recorded
    assert late_associate.dropped and not late_associate.recorded
    assert _count(settings, schema.images) == 0 and _count(settings, schema.extracted_sources) == 0


def _burn(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU time."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def test_the_stages_cpu_is_the_messages_and_the_writers_own_each_counted_once(tmp_path, monkeypatch):
    """Writer.stage_cpu (trap-dask bench's CPU rows): the CPU seconds the workers' messages carry,
    plus the writer's own in its entry points and in its committer thread, an entry point called
    by another (finish calls flush) counted once."""
    writer, _ = _writer(tmp_path, stage_every_image=True)
    calls = {"stage": 0, "write_staged": 0, "write_batch": 0}

    def burning(name, seconds, real):
        def burn_then(*args, **kwargs):
            calls[name] += 1
            _burn(seconds)
            return real(*args, **kwargs)
        return burn_then

    monkeypatch.setattr(writer, "_stage", burning("stage", 0.3, writer._stage))  # in commit()
    monkeypatch.setattr(writer, "_write_staged", burning("write_staged", 0.6, writer._write_staged))  # in flush()
    monkeypatch.setattr(writer_module, "write_batch", burning("write_batch", 0.45, writer_module.write_batch))
    for i in (1, 2, 3):
        request = writer.associate(replace(_image(i, [150.0, 150.2], [30.0, 30.0]), cpu=2.0))
        writer.commit(ForcedMeasurements(_forced(request.ra, request.dec), cpu=3.0))
    spent = writer.finish("completed")["stage_cpu_seconds"] - 15.0
    burnt = 0.3 * calls["stage"] + 0.6 * calls["write_staged"] + 0.45 * calls["write_batch"]
    assert calls["stage"] == 3 and calls["write_batch"] >= 1
    # the writer's own work on three small images: ~0.1 s on a slow core; counting an entry point
    # nested in another twice would add 0.6 s at least
    assert burnt <= spent < burnt + 0.45


def test_a_writer_taken_over_writes_nothing_more(db_settings):
    """A writer given up for lost that lives on after all: once its successor's start has marked its
    run 'killed' (as pipeline._restart_writer does), its staged images are refused, the database
    keeps what it held, and its run's end does not overwrite 'killed'."""
    from trap_dask.db.backends import DatabaseError

    writer = _writer_on(db_settings, stage_every_image=True)
    _commit(writer, writer.associate(_image(1, [150.0, 150.2], [30.0, 30.0])))
    writer.flush()
    _commit(writer, writer.associate(_image(2, [150.0, 150.2], [30.0, 30.0])))  # staged, not written
    store = ExportStore.open(db_settings)
    try:
        assert store.close_stale_runs() == 1  # the one image it wrote
    finally:
        store.close()
    with pytest.raises(DatabaseError, match="^this writer was taken over .*no longer running.*writes nothing more$"):
        writer.flush()
    assert "--db_append" not in writer.finish("completed")["failure"]  # its run goes on under its successor
    assert _count(db_settings, schema.images) == 1
    engine = make_engine(db_settings)
    with engine.connect() as conn:
        assert conn.execute(select(schema.runs.c.status, schema.runs.c.n_images)).all() == [("killed", 1)]
    engine.dispose()


@pytest.mark.parametrize("replaced", [False, True, "link"])
def test_a_sqlite_file_deleted_or_replaced_during_the_run_stops_it(tmp_path, replaced):
    """SQLite goes on writing into a file deleted under it (its inode lives while open): the
    writer checks before each transaction that the path still names the file it opened, and the
    run stops without telling the user to resume a database that is not there."""
    from trap_dask.db.backends import DatabaseError

    if replaced == "link":  # --db_name a symbolic link, replaced by a file of its own
        target = DatabaseSettings(backend="sqlite", name=str(tmp_path / "target.db"))
        ExportStore.create(target, overwrite=False).close()
        (tmp_path / "w.db").symlink_to(tmp_path / "target.db")
        settings = DatabaseSettings(backend="sqlite", name=str(tmp_path / "w.db"))
        writer = Writer(settings, _config(settings), None)
    else:
        writer, settings = _writer(tmp_path)
    _commit(writer, writer.associate(_image(1, [150.0, 150.2], [30.0, 30.0])))
    path = Path(settings.name)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if replaced:
        path.write_bytes(b"")  # another file at the path
    with pytest.raises(DatabaseError, match=r"^the export database could not be written: SQLite file .* was "
                                            r"deleted or replaced while this run wrote to it"):
        _commit(writer, writer.associate(_image(2, [150.0, 150.2], [30.0, 30.0])))
        writer.flush()
    assert "--db_append to resume" not in writer.finish("completed")["failure"]
    assert path.exists() == bool(replaced) and (not replaced or path.stat().st_size == 0)


def test_an_image_rejected_before_its_noise_map_has_null_noise_range_on_both_backends(db_settings):
    """Its rms_min and rms_max are NaN in the message; SQLite stored them as NULL, PostgreSQL as NaN."""
    from trap_dask.quality import ImageStats

    writer = _writer_on(db_settings)
    rejected = replace(_image(1, [150.0], [30.0]), stats=ImageStats(0.5), rejection="rms too high")
    assert writer.associate(rejected).rejected
    writer.finish("completed")
    engine = make_engine(db_settings)
    with engine.connect() as conn:
        row = conn.execute(select(schema.images.c.rms, schema.images.c.rms_min, schema.images.c.rms_max)).one()
    engine.dispose()
    assert tuple(row) == (0.5, None, None)


def test_a_writer_that_cannot_load_the_catalogue_records_its_run_failed_and_says_to_resume(db_settings, monkeypatch):
    """An append whose writer fails reading the database (after recording its run) leaves that run
    'failed' with its end, not 'running' for the next append to call 'killed'."""
    from trap_dask.db.backends import DatabaseError

    writer = _writer_on(db_settings)
    _commit(writer, writer.associate(_image(1, [150.0, 150.2], [30.0, 30.0])))
    writer.finish("completed")

    def refuse(store):
        raise DatabaseError(f"{db_settings.describe()}: database is locked")

    monkeypatch.setattr(ExportStore, "load_state", refuse)
    with pytest.raises(DatabaseError, match=r": database is locked; run the same command with --db_append to resume$"):
        Writer(db_settings, _config(db_settings), None, append=True)
    engine = make_engine(db_settings)
    with engine.connect() as conn:
        runs = conn.execute(select(schema.runs.c.status, schema.runs.c.finished_at).order_by(schema.runs.c.id)).all()
    engine.dispose()
    assert [status for status, _ in runs] == ["completed", "failed"] and runs[1][1] is not None


def _take_over(settings: DatabaseSettings, outcome: dict) -> None:
    """A successor's takeover (as pipeline._restart_writer starts): the lost writer's run marked
    'killed'; the images the database holds of it in ``outcome["images"]``."""
    store = ExportStore.open(settings)
    try:
        outcome["images"] = store.close_stale_runs()
    finally:
        store.close()


def _stopping_in_transaction(monkeypatch, seconds: float) -> tuple[threading.Event, threading.Event]:
    """Writers' transactions stop once they hold their run's row: (holding, go_on). ``holding`` is
    set then; each goes on when ``go_on`` is set, or after ``seconds``."""
    holding, go_on = threading.Event(), threading.Event()
    real = ExportStore._count_in_runs

    def count_then_stop(self, conn, images):
        real(self, conn, images)
        holding.set()
        go_on.wait(seconds)  # the transaction stays open, holding the run's row

    monkeypatch.setattr(ExportStore, "_count_in_runs", count_then_stop)
    return holding, go_on


@pytest.mark.parametrize("first", ["old writer", "takeover"])
def test_a_takeover_and_a_lingering_writers_transaction_exclude_each_other(db_settings, monkeypatch, first):
    """The lost writer's transaction and its successor's takeover (close_stale_runs), at once: the
    one that takes the run's row first goes through and the other waits for it. Old writer first:
    its batch is written and counted in the images the takeover returns. Takeover first: the batch
    is refused. Either way the count returned is what the database holds."""
    from trap_dask.db.backends import DatabaseError

    writer = _writer_on(db_settings, stage_every_image=True)
    _commit(writer, writer.associate(_image(1, [150.0, 150.2], [30.0, 30.0])))  # staged
    outcome: dict = {}
    if first == "old writer":
        holding, go_on = _stopping_in_transaction(monkeypatch, 10)
        flushing = threading.Thread(target=writer.flush)
        flushing.start()
        assert holding.wait(10)
        taking = threading.Thread(target=_take_over, args=(db_settings, outcome))
        taking.start()
        time.sleep(0.5)
        assert taking.is_alive()  # it waits for the old writer's transaction
        go_on.set()
        flushing.join(10)
        taking.join(10)
        assert outcome["images"] == 1 and _count(db_settings, schema.images) == 1
    else:
        _take_over(db_settings, outcome)
        with pytest.raises(DatabaseError, match="taken over"):
            writer.flush()
        assert outcome["images"] == 0 and _count(db_settings, schema.images) == 0
    writer.finish("completed")


@pytest.mark.postgres
def test_a_stopped_writers_transaction_does_not_hold_off_its_successor(monkeypatch):
    """PostgreSQL: a writer stopped inside its transaction (as a suspended process, or one whose
    network is cut, holds it) keeps the run's row only until the server ends its idle session
    (postgresql.IDLE_IN_TRANSACTION_S; a lost connection once its keepalive probes go unanswered);
    its successor's takeover then goes through, and the stopped writer's batch is rolled back and
    refused."""
    from conftest import postgres_settings

    from trap_dask.db import postgresql
    from trap_dask.db.backends import DatabaseError, drop_database

    monkeypatch.setattr(postgresql, "IDLE_IN_TRANSACTION_S", 1)
    settings = postgres_settings(f"trap_dask_test_{os.getpid()}_stopped")
    writer = _writer_on(settings, stage_every_image=True)
    try:
        _commit(writer, writer.associate(_image(1, [150.0, 150.2], [30.0, 30.0])))  # staged
        outcome: dict = {}
        holding, go_on = _stopping_in_transaction(monkeypatch, 30)
        flushing = threading.Thread(target=lambda: outcome.setdefault("flush", _raised(writer.flush)))
        flushing.start()
        assert holding.wait(10)
        taking = threading.Thread(target=_take_over, args=(settings, outcome))
        started = time.monotonic()
        taking.start()
        taking.join(15)
        assert not taking.is_alive() and time.monotonic() - started < 10  # not the two hours of Linux's keepalive
        assert outcome["images"] == 0 and _count(settings, schema.images) == 0
        go_on.set()
        flushing.join(10)
        assert isinstance(outcome["flush"], DatabaseError)
        with make_engine(settings).connect() as conn:  # the stopped writer's run, marked by its successor
            assert conn.execute(select(schema.runs.c.status, schema.runs.c.n_images)).all() == [("killed", 0)]
    finally:
        writer.finish("completed")
        drop_database(settings)


def _raised(call) -> BaseException | None:
    """The exception ``call()`` raises, or None."""
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - handed to the test to check
        return exc
    return None


def test_a_writer_staging_every_image_writes_them_in_batches(tmp_path, monkeypatch):
    """What a run's writer does (stage_every_image): images staged while it keeps up are written
    MAX_STAGED_KEEPING_UP at a time, and wait on when the client finds the writer idle, unless one
    was staged behind or the oldest has waited MAX_BATCH_SECONDS; the tables end as with a
    transaction per image."""
    sky = [_image(i, [150.0, 150.2], [30.0, 30.0]) for i in range(1, 8)]
    writer, settings = _writer(tmp_path, stage_every_image=True)
    keeping_up = [_commit(writer, writer.associate(image)) for image in sky[:3]]
    assert all(s.staged for s in keeping_up) and writer.flush(idle=True) == 0
    assert _count(settings, schema.images) == 0
    fourth = _commit(writer, writer.associate(sky[3]))  # hands the four to the committer thread
    assert fourth.staged and fourth.written_through == -1 and writer_module.MAX_STAGED_KEEPING_UP == 4
    assert writer.flush(idle=True) == 0 and _count(settings, schema.images) == 4  # flush waits for them
    behind = _commit(writer, writer.associate(replace(sky[4], done_at=1.0)))  # done before the writer was idle
    assert behind.staged and behind.written_through == 3
    assert writer.flush(idle=True) == 1 and _count(settings, schema.images) == 5
    _commit(writer, writer.associate(sky[5]))
    assert writer.flush(idle=True) == 0
    monkeypatch.setattr(writer_module, "MAX_BATCH_SECONDS", 0.0)  # the oldest staged image has waited
    assert writer.flush(idle=True) == 1 and _count(settings, schema.images) == 6
    _commit(writer, writer.associate(sky[6]))
    assert writer.finish("completed")["n_batches"] == 1 and _count(settings, schema.images) == 7

    alone, alone_settings = _writer(tmp_path, "alone.db")
    for i, image in enumerate(sky):
        summary = _commit(alone, alone.associate(image))
        assert not summary.staged and summary.written_through == summary.im_id == i
    alone.finish("completed")
    staged_rows, alone_rows = _tables(settings, alone_settings)
    assert staged_rows == alone_rows


def test_the_writers_entry_points_run_one_at_a_time():
    """Two threads calling entry points (as a task in place and the actor's thread may) never
    overlap, and an entry point may call another (Writer.commit calls flush)."""
    import threading
    import time

    from trap_dask.writer import _one_at_a_time

    class Guarded:
        def __init__(self):
            self._lock, self.inside, self.overlaps = threading.RLock(), 0, 0
            self._entered, self.stage_cpu = None, 0.0  # what the decorator times the CPU with

        @_one_at_a_time
        def outer(self):
            return self.inner()

        @_one_at_a_time
        def inner(self):
            self.inside += 1
            self.overlaps += self.inside > 1
            time.sleep(0.002)
            self.inside -= 1
            return True

    guarded = Guarded()
    threads = [threading.Thread(target=lambda: [guarded.outer() for _ in range(20)]) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert guarded.overlaps == 0 and guarded.outer()


def test_a_failed_transaction_in_the_committer_thread_returns_the_writer_to_the_last_written_image(
        tmp_path, monkeypatch):
    """A batch that fails while the writer goes on associating raises at the writer's next wait, and
    leaves the database and the writer at the image before the batch, which then takes no later
    image: a writer resuming the run from there ends with the tables of a writer that never failed."""
    from trap_dask.db.backends import DatabaseError

    monkeypatch.setattr(writer_module, "MAX_BATCH", 2)
    sky = [replace(_image(i, [150.0, 150.2], [30.0, 30.0]), done_at=1.0) for i in range(1, 7)]  # all behind
    writer, settings = _writer(tmp_path, commit_process=False)
    commit_image, failed = writer.store.commit_image, []

    def fails_once_at_the_third(row, **keywords):
        if row["id"] == 2 and not failed:
            failed.append(row["id"])
            raise DatabaseError("disk full")
        return commit_image(row, **keywords)

    monkeypatch.setattr(writer.store, "commit_image", fails_once_at_the_third)
    # the first image is written alone (the writer was idle before it), then two at a time: the second
    # and third are in flight together while the fourth is associated
    summaries = [_commit(writer, writer.associate(image)) for image in sky[:4]]
    assert [(s.im_id, s.staged, s.written_through) for s in summaries] == [
        (0, False, 0), (1, True, 0), (2, True, 0), (3, True, 0)]
    with pytest.raises(DatabaseError, match="disk full"):
        writer.flush()
    assert failed == [2] and _count(settings, schema.images) == 1
    assert writer.next_im_id == writer.n_committed == 1 and writer.written_through == 0
    with pytest.raises(DatabaseError, match="--db_append"):
        writer.associate(sky[4])
    assert "disk full" in writer.finish("completed")["failure"]
    resumed = Writer(settings, _config(settings), None, append=True, resume=True)
    assert [_commit(resumed, resumed.associate(image)).im_id for image in sky[1:]] == [1, 2, 3, 4, 5]
    resumed.finish("completed")

    alone, alone_settings = _writer(tmp_path, "alone.db")
    for image in sky:
        _commit(alone, alone.associate(image))
    alone.finish("completed")
    recovered, unbroken = _tables(settings, alone_settings)
    assert _runless(recovered) == _runless(unbroken)


def _runless(tables: dict) -> dict:
    """``tables`` without the images' run column (the images of a resumed run name it)."""
    run = [c.name for c in schema.images.c].index("run")
    return {**tables, "images": [row[:run] + row[run + 1:] for row in tables["images"]]}


def _behind(n: int) -> list:
    """``n`` images of two sources, each ready before the writer took it."""
    return [replace(_image(i, [150.0, 150.2 + 1e-5 * i], [30.0, 30.0]), done_at=1.0) for i in range(1, n + 1)]


def _tables_in_thread(settings: DatabaseSettings, sky: list) -> dict:
    """The tables of a writer that commits in its own process, fed ``sky`` into a database beside
    ``settings``' (dropped after)."""
    from trap_dask.db.backends import drop_database

    beside = replace(settings, name=settings.name.replace("export", "export_alone") + "_alone")
    try:
        writer = _writer_on(beside, commit_process=False)
        for image in sky:
            _commit(writer, writer.associate(image))
        writer.finish("completed")
        assert writer._process is None
        return _tables(beside)[0]
    finally:
        drop_database(beside)


def test_a_writer_that_falls_behind_commits_in_a_process_of_its_own(db_settings, monkeypatch):
    """After a whole batch of images that were ready before the writer took them, the writer starts
    its committer process; once it is up, it writes the batches, and the tables are those of a writer
    that commits in its own process."""
    monkeypatch.setattr(writer_module, "MAX_BATCH", 2)
    sky = _behind(9)
    writer = _writer_on(db_settings)
    for image in sky[:2]:  # the first is written alone (the writer was idle), the second is staged
        _commit(writer, writer.associate(image))
    assert writer._process is None
    _commit(writer, writer.associate(sky[2]))  # a whole batch, behind: the process starts
    writer.flush()  # (the committer thread is the process's one caller)
    assert writer._process is not None and writer._process.ready(wait=True)
    assert writer._process.pid != os.getpid()
    for image in sky[3:]:
        _commit(writer, writer.associate(image))
    assert writer.flush() == 0 and writer._process.batches >= 3  # (3, 4) (5, 6) (7, 8)
    process = writer._process._process
    writer.finish("completed")
    assert process.poll() == 0  # the run's end stops it

    assert _tables(db_settings) == [_tables_in_thread(db_settings, sky)]


#: SQL that makes each backend refuse image 4, and SQL that lifts the refusal.
_REFUSE = {
    "sqlite": (["CREATE TRIGGER refuse BEFORE INSERT ON images WHEN NEW.id = 4 "
                "BEGIN SELECT RAISE(ABORT, 'no room for image 4'); END"],
               ["DROP TRIGGER refuse"]),
    "postgres": (["CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.id = 4 THEN "
                  "RAISE EXCEPTION 'no room for image 4'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
                  "CREATE TRIGGER refuse BEFORE INSERT ON images FOR EACH ROW EXECUTE FUNCTION refuse()"],
                 ["DROP TRIGGER refuse ON images", "DROP FUNCTION refuse()"]),
}


def test_a_committer_process_that_cannot_start_leaves_the_writer_committing_in_its_thread(
        tmp_path, monkeypatch):
    """No process to be had (out of process slots or memory): the writer says so and writes every
    image itself."""
    import subprocess

    def no_process(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(writer_module, "MAX_BATCH", 2)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    sky = _behind(6)
    writer, settings = _writer(tmp_path)
    for image in sky:
        _commit(writer, writer.associate(image))
    assert writer._process is None and not writer.commit_process
    assert writer.finish("completed")["n_process_batches"] == 0
    assert _count(settings, schema.images) == 6


def test_a_batch_that_fails_in_the_committer_process_returns_the_writer_to_the_last_written_image(
        db_settings, monkeypatch):
    """The database refuses the fifth image (a trigger): the error reaches the writer at its next
    wait, the database and the writer are at the image before that batch, and the writer takes no
    later image (tasks already under way would feed it the images after the failed ones: a gap);
    its run is recorded as failed. Once the database takes images again, a writer resuming the run
    from there ends with the tables of a writer that never failed."""
    from trap_dask.db.backends import DatabaseError

    monkeypatch.setattr(writer_module, "MAX_BATCH", 2)
    sky = _behind(7)
    writer = _writer_on(db_settings)
    refuse, allow = _REFUSE[db_settings.backend]
    engine = make_engine(db_settings)
    with engine.begin() as conn:
        for statement in refuse:
            conn.exec_driver_sql(statement)
    for image in sky[:3]:
        _commit(writer, writer.associate(image))
    writer.flush()
    assert writer._process.ready(wait=True)
    failed_there = []
    write = committer.CommitterProcess.write

    def spied(process, images):
        try:
            return write(process, images)
        except DatabaseError:
            failed_there.append([row["id"] for row, _ in images])
            raise

    monkeypatch.setattr(committer.CommitterProcess, "write", spied)
    _commit(writer, writer.associate(sky[3]))
    _commit(writer, writer.associate(sky[4]))  # (3, 4) go to the process, which fails them
    with pytest.raises(DatabaseError, match="no room for image 4"):
        writer.flush()
    assert failed_there == [[3, 4]]
    assert _count(db_settings, schema.images) == 3
    assert writer.next_im_id == writer.n_committed == 3 and writer.written_through == 2
    with pytest.raises(DatabaseError, match="--db_append"):
        writer.associate(sky[5])
    assert "no room for image 4" in writer.finish("completed")["failure"]
    with engine.begin() as conn:
        assert conn.execute(select(schema.runs.c.status)).scalars().all() == ["failed"]
        for statement in allow:
            conn.exec_driver_sql(statement)
    engine.dispose()
    resumed = Writer(db_settings, _config(db_settings), None, append=True, resume=True)
    assert [_commit(resumed, resumed.associate(image)).im_id for image in sky[3:]] == [3, 4, 5, 6]
    resumed.finish("completed")
    assert _runless(_tables(db_settings)[0]) == _runless(_tables_in_thread(db_settings, sky))


def _first_batch(tmp_path, monkeypatch) -> list:
    """The first image of a writer, as its committer hands it over (a batch of one)."""
    batches = []

    def write_batch(store, images):
        batches.append(images)
        return committer.write_batch(store, images)

    monkeypatch.setattr(writer_module, "write_batch", write_batch)
    writer, _ = _writer(tmp_path, "source.db", commit_process=False)
    _commit(writer, writer.associate(_behind(1)[0]))
    writer.finish("completed")
    return batches[0]


def test_the_committer_process_commits_nothing_once_the_writers_process_has_gone(tmp_path, monkeypatch):
    """A batch whose writer died while it was being written (kill -9 of the writer's worker) rolls
    back: the database stays at the image before it, as with a thread that died with the writer."""
    batch = _first_batch(tmp_path, monkeypatch)
    _, settings = _writer(tmp_path)
    ours, theirs = (Connection(s.detach()) for s in socket.socketpair())
    server = threading.Thread(target=committer.serve, args=(theirs,))
    server.start()
    ours.send(settings)
    assert ours.recv()[0] == "ready"
    monkeypatch.setattr(os, "getppid", lambda: 1)  # as after the writer's process died: adopted by init
    ours.send(batch)
    kind, (error, _) = ours.recv()
    assert kind == "error" and isinstance(error, committer.Orphaned)
    assert _count(settings, schema.images) == 0 and _count(settings, schema.extracted_sources) == 0
    ours.close()  # the writer's end closes with its process: the committer ends
    server.join(10)
    assert not server.is_alive()


def test_the_committer_process_leaves_ctrl_c_and_sigterm_to_its_writer(tmp_path, monkeypatch):
    """Ctrl-C and a batch system's SIGTERM reach every process of a run: the committer process lets
    them pass and still writes the batch the writer then hands it (the images the writer associated
    before it stops)."""
    import signal

    batch = _first_batch(tmp_path, monkeypatch)
    _, settings = _writer(tmp_path)
    process = committer.CommitterProcess(settings)
    assert process.ready(wait=True)
    for number in (signal.SIGINT, signal.SIGTERM):
        os.kill(process.pid, number)
    time.sleep(0.2)
    assert process._process.poll() is None
    process.write(batch)
    process.close()
    assert process._process.returncode == 0 and _count(settings, schema.images) == 1


def test_a_committer_process_that_dies_is_a_clear_error_and_loses_nothing_committed(tmp_path, monkeypatch):
    """The process killed under the writer (the kernel's OOM killer): handing it a batch raises a
    DatabaseError that says so, and the database keeps what it held."""
    import signal

    from trap_dask.db.backends import DatabaseError

    batch = _first_batch(tmp_path, monkeypatch)
    _, settings = _writer(tmp_path)
    process = committer.CommitterProcess(settings)
    assert process.ready(wait=True)
    seconds, cpu = process.write(batch)
    assert 0 < cpu and 0 < seconds and process.batches == 1 and _count(settings, schema.images) == 1
    os.kill(process.pid, signal.SIGKILL)
    process._process.wait(30)
    with pytest.raises(DatabaseError, match=r"committer process ended \(exit code -9\) before its batch"):
        process.write(batch)
    assert not process.ready() and process.batches == 1 and _count(settings, schema.images) == 1
    process.close()


def test_the_committer_process_ends_when_its_writer_does(tmp_path):
    """A committer process whose writer's end of the socket closed without a word (its process was
    killed) ends of itself."""
    _, settings = _writer(tmp_path)
    process = committer.CommitterProcess(settings)
    assert process.ready(wait=True) and process.pid != os.getpid()
    process._conn.close()
    assert process._process.wait(30) == 0


def test_a_writer_in_a_dask_worker_process_commits_in_a_process_of_its_own(tmp_path):
    """A writer actor on a worker process (as on a cluster) that falls behind starts its committer
    process from there, and every image reaches the database."""
    from distributed import Client, LocalCluster

    settings = DatabaseSettings(backend="sqlite", name=str(tmp_path / "w.db"))
    ExportStore.create(settings, overwrite=False).close()
    config = build_config(dict(db_name=settings.name), {}, None)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        writer = client.submit(Writer, settings, config, None, actor=True).result()
        n, deadline = 0, time.monotonic() + 60.0
        while writer.process_batches == 0 and time.monotonic() < deadline:  # fed behind until the process is up
            for image in _behind(n + writer_module.MAX_BATCH)[n:]:
                _commit_actor(writer, image)
            n += writer_module.MAX_BATCH
        finished = writer.finish("completed").result()
    assert finished["n_process_batches"] >= 1
    assert finished["n_images"] == n and _count(settings, schema.images) == n


def _commit_actor(writer, image) -> None:
    request = writer.associate(image).result()
    writer.commit(ForcedMeasurements(_forced(request.ra, request.dec),
                                     backfill=_forced(request.backfill_ra, request.backfill_dec))).result()


def test_a_merge_reads_back_the_measurements_that_earlier_relabellings_leave_under_its_sources():
    """Of the measurements staged merges relabelled, a merge of sources 7 and 9 needs those whose
    last relabelling put them under 7 or 9: not 11 (moved to 7, then on to 8), but 12 (to 8, then 7)."""
    import numpy as np

    relabels = [{"id": np.array([10, 11, 12]), "src_id": np.array([7, 7, 8])},
                {"id": np.array([11, 12, 13]), "src_id": np.array([8, 7, 9])}]
    assert sorted(writer_module._moved_into(relabels, np.array([7, 9])).tolist()) == [10, 12, 13]
    assert writer_module._moved_into([], np.array([7])).tolist() == []


def test_a_batch_written_by_a_committer_that_died_before_answering_is_counted_in_runs(tmp_path, monkeypatch):
    """The committer wrote the batch and died before saying so: the writer takes it as failed and
    stops, but the run's n_images, counted in each transaction, still says what the database holds."""
    from trap_dask.db.backends import DatabaseError

    real = writer_module.write_batch

    def wrote_then_died(store, images):
        seconds = real(store, images)
        if any(row["id"] == 2 for row, _ in images):
            raise DatabaseError("the committer process ended (exit code -9) before its batch was written")
        return seconds

    monkeypatch.setattr(writer_module, "MAX_BATCH", 2)
    monkeypatch.setattr(writer_module, "write_batch", wrote_then_died)
    writer, settings = _writer(tmp_path, commit_process=False)
    for image in _behind(4):
        _commit(writer, writer.associate(image))
    assert "before its batch was written" in writer.finish("completed")["failure"]
    engine = make_engine(settings)
    with engine.connect() as conn:
        held = conn.execute(select(func.count()).select_from(schema.images)).scalar()
        assert conn.execute(select(schema.runs.c.status, schema.runs.c.n_images)).one() == ("failed", held)
    engine.dispose()
    assert held > writer.n_committed


def test_a_fault_of_the_code_in_a_transaction_keeps_its_type_and_stops_the_writer(tmp_path, monkeypatch):
    """Not every failure is the database's: a bug raises as itself (its traceback for the user), and
    the writer still takes no later image."""
    from trap_dask.db.backends import DatabaseError

    def broken(store, images):
        raise KeyError("sources")

    monkeypatch.setattr(writer_module, "write_batch", broken)
    writer, _ = _writer(tmp_path, commit_process=False)
    sky = _behind(2)
    with pytest.raises(KeyError):  # the first image is written at once (the writer was idle)
        _commit(writer, writer.associate(sky[0]))
    with pytest.raises(DatabaseError, match="KeyError"):
        writer.associate(sky[1])
    assert "KeyError" in writer.finish("failed")["failure"]


def test_a_run_end_the_database_refuses_still_closes_the_store(tmp_path, monkeypatch):
    from trap_dask.db.backends import DatabaseError

    def refused(*args):
        raise DatabaseError("server gone")

    writer, _ = _writer(tmp_path)
    closed = []
    monkeypatch.setattr(writer.store, "finish_run", refused)
    monkeypatch.setattr(writer.store, "close", lambda: closed.append(True))
    with pytest.raises(DatabaseError, match="server gone"):
        writer.finish("completed")
    assert closed == [True]


USER_ERRORS = {"ew_sys_err": "10", "ns_sys_err": "10"}


@pytest.mark.parametrize("values, given", [(USER_ERRORS, True), ({**USER_ERRORS, "remove_image_shift": False}, False),
                                           ({}, False)])
def test_the_data_s_errors_reach_the_association_only_beside_the_user_s_and_a_shift_taken_out(
        tmp_path, values, given):
    """ImageContext.data_sys_err (the scatter about the image's shift, see RunningCatalogue._data_reach)
    is set where the user's errors are and the image's shift was taken out: with the shift left in
    (--no-remove_image_shift), a pair shifted together lies beyond the reach of that scatter."""
    settings = DatabaseSettings(backend="sqlite", name=str(tmp_path / "d.db"))
    ExportStore.create(settings, overwrite=False).close()
    writer = Writer(settings, build_config(dict(db_name=settings.name, **values), {}, None), None)
    ra = list(150.0 + np.arange(8) * 0.05)
    for i in range(3):  # 8 isolated bright sources measure each image's shift from the second on
        shifted = [x + (2 * i) / 3600.0 for x in ra]
        request = writer.associate(_image(i, shifted, [30.0] * 8))
        data = writer._pending[0].image.data_sys_err
        _commit(writer, request)
    writer.finish("completed")
    assert (data is not None) == given
