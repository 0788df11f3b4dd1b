"""The PostgreSQL backend: the export database lives on a server, written from any worker.

The database is created and dropped through the server's ``postgres`` maintenance database,
with its name quoted as an identifier (never interpolated). Rows go in with binary COPY
(:mod:`trap_dask.db.pgcopy`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import Connection, Engine, Table, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from trap_dask.db import schema
from trap_dask.db.backends import Backend, Columns, DatabaseError, driver_reason
from trap_dask.db.lock import Lock
from trap_dask.db.pgcopy import array_update, copy_insert, copy_upsert


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
        s = self.settings
        user = f"{s.user}@" if s.user else ""
        return f"postgresql://{user}{s.host}:{s.port}/{s.name}"

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
            raise DatabaseError(f"cannot connect to {self.describe()}: {driver_reason(exc)}") from None
        finally:
            engine.dispose()
        return found is not None

    def create(self) -> None:
        self._server_statement("CREATE DATABASE {}", "create")

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

    def acquire(self) -> AdvisoryLock:
        self._engine = PostgreSQLBackend(self.settings).server_engine()
        try:
            self._conn = self._engine.connect()
            got = self._conn.execute(
                text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"),
                {"key": f"trap-dask:{self.settings.name}"},
            ).scalar()
        except SQLAlchemyError as exc:
            self.release()
            raise DatabaseError(f"cannot connect to {self.settings.describe()}: {driver_reason(exc)}") from None
        if not got:
            self.release()
            raise self.busy()
        return self

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
