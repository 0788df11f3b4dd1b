"""Database lifecycle per backend: connect, test existence, create and drop the export database.

SQLite: the database is a file. PostgreSQL: the database is created on the server through the
``postgres`` maintenance database, with its name quoted as an identifier (never interpolated).
The password is passed to the driver only; error messages carry the driver's reason, never the
connection URL or the password.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError


class DatabaseError(RuntimeError):
    """A database that cannot be opened, created or written; the message is user-facing."""


@dataclass(frozen=True)
class DatabaseSettings:
    """Where the export database lives. ``password`` is never logged or stored."""

    backend: str
    name: str
    host: str = "localhost"
    port: int = 5432
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """A password-free description for messages and logs."""
        if self.backend == "sqlite":
            return f"SQLite file {self.name}"
        user = f"{self.user}@" if self.user else ""
        return f"PostgreSQL database {self.name!r} on {user}{self.host}:{self.port}"

    def url(self, database: str | None = None) -> URL:
        if self.backend == "sqlite":
            return URL.create("sqlite", database=str(Path(self.name).resolve()))
        return URL.create(
            "postgresql+psycopg2",
            username=self.user,
            password=self.password,
            host=self.host,
            port=self.port,
            database=database or self.name,
        )


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a committed image survives a power loss too
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(settings: DatabaseSettings, database: str | None = None, **kwargs) -> Engine:
    """An engine for the export database (or another database on the same server)."""
    engine = create_engine(settings.url(database), hide_parameters=True, **kwargs)
    if settings.backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def driver_reason(exc: Exception) -> str:
    """The driver's one-line reason for a failure, without SQL, parameters or URL."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


def _server_engine(settings: DatabaseSettings) -> Engine:
    return make_engine(settings, database="postgres", isolation_level="AUTOCOMMIT")


def database_exists(settings: DatabaseSettings) -> bool:
    if settings.backend == "sqlite":
        return Path(settings.name).exists()
    engine = _server_engine(settings)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": settings.name}
            ).first()
    except OperationalError as exc:
        raise DatabaseError(f"cannot connect to {settings.describe()}: {driver_reason(exc)}") from None
    finally:
        engine.dispose()
    return found is not None


def create_database(settings: DatabaseSettings) -> None:
    """Create an empty database (SQLite: the file's directory must exist or is made)."""
    if settings.backend == "sqlite":
        Path(settings.name).resolve().parent.mkdir(parents=True, exist_ok=True)
        return
    _server_statement(settings, "CREATE DATABASE {}", "create")


def drop_database(settings: DatabaseSettings) -> None:
    """Remove the database and everything in it."""
    if settings.backend == "sqlite":
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(settings.name + suffix).unlink(missing_ok=True)
        return
    _server_statement(settings, "DROP DATABASE IF EXISTS {} WITH (FORCE)", "drop")


def _server_statement(settings: DatabaseSettings, template: str, verb: str) -> None:
    engine = _server_engine(settings)
    try:
        # quote_identifier doubles '%' for the driver's pyformat parameters: the statement must
        # reach the driver as is (exec_driver_sql), not through text(), which doubles it again
        quoted = engine.dialect.identifier_preparer.quote_identifier(settings.name)
        with engine.connect() as conn:
            conn.exec_driver_sql(template.format(quoted))
    except DBAPIError as exc:
        raise DatabaseError(f"cannot {verb} {settings.describe()}: {driver_reason(exc)}") from None
    finally:
        engine.dispose()

