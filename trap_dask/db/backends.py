"""The export database's backends: one :class:`Backend` interface, one class per backend.

:class:`DatabaseSettings` says where the database lives; ``settings.impl`` is its backend,
chosen once, here (:func:`backend_class`), from ``settings.backend`` (``sqlite`` or ``postgres``):
:class:`trap_dask.db.sqlite.SQLiteBackend` (a file) and
:class:`trap_dask.db.postgresql.PostgreSQLBackend` (a database on a server). Nothing outside
``trap_dask.db`` compares backend names; it asks the backend (``writer_on_this_host``,
``resolve_name``, ``describe()``, ...).

Every backend creates, tests, drops and locks its database, makes SQLAlchemy engines for it, and
bulk-writes columnar rows (``insert``/``upsert``) in the caller's transaction, each with its own
value serialiser. The password is passed to the driver only; error messages carry the driver's
reason, never the connection URL or the password.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from sqlalchemy import Connection, Engine, Table, create_engine
from sqlalchemy.engine import URL

from trap_dask.columns import Columns

if TYPE_CHECKING:
    from trap_dask.db.lock import Lock


class DatabaseError(RuntimeError):
    """A database that cannot be opened, created or written; the message is user-facing."""


class DatabaseGone(DatabaseError):
    """The database a run was writing to is no longer where it was: nothing there to resume."""


@dataclass(frozen=True)
class DatabaseSettings:
    """Where the export database lives. ``password`` is never logged or stored."""

    backend: str
    name: str
    host: str = "localhost"
    port: int = 5432
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def impl(self) -> Backend:
        """The backend these settings name (a new, stateless object each time)."""
        return backend_class(self.backend)(self)

    def describe(self) -> str:
        """A password-free description for messages and logs."""
        return self.impl.describe()

    def url(self, database: str | None = None) -> URL:
        return self.impl.url(database)


class Backend(ABC):
    """One kind of export database: its lifecycle, its lock and its bulk writes."""

    #: the ``db_backend`` value that selects this backend
    name: ClassVar[str]
    #: the database is a file on this host, so its writer must run here
    writer_on_this_host: ClassVar[bool]

    def __init__(self, settings: DatabaseSettings):
        self.settings = settings

    @classmethod
    def resolve_name(cls, name: str) -> str:
        """``db_name`` as the writer must see it wherever it runs (SQLite: an absolute path)."""
        return name

    @classmethod
    def scratch_name(cls, directory: Path, stem: str) -> str:
        """The name of a throw-away database called ``stem`` (SQLite: a file in ``directory``)."""
        return stem

    @abstractmethod
    def describe(self) -> str:
        """A password-free description for messages and logs."""

    @abstractmethod
    def url(self, database: str | None = None) -> URL:
        """The SQLAlchemy URL of the database (or of ``database`` on the same server)."""

    @abstractmethod
    def address(self) -> str:
        """The database as the results commands take it (``trap-dask report DB``), password-free."""

    def make_engine(self, database: str | None = None, **kwargs) -> Engine:
        """An engine for the export database (or another database on the same server)."""
        return create_engine(self.url(database), hide_parameters=True, **kwargs)

    def looking_engine(self) -> Engine:
        """An engine that reads the database and changes nothing in it, not even its settings
        (what :meth:`ExportStore.create` looks at before replacing a database that may be another's)."""
        return self.make_engine()

    @abstractmethod
    def exists(self) -> bool:
        """Whether the database exists (DatabaseError when the server cannot be reached)."""

    @abstractmethod
    def create(self) -> None:
        """Create an empty database."""

    @abstractmethod
    def drop(self) -> None:
        """Remove the database and everything in it (nothing if it does not exist)."""

    @abstractmethod
    def lock(self) -> Lock:
        """The run lock: one writer per database, freed when its holder dies (not yet acquired)."""

    def create_tables(self, engine: Engine) -> None:
        """Make the export schema's tables (trap_dask.db.schema) in an empty database."""
        from trap_dask.db import schema

        schema.metadata.create_all(engine)

    def set_storage(self, conn: Connection, table: str, options: Mapping[str, object]) -> None:  # noqa: B027
        """Apply a table's storage parameters (schema.STORAGE) to an existing table; none by default."""

    def wait_for_any_lock(self, conn: Connection) -> None:  # noqa: B027
        """Let ``conn``'s transaction wait for locks as long as they are held, beyond LOCK_WAIT_S: a
        lost writer's, which its server ends in its own time; nothing by default."""

    def prepare_batch(self, conn: Connection, measurements: int) -> None:  # noqa: B027
        """Ready ``conn`` for a transaction that inserts ``measurements`` rows of extracted_sources;
        nothing by default."""

    @abstractmethod
    def insert(self, conn: Connection, table: Table, columns: Columns) -> None:
        """Insert every row of ``columns`` (the table's columns it has) in ``conn``'s transaction."""

    @abstractmethod
    def upsert(self, conn: Connection, tables: Sequence[Table], columns: Columns, rows: np.ndarray,
               keys: Sequence[str]) -> None:
        """Insert or update ``rows`` of ``columns`` (every column of each of ``tables``, which share
        their primary ``keys``; each key in one row at most) in each table."""

    @abstractmethod
    def update(self, conn: Connection, table: Table, columns: Columns, keys: Sequence[str]) -> None:
        """Set the other columns of ``columns`` in the rows of ``table`` whose ``keys`` they give
        (each key in one row at most; a key the table lacks changes nothing), in a few statements
        however many rows."""


def backend_class(name: str) -> type[Backend]:
    """The backend called ``name`` (``db_backend``): the one place that maps names to classes."""
    from trap_dask.db.postgresql import PostgreSQLBackend
    from trap_dask.db.sqlite import SQLiteBackend

    for cls in (SQLiteBackend, PostgreSQLBackend):
        if cls.name == name:
            return cls
    raise DatabaseError(f"unknown database backend {name!r}: use sqlite or postgres")


#: Seconds a statement waits for a lock another session or process holds on the database before
#: the transaction fails (a forgotten open transaction in a notebook or a shell would otherwise
#: hold a run for ever, silently, or, SQLite's default, stop it after 5 s).
LOCK_WAIT_S = 120
#: What the drivers say when that wait ran out, and what to look at.
LOCK_WAIT_ENDED = {
    "database is locked": "another process holds a write transaction open on the file (a sqlite3 shell or "
                          "a notebook?)",
    "canceling statement due to lock timeout": "another session held a lock on a table this run writes "
                                               "(pg_locks and pg_stat_activity show which)",
}


#: What a driver says when the server's end of a connection went away mid-statement (psycopg2,
#: libpq): said alone, it hides why.
CONNECTION_LOST = ("connection already closed", "invalid socket", "server closed the connection unexpectedly",
                   "terminating connection due to administrator command", "SSL connection has been closed")


def driver_reason(exc: Exception) -> str:
    """The driver's one-line reason for a failure, without SQL, parameters or URL; where the
    connection was lost, saying so and what ends one."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    reason = lines[0] if lines else type(orig).__name__
    for words, why in LOCK_WAIT_ENDED.items():
        if words in reason:
            return f"{reason} after {LOCK_WAIT_S} s: {why}"
    if any(words in reason for words in CONNECTION_LOST):
        return (f"the connection to the database server was lost ({reason}): the server ended the "
                "session (an administrator's pg_terminate_backend, a restart, the database dropped) "
                "or the network failed")
    return reason


def cannot_connect(settings: DatabaseSettings, exc: Exception) -> DatabaseError:
    """The user's error for a connection to ``settings``' database (or its server) that failed with ``exc``."""
    return DatabaseError(f"cannot connect to {settings.describe()}: {driver_reason(exc)}")


# -- the same, as functions of the settings ---------------------------------------------------
def make_engine(settings: DatabaseSettings, database: str | None = None, **kwargs) -> Engine:
    return settings.impl.make_engine(database, **kwargs)


def database_exists(settings: DatabaseSettings) -> bool:
    return settings.impl.exists()


def create_database(settings: DatabaseSettings) -> None:
    settings.impl.create()


def drop_database(settings: DatabaseSettings) -> None:
    settings.impl.drop()
