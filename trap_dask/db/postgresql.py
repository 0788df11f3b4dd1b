"""The PostgreSQL backend: the export database lives on a server, written from any worker.

The database is created and dropped through the server's ``postgres`` maintenance database,
with its name quoted as an identifier (never interpolated). Rows go in with binary COPY
(:mod:`trap_dask.db.pgcopy`).

A writer whose machine or network is lost holds its session's locks (the run lock, and inside a
transaction the run's row) until the server ends the session. A server notices a silent client
only through TCP keepalives, which Linux first sends after two hours, so a restarted run was
refused ("being written by another run") or waited that long. Every session of ours therefore
asks the server to probe its connection after KEEPALIVE_IDLE_S of silence and to give up on data
the client leaves unacknowledged: a lost connection ends within LOST_AFTER_S. It also ends a
session that leaves a transaction idle for IDLE_IN_TRANSACTION_S (a writer alive but stopped,
e.g. suspended). The driver does the same towards the server, so a run whose server is lost
fails instead of waiting. A writer never leaves a transaction idle: it writes each batch in one
go. The price: a network outage longer than LOST_AFTER_S ends the sessions at both ends, so the
run stops (resumable) at its next transaction; pooled connections are tested before use
(``pool_pre_ping``), so one ended while idle is replaced, and a run takes its lock again if it is
still free (:meth:`AdvisoryLock.check`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from urllib.parse import quote

import numpy as np
from sqlalchemy import Connection, Engine, Table, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from trap_dask.db import schema
from trap_dask.db.backends import LOCK_WAIT_S, Backend, Columns, DatabaseError, cannot_connect, driver_reason
from trap_dask.db.lock import DatabaseBusy, Lock
from trap_dask.db.pgcopy import array_update, copy_insert, copy_upsert

log = logging.getLogger(__name__)

#: Seconds of silence on a connection before the first TCP keepalive probe (server and driver) ...
KEEPALIVE_IDLE_S = 60
#: ... seconds between probes, and unanswered probes after which the connection counts as lost.
KEEPALIVE_INTERVAL_S = 15
KEEPALIVE_COUNT = 8
#: Seconds after which a silent peer's connection is ended: the keepalives' bound, and the longest
#: that sent data may stay unacknowledged (TCP_USER_TIMEOUT, where keepalives are not sent).
LOST_AFTER_S = KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_COUNT
#: Seconds to wait for a server to answer a new connection: an address that takes the connection
#: and never answers (a firewall's, another service's) otherwise held a run at its start forever.
CONNECT_TIMEOUT_S = 30
#: Seconds a session may leave a transaction open and idle before the server ends it (and with it
#: the transaction, rolled back, and its locks).
IDLE_IN_TRANSACTION_S = 300
#: Tries, 0.1 s apart, to take the run lock again once this run's old session was ended.
TAKE_AGAIN_TRIES = 50


#: The first server version (``server_version_num``) with ``tcp_user_timeout``.
TCP_USER_TIMEOUT_SINCE = 120000


def server_settings(server_version: int) -> dict[str, str]:
    """What each session sets on a server of ``server_version`` (``server_version_num``), as the
    constants say now (PostgreSQL's names and units: s, and ms for the timeouts); an older server
    than TCP_USER_TIMEOUT_SINCE has no ``tcp_user_timeout``, and gets the rest."""
    settings = {"tcp_keepalives_idle": str(KEEPALIVE_IDLE_S), "tcp_keepalives_interval": str(KEEPALIVE_INTERVAL_S),
                "tcp_keepalives_count": str(KEEPALIVE_COUNT), "tcp_user_timeout": str(1000 * LOST_AFTER_S),
                "idle_in_transaction_session_timeout": str(1000 * IDLE_IN_TRANSACTION_S),
                "lock_timeout": str(1000 * LOCK_WAIT_S)}
    if server_version < TCP_USER_TIMEOUT_SINCE:
        del settings["tcp_user_timeout"]
    return settings


def _session_settings(dbapi_connection, connection_record) -> None:
    """The server's side of the module's text, set on each new connection of an engine (SET after
    connecting, not the startup packet's ``options``, which connection poolers may refuse)."""
    settings = server_settings(dbapi_connection.server_version)
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SELECT set_config(name, value, false) FROM unnest(%s::text[], %s::text[]) AS s(name, value)",
                       [list(settings), list(settings.values())])
    if not dbapi_connection.autocommit:
        dbapi_connection.commit()  # set_config outside a transaction of the caller's


class PostgreSQLBackend(Backend):
    name = "postgres"
    writer_on_this_host = False

    def describe(self) -> str:
        s = self.settings
        user = f"{s.user}@" if s.user else ""
        return f"PostgreSQL database {s.name!r} on {user}{s.host}:{s.port}"

    def url(self, database: str | None = None) -> URL:
        s = self.settings
        return URL.create("postgresql+psycopg2", username=s.user, password=s.password, host=s.host,
                          port=s.port, database=database or s.name)

    def address(self) -> str:
        s = self.settings  # quoted: a name with '?', '#' or '%' would name another database
        user = f"{quote(s.user, safe='')}@" if s.user else ""
        return f"postgresql://{user}{s.host}:{s.port}/{quote(s.name, safe='')}"

    def make_engine(self, database: str | None = None, **kwargs) -> Engine:
        """An engine whose sessions probe and are probed for a lost peer (see the module's text)."""
        keepalives = dict(keepalives=1, keepalives_idle=KEEPALIVE_IDLE_S, keepalives_interval=KEEPALIVE_INTERVAL_S,
                          keepalives_count=KEEPALIVE_COUNT, tcp_user_timeout=1000 * LOST_AFTER_S,
                          connect_timeout=CONNECT_TIMEOUT_S)
        engine = super().make_engine(database, connect_args=keepalives | kwargs.pop("connect_args", {}),
                                     pool_pre_ping=True, **kwargs)
        event.listen(engine, "connect", _session_settings)
        return engine

    def server_engine(self) -> Engine:
        """An autocommit engine on the server's ``postgres`` maintenance database."""
        return self.make_engine(database="postgres", isolation_level="AUTOCOMMIT")

    def exists(self) -> bool:
        engine = self.server_engine()
        try:
            with engine.connect() as conn:
                found = conn.execute(
                    text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": self.settings.name}
                ).first()
        except OperationalError as exc:
            raise cannot_connect(self.settings, exc) from None
        finally:
            engine.dispose()
        return found is not None

    def create(self) -> None:
        self._server_statement("CREATE DATABASE {}", "create")

    def wait_for_any_lock(self, conn: Connection) -> None:
        """A lost writer's session is ended by the server (LOST_AFTER_S, IDLE_IN_TRANSACTION_S),
        after LOCK_WAIT_S: the transaction that takes over from it waits until then."""
        conn.exec_driver_sql("SET LOCAL lock_timeout = 0")

    def drop(self) -> None:
        self._server_statement("DROP DATABASE IF EXISTS {} WITH (FORCE)", "drop")

    def _server_statement(self, template: str, verb: str) -> None:
        engine = self.server_engine()
        try:
            # quote_identifier doubles '%' for the driver's pyformat parameters: the statement must
            # reach the driver as is (exec_driver_sql), not through text(), which doubles it again
            quoted = engine.dialect.identifier_preparer.quote_identifier(self.settings.name)
            with engine.connect() as conn:
                conn.exec_driver_sql(template.format(quoted))
        except DBAPIError as exc:
            raise DatabaseError(f"cannot {verb} {self.describe()}: {driver_reason(exc)}") from None
        finally:
            engine.dispose()

    def lock(self) -> AdvisoryLock:
        return AdvisoryLock(self.settings)

    def create_tables(self, engine: Engine) -> None:
        """The export schema's tables, those every image updates with their storage (schema.STORAGE)."""
        schema.postgresql_storage()
        super().create_tables(engine)

    def set_storage(self, conn: Connection, table: str, options) -> None:
        quote = conn.dialect.identifier_preparer.quote
        settings = ", ".join(f"{name} = {float(value):g}" for name, value in options.items())
        conn.exec_driver_sql(f"ALTER TABLE {quote(table)} SET ({settings})")

    def insert(self, conn: Connection, table: Table, columns: Columns) -> None:
        copy_insert(conn, table, columns)

    def upsert(self, conn: Connection, tables: Sequence[Table], columns: Columns, rows: np.ndarray,
               keys: Sequence[str]) -> None:
        copy_upsert(conn, tables, columns, rows, keys)

    def update(self, conn: Connection, table: Table, columns: Columns, keys: Sequence[str]) -> None:
        array_update(conn, table, columns, keys)


class AdvisoryLock(Lock):
    """A session advisory lock keyed by the database name, in the ``postgres`` database."""

    _engine = None
    _conn = None

    _pid: int | None = None  #: the server process of the session holding the lock

    @property
    def key(self) -> str:
        """The lock's name; the advisory lock's key is its hash."""
        return f"trap-dask:{self.settings.name}"

    def acquire(self) -> AdvisoryLock:
        self._engine = PostgreSQLBackend(self.settings).server_engine()
        try:
            self._conn = self._engine.connect()
            got = self._conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"),
                                     {"key": self.key}).scalar()
            self._pid = self._conn.connection.dbapi_connection.info.backend_pid
        except SQLAlchemyError as exc:
            self.release()
            raise cannot_connect(self.settings, exc) from None
        if not got:
            self.release()
            raise self.busy()
        return self

    def check(self) -> None:
        """A session the server ended (an outage longer than LOST_AFTER_S) held the lock: it is taken
        again if it is free; if this run's old session still holds it (only the connection broke),
        that session is ended first. LockLost when another run holds it, or the server cannot be
        reached."""
        if self._conn is None:
            raise self.lost("it was released")
        try:
            self._conn.execute(text("SELECT 1"))
            return
        except SQLAlchemyError:
            pass
        old = self._pid
        self.release()
        try:
            self._take_again(old)
        except DatabaseBusy:
            raise self.lost("its connection to the server broke, and another trap-dask run holds it now") from None
        except DatabaseError as exc:
            raise self.lost(str(exc)) from None
        log.warning("%s: this run's connection for its lock was lost; the lock is held again", self.settings.describe())

    def _take_again(self, old_pid: int | None) -> None:
        """Acquire, after ending this run's old session ``old_pid`` if it still holds the lock."""
        try:
            self.acquire()
            return
        except DatabaseBusy:
            if old_pid is None:
                raise
        engine = PostgreSQLBackend(self.settings).server_engine()
        try:
            with engine.connect() as conn:
                ended = conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE pid = :pid AND locktype = 'advisory' "
                    "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = hashtextextended(:key, 0)"),
                    {"pid": old_pid, "key": self.key}).scalar()
        except SQLAlchemyError as exc:
            raise cannot_connect(self.settings, exc) from None
        finally:
            engine.dispose()
        if not ended:
            raise self.busy()
        for _ in range(TAKE_AGAIN_TRIES):  # the lock goes when the ended session's process has exited
            try:
                self.acquire()
                return
            except DatabaseBusy:
                time.sleep(0.1)
        raise self.busy()

    def busy(self) -> DatabaseBusy:
        return DatabaseBusy(f"{super().busy()}; the lock of a run whose machine or network was lost is "
                            f"released by the server within {LOST_AFTER_S} s")

    def release(self) -> None:
        if self._conn is not None:
            try:  # at once: the server frees a closed session's locks only when its backend exits
                self._conn.execute(text("SELECT pg_advisory_unlock_all()"))
            except Exception:  # noqa: BLE001 - a lost connection holds no lock
                pass
            self._conn.close()
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
