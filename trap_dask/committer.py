"""The writer's committer process: it writes the writer's batches in a process of their own.

A commit spends most of its time in Python and in the drivers' parameter binding, holding the GIL
(SQLite: ~80% of a batch's time), so a committer thread beside the writer's association gains
little: the two take turns. Once a writer falls behind (see ``trap_dask.writer``) it starts a
:class:`CommitterProcess`, ``python -m trap_dask.committer``, and hands it each batch over a
socket; the process writes the batch in ONE transaction with its own :class:`ExportStore` and
answers with the seconds (and CPU seconds) it took or the error. The writer still has one
transaction in flight at a time, in order, so the database ends at an image boundary as before.

The process writes nothing on its own: it commits only what the writer sends, and refuses to
commit once the writer's process has gone (kill -9 of the writer's worker): the batch in flight
rolls back, as it would in a thread, and the process exits when its socket closes. Signals meant
for the run (Ctrl-C, SIGTERM) are the writer's to act on; the process ignores them.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sqlalchemy import event

from trap_dask.db.backends import DatabaseError, DatabaseSettings
from trap_dask.db.store import ExportStore

log = logging.getLogger(__name__)

#: One staged image as the writer hands it over: its images row and ``commit_image``'s keywords.
StagedImage = tuple[dict[str, Any], dict[str, Any]]
#: Seconds the writer waits for its committer process to end at the run's end before killing it.
CLOSE_SECONDS = 30.0


def write_batch(store: ExportStore, images: list[StagedImage]) -> float:
    """Write ``images`` (in time order) in one transaction; returns the seconds it took."""
    started = time.perf_counter()
    with store.batch():
        for row, keywords in images:
            store.commit_image(row, **keywords)
    return time.perf_counter() - started


class CommitterProcess:
    """The parent's end: starts the process, hands it batches, one at a time (not thread-safe: the
    writer's committer thread is its only caller, and :meth:`close` comes after that thread ended)."""

    def __init__(self, settings: DatabaseSettings):
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "trap_dask.committer", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_environment())
        self._conn = Connection(ours.detach())
        self._conn.send(settings)  # over the socket: the password is in no argument or environment
        self._state = "starting"  # -> "ready" | "unavailable"
        self.pid: int | None = None  #: the process's id, once it is ready
        self.batches = 0  #: batches it has written

    def ready(self, wait: bool = False) -> bool:
        """Whether the process has opened the database and takes batches (``wait``: until it has, or
        has failed to). A process that could not start is logged once and never used."""
        if self._state == "starting" and (wait or self._conn.poll()):
            try:
                kind, detail = self._conn.recv()
            except (EOFError, OSError):
                kind, detail = "error", f"it ended (exit code {self._process.wait()})"
            if kind == "ready":
                self._state, self.pid = "ready", detail
            else:
                self._state = "unavailable"
                log.warning("the writer's committer process did not start (%s); the writer commits in its "
                            "own process", detail)
        return self._state == "ready"

    def write(self, images: list[StagedImage]) -> tuple[float, float]:
        """Have the process write ``images`` in one transaction; returns its seconds and the CPU
        seconds it spent, or raises its error (DatabaseError when the process itself was lost)."""
        try:
            self._conn.send(images)
            kind, detail = self._conn.recv()
        except (EOFError, OSError):
            self._state = "unavailable"
            raise DatabaseError(f"the writer's committer process ended (exit code {self._process.wait()}) "
                                "before its batch was written") from None
        if kind == "error":
            error, text = detail
            log.debug("the committer process failed a batch:\n%s", text)
            raise error
        self.batches += 1
        return detail

    def close(self) -> None:
        """Let the process end (it finishes nothing: the writer waited for its last batch)."""
        try:
            self._conn.send(None)
        except OSError:
            pass
        self._conn.close()
        try:
            self._process.wait(CLOSE_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _environment() -> dict[str, str]:
    """The process's environment: this one, with the directory this trap_dask was imported from
    first on PYTHONPATH (a checkout run from its source tree), unless it is an installation's
    site-packages, which must stay behind the standard library."""
    root = str(Path(__file__).resolve().parent.parent)
    installed = {str(Path(p).resolve()) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                                 site.getusersitepackages(), *site.getsitepackages())}
    if root in installed:
        return dict(os.environ)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


class Orphaned(DatabaseError):
    """The writer's process has gone: the batch in flight is not committed."""


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` if it crosses processes, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception's own pickling may fail in its own way
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def serve(conn: Connection) -> None:
    """The process's end: open the database the first message names, then write each batch sent
    until None or the socket closes."""
    parent = os.getppid()
    try:
        store = ExportStore(conn.recv())
    except Exception as exc:  # noqa: BLE001 - reported to the writer, which then commits itself
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return

    def refuse_if_orphaned(_connection) -> None:
        if os.getppid() != parent:
            raise Orphaned("the writer's process has gone")

    event.listen(store.engine, "commit", refuse_if_orphaned)
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                images = conn.recv()
            except (EOFError, OSError):
                return
            if images is None:
                return
            try:
                cpu = time.thread_time()
                reply = ("ok", (write_batch(store, images), time.thread_time() - cpu))
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the writer
                reply = ("error", (_picklable(exc), traceback.format_exc()))
            try:
                conn.send(reply)
            except OSError:
                return
    finally:
        store.close()


def main(fd: int) -> None:
    """The process: Ctrl-C in the terminal and a batch system's SIGTERM reach every process of the
    run, but when to stop is the writer's to say (it commits what it associated, then closes the
    socket), so the process lets both pass."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(Connection(fd))


if __name__ == "__main__":
    main(int(sys.argv[1]))
