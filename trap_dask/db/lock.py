"""One writer per export database: a lock that a killed run cannot leave behind.

Each backend provides its :class:`Lock` (``settings.impl.lock()``): SQLite an exclusive
``flock`` on ``<db>.lock`` beside the database file, PostgreSQL a session advisory lock keyed by
the database name, taken in the server's ``postgres`` maintenance database. Both are released by
the operating system or the server when the holding process dies, so a stale lock from a killed
run never blocks a resume. A server also ends the session of a client it lost touch with (see
:mod:`trap_dask.db.postgresql`), so a run checks that it still holds its lock as it goes
(:meth:`RunLock.check`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from trap_dask.config import RESUME
from trap_dask.db.backends import DatabaseError, DatabaseSettings


class DatabaseBusy(DatabaseError):
    """Another live run is writing to the same export database."""


class LockLost(DatabaseError):
    """A run no longer holds its lock: it must stop (not restart its writer and go on)."""


class Lock(ABC):
    """A backend's run lock; ``release`` (or process exit) frees it."""

    def __init__(self, settings: DatabaseSettings):
        self.settings = settings

    def busy(self) -> DatabaseBusy:
        return DatabaseBusy(
            f"{self.settings.describe()} is being written by another trap-dask run; "
            "wait for it to finish (only one run may write to a database at a time)"
        )

    @abstractmethod
    def acquire(self) -> Lock:
        """Take the lock, or raise DatabaseBusy at once."""

    @abstractmethod
    def release(self) -> None:
        """Free the lock (nothing if not held)."""

    def check(self) -> None:  # noqa: B027 - a lock only its process can lose needs no check
        """LockLost if this run no longer holds the lock."""

    def lost(self, why: str) -> LockLost:
        """The error of a run that no longer holds its lock, ``why`` saying how it lost it."""
        return LockLost(f"{self.settings.describe()}: this run lost its lock ({why}); it stops here and the images "
                        f"it committed stay: {RESUME}")

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


#: Seconds between a run's checks that it still holds its lock (RunLock.check).
CHECK_EVERY_S = 10.0


class RunLock(Lock):
    """Held for a whole run: the lock of ``settings``' backend."""

    def __init__(self, settings: DatabaseSettings):
        super().__init__(settings)
        self._lock = settings.impl.lock()
        self._checked = time.monotonic()

    def check(self) -> None:
        """The backend lock's check, at most once every CHECK_EVERY_S (a run calls it per image)."""
        if time.monotonic() - self._checked >= CHECK_EVERY_S:
            self._lock.check()
            self._checked = time.monotonic()

    def acquire(self) -> RunLock:
        self._lock.acquire()
        return self

    def release(self) -> None:
        self._lock.release()
