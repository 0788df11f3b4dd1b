"""One writer per export database: a lock that a killed run cannot leave behind.

SQLite: an exclusive ``flock`` on ``<db>.lock`` beside the database file. PostgreSQL: a
session advisory lock, keyed by the database name, taken in the server's ``postgres``
maintenance database. Both are released by the operating system or the server when the holding
process dies, so a stale lock from a killed run never blocks a resume.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from sqlalchemy import text

from trap_dask.db.backends import DatabaseError, DatabaseSettings, driver_reason, make_engine


class DatabaseBusy(DatabaseError):
    """Another live run is writing to the same export database."""


class RunLock:
    """Held for a whole run; ``release`` (or process exit) frees it."""

    def __init__(self, settings: DatabaseSettings):
        self.settings = settings
        self._file = None
        self._engine = None
        self._conn = None

    def acquire(self) -> "RunLock":
        busy = DatabaseBusy(
            f"{self.settings.describe()} is being written by another trap-dask run; "
            "wait for it to finish (only one run may write to a database at a time)"
        )
        if self.settings.backend == "sqlite":
            path = Path(self.settings.name).resolve()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(f"{path}.lock", "a+")
            except OSError as exc:
                raise DatabaseError(f"cannot write beside {self.settings.describe()}: {exc.strerror}") from None
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.close()
                self._file = None
                raise busy from None
            self._file.seek(0)
            self._file.truncate()
            self._file.write(f"{os.getpid()}\n")
            self._file.flush()
            return self
        self._engine = make_engine(self.settings, database="postgres", isolation_level="AUTOCOMMIT")
        try:
            self._conn = self._engine.connect()
            got = self._conn.execute(
                text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"),
                {"key": f"trap-dask:{self.settings.name}"},
            ).scalar()
        except Exception as exc:
            self.release()
            raise DatabaseError(f"cannot connect to {self.settings.describe()}: {driver_reason(exc)}") from None
        if not got:
            self.release()
            raise busy
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
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

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

