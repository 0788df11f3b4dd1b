"""PostgreSQL as a first-class backend: same results as SQLite, and the password kept secret."""

from __future__ import annotations

import math
import uuid

import pytest
from _runs import dump, run
from conftest import postgres_settings
from sqlalchemy import func, select, text

from trap_dask.db import schema
from trap_dask.db.backends import DatabaseSettings, drop_database, make_engine
from trap_dask.db.store import ExportStore
from trap_dask.simulate import SurveySpec, load_truth, simulate_survey

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SPEC = SurveySpec(n_epochs=5, shape=(256, 256), n_steady=10, n_variable=3, n_transient=2, n_resolved=1,
                  n_pairs=1, min_separation=4.0, seed=5)


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    truth = load_truth(simulate_survey(tmp_path_factory.mktemp("pg_survey"), SPEC))
    return [image["path"] for image in truth["images"]]


@pytest.fixture
def pg():
    settings = postgres_settings(f"trap_dask_test_{uuid.uuid4().hex[:12]}")
    yield settings
    drop_database(settings)


def same(a, b) -> bool:
    """Equal values, NaN equal to NaN, floats to 1e-12 relative."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def test_sqlite_and_postgres_hold_the_same_tables(survey, pg, tmp_path):
    lite = DatabaseSettings(backend="sqlite", name=str(tmp_path / "same.db"))
    run(lite, survey)
    run(pg, survey)
    a, b = dump(lite), dump(pg)
    for name in a:
        assert len(a[name]) == len(b[name]) > 0 or name == "newsource", name
        for row_a, row_b in zip(a[name], b[name]):
            assert all(same(x, y) for x, y in zip(row_a, row_b)), (name, row_a, row_b)


def test_password_never_reaches_the_database_or_the_log(survey, pg, tmp_path):
    secret = "Pa55-" + uuid.uuid4().hex  # trust auth accepts any password
    run(pg, survey[:2], db_password=secret, log_dir=str(tmp_path / "logs"))
    log = (tmp_path / "logs" / "trap-dask.log").read_text()
    assert "PostgreSQL database" in log and secret not in log
    engine = make_engine(pg)
    with engine.connect() as conn:
        for table in schema.metadata.sorted_tables:
            rows = conn.execute(select(table)).all()
            assert secret not in repr(rows), table.name
    engine.dispose()
    engine = make_engine(pg)
    with engine.connect() as conn:
        assert "db_password" not in conn.execute(select(schema.config.c.key)).scalars().all()
    engine.dispose()




def test_a_server_that_never_answers_is_given_up_on(monkeypatch):
    """An address that takes the connection and never answers held a run at its start forever
    (no signal stopped it while libpq waited); now it is a one-line error after CONNECT_TIMEOUT_S."""
    import socket
    import time

    from trap_dask.db import postgresql
    from trap_dask.db.backends import DatabaseError, database_exists

    monkeypatch.setattr(postgresql, "CONNECT_TIMEOUT_S", 2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        settings = DatabaseSettings("postgres", "never", host="127.0.0.1", port=silent.getsockname()[1], user="x")
        started = time.monotonic()
        with pytest.raises(DatabaseError, match="cannot connect"):
            database_exists(settings)
        assert time.monotonic() - started < 10


def test_the_printed_address_names_the_same_database(pg):
    """The address a run prints for the results commands is percent-encoded: a name holding '?',
    '#' or '%' named another database (the one up to the '?')."""
    from sqlalchemy import make_url

    odd = DatabaseSettings("postgres", "a?b#c%41 d", host=pg.host, port=pg.port, user=pg.user)
    assert make_url(odd.impl.address()).database == "a?b#c%41 d"

def test_a_results_command_never_shows_the_password_of_its_url(pg, capsys):
    """A results command given a URL with a password (here of a database that does not exist, and
    of one that is not an export database) names the database in its error without the password."""
    from trap_dask.cli import main
    from trap_dask.db.backends import create_database

    secret = "Pa55-" + uuid.uuid4().hex
    url = f"postgresql://{pg.user}:{secret}@{pg.host}:{pg.port}/{pg.name}"
    assert main(["candidates", url]) == 1
    create_database(pg)
    assert main(["etav", url, "-o", "never.png"]) == 1
    err = capsys.readouterr().err
    assert secret not in err and err.count(f"{pg.user}:***@") == 2 and "not a trap-dask export database" in err

def test_positions_keep_double_precision_and_booleans_are_booleans(survey, pg):
    run(pg, survey[:1])
    engine = make_engine(pg)
    with engine.connect() as conn:
        types = dict(conn.exec_driver_sql(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'extracted_sources'"
        ).all())
    engine.dispose()
    assert types["ra"] == types["dec"] == "double precision"
    assert types["is_force_fit"] == types["is_duplicate"] == types["gaussian_fit"] == "boolean"


def cli(survey_path: str, *flags: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "trap_dask.cli", "run", "-i", survey_path, "--db-backend", "postgres",
                           "--scheduler", "threads", *flags], capture_output=True, text=True)


def test_unreachable_server_is_one_clear_line(survey):
    postgres_settings("postgres")
    result = cli(survey[0], "--db-name", "x", "--db-host", "127.0.0.1", "--db-port", "1",
                 "--db-password", "NotInTheMessage")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("trap-dask: error: cannot connect to PostgreSQL database 'x' on 127.0.0.1:1")
    assert "NotInTheMessage" not in result.stderr and "Traceback" not in result.stderr


def test_missing_create_privilege_is_a_clear_error_and_creates_nothing(survey, pg):
    admin = make_engine(postgres_settings("postgres"), isolation_level="AUTOCOMMIT")
    role = f"trap_dask_nopriv_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN NOCREATEDB')
    try:
        result = cli(survey[0], "--db-name", pg.name, "--db-host", pg.host, "--db-port", str(pg.port),
                     "--db-user", role)
        assert result.returncode == 1
        assert "permission denied to create database" in result.stderr.strip().splitlines()[-1]
        with admin.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM pg_database WHERE datname = %s", (pg.name,)).scalar() == 0
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP ROLE "{role}"')
        admin.dispose()


#: Database names that break naive quoting or the driver's %-parameters.
HOSTILE_NAMES = ['a%b', '%(x)s', '%s%%', 'a"b', "a'b", 'a b;c', 'ü/?@:x', 'a\\b', '{0}']


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_any_database_name_can_be_created_used_and_dropped(name):
    from trap_dask.db.backends import create_database, database_exists
    from trap_dask.db.lock import RunLock

    settings = postgres_settings(f"trap_dask_test_{uuid.uuid4().hex[:6]}_{name}")
    create_database(settings)
    try:
        assert database_exists(settings)
        with RunLock(settings):
            engine = make_engine(settings)
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT current_database()").scalar() == settings.name
            engine.dispose()
    finally:
        drop_database(settings)
    assert not database_exists(settings)


def test_a_run_into_a_database_named_with_percent(survey):
    settings = postgres_settings(f"trap_dask_test_{uuid.uuid4().hex[:6]}_50%_done")
    try:
        assert run(settings, survey[:2]).n_images == 2
        assert run(settings, survey[:3], db_append=True).n_images == 1
        assert len(dump(settings)["images"]) == 3
    finally:
        drop_database(settings)


def test_tables_every_image_updates_keep_room_for_their_updates(pg):
    """On PostgreSQL the tables of schema.STORAGE are made with fillfactor 50 (their updates stay on
    the page), given to them where a PostgreSQL database is made: a SQLite run never loads
    SQLAlchemy's PostgreSQL dialect (20 ms of its start-up)."""
    import subprocess
    import sys

    ExportStore.create(pg, overwrite=True).close()
    engine = make_engine(pg)
    with engine.connect() as conn:
        options = dict(conn.execute(text("SELECT relname, reloptions FROM pg_class WHERE relname = ANY(:names)"),
                                    {"names": list(schema.STORAGE)}).all())
    engine.dispose()
    assert options == {name: ["fillfactor=50"] for name in schema.STORAGE}
    code = ("import sys; from trap_dask.cli import main; import trap_dask.pipeline, trap_dask.writer, "
            "trap_dask.db.store; print('sqlalchemy.dialects.postgresql' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_binary_copy_round_trips_every_column_type_and_null(pg):
    """What ``pgcopy`` streams reads back as it was given: NaN, None and NaT as NULL, texts of any
    length (non-ASCII, empty, all NULL), big integers, booleans and microsecond timestamps."""
    from datetime import datetime

    import numpy as np
    from sqlalchemy import BigInteger, Boolean, Column, DateTime, Float, Integer, MetaData, String, Table

    from trap_dask.db.pgcopy import copy_insert

    table = Table("copied", MetaData(), Column("n", Integer, primary_key=True), Column("big", BigInteger),
                  Column("count", Integer), Column("flux", Float), Column("flag", Boolean), Column("at", DateTime),
                  Column("at_object", DateTime), Column("name", String), Column("blank", String))
    names = ["ü" * 7, "", None, "a"]
    columns = {
        "n": np.arange(4), "big": np.array([2**40, -(2**40), 0, 1]), "count": np.array([1.0, np.nan, 3.0, 4.0]),
        "flux": np.array([0.1, np.nan, -1e-300, 1e300]), "flag": np.array([True, False, None, True], dtype=object),
        "at": np.array(["2020-01-01T00:00:00.000001", "NaT", "1999-12-31T23:59:59", "2040-02-29"],
                       dtype="datetime64[us]"),
        "at_object": np.array([None, datetime(2021, 5, 6, 7, 8, 9, 10), None, datetime(2000, 1, 1)], dtype=object),
        "name": np.array(names, dtype=object), "blank": np.array([None] * 4, dtype=object),
    }
    ExportStore.create(pg, overwrite=True).close()
    engine = make_engine(pg)
    with engine.begin() as conn:
        table.create(conn)
        copy_insert(conn, table, columns)
        rows = conn.execute(select(table).order_by(table.c.n)).all()
    engine.dispose()
    assert [tuple(row) for row in rows] == [
        (0, 2**40, 1, 0.1, True, datetime(2020, 1, 1, 0, 0, 0, 1), None, "ü" * 7, None),
        (1, -(2**40), None, None, False, None, datetime(2021, 5, 6, 7, 8, 9, 10), "", None),
        (2, 0, 3, -1e-300, None, datetime(1999, 12, 31, 23, 59, 59), None, None, None),
        (3, 1, 4, 1e300, True, datetime(2040, 2, 29), datetime(2000, 1, 1), "a", None),
    ]


def test_every_session_probes_for_a_lost_peer(pg):
    """The export database's sessions and the run lock's (in the server's maintenance database) ask
    the server to probe a silent client, to give up on unacknowledged data and to end a transaction
    left idle, and the driver does the same towards the server: a lost writer's locks do not outlive
    it by Linux's two hours (trap_dask.db.postgresql)."""
    from trap_dask.db import postgresql
    from trap_dask.db.store import ExportStore

    ExportStore.create(pg, overwrite=False).close()
    expected = postgresql.server_settings(150000)
    assert postgresql.LOST_AFTER_S <= 300 and expected["tcp_user_timeout"] == str(1000 * postgresql.LOST_AFTER_S)
    assert postgresql.server_settings(110022) == {k: v for k, v in expected.items() if k != "tcp_user_timeout"}
    for engine in (make_engine(pg), pg.impl.server_engine()):
        with engine.connect() as conn:
            shown = dict(conn.execute(text("SELECT name, setting FROM pg_settings WHERE name = ANY(:names)"),
                                      {"names": list(expected)}).all())
            dsn = conn.connection.dbapi_connection.get_dsn_parameters()
        engine.dispose()
        assert shown == expected
        assert (dsn["keepalives"], dsn["keepalives_idle"], dsn["tcp_user_timeout"]) == (
            "1", str(postgresql.KEEPALIVE_IDLE_S), str(1000 * postgresql.LOST_AFTER_S))


def _end_session_of(lock) -> None:
    """End the server session holding ``lock`` (a RunLock), as the server does with a lost client's."""
    from sqlalchemy import create_engine

    pid = lock._lock._conn.connection.dbapi_connection.info.backend_pid
    engine = create_engine(lock.settings.url("postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    engine.dispose()


def test_a_run_takes_its_lock_again_after_the_server_ended_its_session(pg, monkeypatch):
    """An outage longer than the keepalives' bound ends the lock's session (the server frees the
    lock): the run's next check takes it again if it is free, and says it lost it if another run
    has taken it meanwhile."""
    from trap_dask.db import lock as lock_module
    from trap_dask.db.backends import DatabaseError
    from trap_dask.db.lock import DatabaseBusy, RunLock

    monkeypatch.setattr(lock_module, "CHECK_EVERY_S", 0.0)
    with RunLock(pg) as lock:
        lock.check()  # held: nothing to do
        _end_session_of(lock)
        lock.check()
        with pytest.raises(DatabaseBusy), RunLock(pg):  # held again
            pass
        _end_session_of(lock)
        with RunLock(pg), pytest.raises(DatabaseError, match="lost its lock .* another trap-dask run holds it"):
            lock.check()


def test_a_run_checks_its_lock_every_so_often(pg, monkeypatch):
    """Once per CHECK_EVERY_S, not per image: before then a lost session goes unnoticed."""
    from trap_dask.db import lock as lock_module
    from trap_dask.db.lock import LockLost, RunLock

    monkeypatch.setattr(lock_module, "CHECK_EVERY_S", 3600.0)
    with RunLock(pg) as lock:
        _end_session_of(lock)
        ended = lock._lock._conn
        lock.check()
        assert lock._lock._conn is ended  # not looked at
        monkeypatch.setattr(lock_module, "CHECK_EVERY_S", 0.0)
        lock.check()
        assert lock._lock._conn is not ended and lock._lock._conn.execute(text("SELECT 1")).scalar() == 1
    with pytest.raises(LockLost, match="it was released"):  # a check after the run's end: no AttributeError
        lock.check()


def test_a_run_whose_lock_connection_broke_takes_it_from_its_own_old_session(pg, monkeypatch):
    """Only the client's end broke (the server's session lives on, holding the lock): the run ends
    its own old session and takes the lock again, rather than saying another run holds it."""
    import os

    from trap_dask.db import lock as lock_module
    from trap_dask.db.lock import DatabaseBusy, RunLock

    monkeypatch.setattr(lock_module, "CHECK_EVERY_S", 0.0)
    with RunLock(pg) as lock:
        old_pid = lock._lock._pid
        fd = lock._lock._conn.connection.dbapi_connection.fileno()
        server_end = os.dup(fd)  # the socket stays open: the server keeps the session and its lock
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, fd)
        try:
            lock.check()
        finally:
            os.close(devnull)
            os.close(server_end)
        assert lock._lock._pid != old_pid
        with pytest.raises(DatabaseBusy), RunLock(pg):  # held again, by the run's new session
            pass


def test_a_run_that_lost_its_lock_to_another_run_stops_and_says_how_to_resume(survey, pg, monkeypatch):
    """The lock's session ended mid-run and another run took the lock: the run stops at its next
    check (no writer restart, no traceback), its committed images stay, its run is 'failed', and
    the message says how to resume."""
    from sqlalchemy import create_engine

    from trap_dask.db import lock as lock_module
    from trap_dask.db.lock import RunLock
    from trap_dask.pipeline import PipelineError

    monkeypatch.setattr(lock_module, "CHECK_EVERY_S", 0.0)
    real, calls, other = RunLock.check, [], create_engine(pg.url("postgres"), isolation_level="AUTOCOMMIT")

    def check_after_losing_it(self):
        calls.append(1)
        if len(calls) == 2:  # the lock's session ends, and another run takes the lock
            _end_session_of(self)
            other_conn = other.connect()
            assert other_conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"),
                                      {"key": f"trap-dask:{pg.name}"}).scalar()
            calls.append(other_conn)
        return real(self)

    monkeypatch.setattr(RunLock, "check", check_after_losing_it)
    try:
        with pytest.raises(PipelineError, match="lost its lock .*another trap-dask run holds it.*--db_append"):
            run(pg, survey)
    finally:
        other.dispose()
    engine = make_engine(pg)
    with engine.connect() as conn:
        status, n_images = conn.execute(select(schema.runs.c.status, schema.runs.c.n_images)).one()
        stored = conn.execute(select(func.count()).select_from(schema.images)).scalar()
    engine.dispose()
    assert status == "failed" and n_images == stored >= 2  # those in flight at the stop may be committed too


def test_a_takeover_waits_for_a_lost_writers_transaction_beyond_the_lock_wait(pg, monkeypatch):
    """A lost writer's open transaction holds its run's row until the server ends its session
    (LOST_AFTER_S, IDLE_IN_TRANSACTION_S: minutes); the successor's close_stale_runs waits for it,
    past the lock_timeout (LOCK_WAIT_S) that bounds every other wait."""
    import threading
    import time

    from trap_dask.config import Config
    from trap_dask.db import postgresql
    from trap_dask.db.store import ExportStore

    monkeypatch.setattr(postgresql, "LOCK_WAIT_S", 1)
    store = ExportStore.create(pg, overwrite=False)
    run = store.start_run(Config().exportable(), None)
    lost = make_engine(pg)
    conn = lost.connect()
    conn.execute(text("UPDATE runs SET n_images = 0 WHERE id = :id"), {"id": run})  # its row locked, uncommitted
    ended = threading.Timer(3.0, conn.close)  # the server ends the lost session (rolled back)
    ended.start()
    started = time.monotonic()
    assert store.close_stale_runs() == 0
    assert time.monotonic() - started >= 2.5
    ended.join()
    lost.dispose()
    store.close()
