"""The SQLite backend: the export database is one file, written by a writer on this host.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``. A commit is appended to
the write-ahead log before it returns, so a process killed at any point (kill -9, a lost worker)
leaves the database holding every committed image, a consistent prefix of the run; only a power
loss or an operating-system crash may lose the last commits before the next checkpoint (the
database stays consistent, it ends at an earlier image). ``synchronous=FULL`` would also sync the
log on each commit, at several milliseconds per image.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from sqlalchemy import Connection, Engine, Table, bindparam, create_engine, event, update
from sqlalchemy.engine import URL

from trap_dask.db.backends import LOCK_WAIT_S, Backend, Columns, DatabaseError, DatabaseGone
from trap_dask.db.lock import Lock

#: How SQLAlchemy stores a DateTime in SQLite; raw inserts use the same text.
SQLITE_DATETIME = "%Y-%m-%d %H:%M:%S.%f"
#: Page cache (KiB) of a connection: at least the first (SQLite's default is 2 MiB), at most the last,
#: and for a transaction ~1 KiB per measurement it inserts (SQLiteBackend.prepare_batch).
CACHE_KIB = (4096, 65536)
CACHE_KIB_PER_MEASUREMENT = 1


def _pragmas(dbapi_connection, record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # see the module's docstring
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA cache_size=-{CACHE_KIB[0]}")  # see SQLiteBackend.prepare_batch
    # the log is copied into the file every 4000 pages (default 1000): a batch rewrites the same
    # index pages as the one before, copied once per checkpoint (benchmarks/RESULTS.md, issue 15 round 9)
    cursor.execute("PRAGMA wal_autocheckpoint=4000")
    path = next(row[2] for row in cursor.execute("PRAGMA database_list") if row[1] == "main")
    cursor.close()
    record.info["file"] = _identity(path)  # the file opened (a link's target)


def _file_url(path: Path, mode: str) -> URL:
    """The SQLite URI of the file at ``path`` opened in ``mode`` ('ro', 'rw'): the path percent-encoded,
    so that a '?', '#' or '%' in a name is the name's."""
    return URL.create("sqlite", database=f"file:{quote(str(path))}", query={"mode": mode, "uri": "true"})


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; None where there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def python_values(column: np.ndarray) -> list[Any]:
    """A numpy column as SQLite DB-API values: Python scalars, datetimes as text. A NaN float goes
    as it is: SQLite stores a NaN bound as a double as NULL (tests/test_backend_contract.py)."""
    if column.dtype.kind == "O":
        text: dict[datetime, str] = {}  # a light curve's times repeat: format each once
        return [(text.get(v) or text.setdefault(v, v.strftime(SQLITE_DATETIME))) if isinstance(v, datetime) else v
                for v in column.tolist()]
    return column.tolist()


def row_values(columns: Columns, names: Sequence[str], rows: np.ndarray | None = None) -> list[Any]:
    """Rows of a columnar table as one flat list of DB-API parameters, row after row, each in the
    order of ``names``."""
    values = [python_values(columns[n] if rows is None else columns[n][rows]) for n in names]
    flat: list[Any] = [None] * (len(names) * (len(values[0]) if values else 0))
    for i, column in enumerate(values):
        flat[i :: len(names)] = column
    return flat


#: SQLite 3.33 (2020) and later update from a join (``UPDATE .. FROM``); before, an update by key is
#: one statement per row (RHEL 8 ships 3.26).
UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)

#: Rows bound to one INSERT statement at most (a power of two). sqlite3 lets go of the GIL for
#: every statement it steps: ``executemany``, a statement per row, handed the GIL to the
#: extraction threads and waited to take it back once per row (1000 rows of 30 columns: 1.5 ms
#: alone, 4.1 ms beside a thread running numpy; as multi-row statements 1.3 and 1.4 ms;
#: benchmarks/RESULTS.md, issue 15 round 5).
ROWS_PER_STATEMENT = 256


def _quote(name: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


@functools.cache
def _insert_sql(table: str, names: tuple[str, ...], keys: tuple[str, ...] = (), rows: int = 1) -> str:
    """``INSERT INTO table (names) VALUES (?, ...), ...`` for ``rows`` rows, with
    ``ON CONFLICT (keys) DO UPDATE`` for keys."""
    row = f"({', '.join('?' * len(names))})"
    sql = f"INSERT INTO {_quote(table)} ({', '.join(map(_quote, names))}) VALUES {', '.join([row] * rows)}"
    if keys:
        updates = ", ".join(f"{_quote(n)} = excluded.{_quote(n)}" for n in names if n not in keys)
        sql += f" ON CONFLICT ({', '.join(map(_quote, keys))}) DO UPDATE SET {updates}"
    return sql


@functools.cache
def _update_sql(table: str, names: tuple[str, ...], keys: tuple[str, ...], rows: int) -> str:
    """``UPDATE table SET name = v.columnN, ... FROM (VALUES (?, ...), ...) AS v WHERE keys match``
    for ``rows`` rows of ``names``."""
    column = {name: f"v.column{i + 1}" for i, name in enumerate(names)}
    row = f"({', '.join('?' * len(names))})"
    updates = ", ".join(f"{_quote(n)} = {column[n]}" for n in names if n not in keys)
    match = " AND ".join(f"{_quote(table)}.{_quote(k)} = {column[k]}" for k in keys)
    return f"UPDATE {_quote(table)} SET {updates} FROM (VALUES {', '.join([row] * rows)}) AS v WHERE {match}"


def _write_rows(conn: Connection, table: str, names: tuple[str, ...], values: list[Any],
                keys: tuple[str, ...] = (), sql: Callable[..., str] = _insert_sql) -> None:
    """Insert (or upsert on ``keys``) the rows of ``values`` (:func:`row_values`) in the
    connection's transaction, a few multi-row statements of a power-of-two number of rows each,
    so that the prepared statements repeat (sqlite3 keeps them) and their parameters stay under
    SQLite's limit. ``sql``: the statement of so many rows (``_update_sql``: an update of the
    rows whose ``keys`` they give)."""
    dbapi = conn.connection.dbapi_connection
    most = max(1, min(ROWS_PER_STATEMENT, dbapi.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(names)))
    size = 1 << (most.bit_length() - 1)
    done, total = 0, len(values) // len(names)
    cursor = dbapi.cursor()
    try:
        while done < total:
            while size > total - done:
                size >>= 1
            cursor.execute(sql(table, names, keys, size),
                           values[done * len(names) : (done + size) * len(names)])
            done += size
    finally:
        cursor.close()


class SQLiteBackend(Backend):
    name = "sqlite"
    writer_on_this_host = True

    @classmethod
    def resolve_name(cls, name: str) -> str:
        """The absolute path of the file; DatabaseError for a directory (it cannot be the file)."""
        path = Path(name).resolve()
        if path.is_dir():
            raise DatabaseError(f"--db_name {name} is a directory: give the SQLite file's path, "
                                f"e.g. {path / 'trap.db'}")
        return str(path)

    @classmethod
    def scratch_name(cls, directory: Path, stem: str) -> str:
        return str(directory / f"{stem}.db")

    def describe(self) -> str:
        return f"SQLite file {self.settings.name}"

    def url(self, database: str | None = None) -> URL:
        """The file, opened read-write and never created by connecting (:meth:`create` makes it): a
        connection opened after the file was deleted fails instead of writing into a new one."""
        return _file_url(Path(self.settings.name).resolve(), "rw")

    def address(self) -> str:
        return self.settings.name

    def make_engine(self, database: str | None = None, **kwargs) -> Engine:
        engine = super().make_engine(database, connect_args={"timeout": LOCK_WAIT_S}, **kwargs)
        event.listen(engine, "connect", _pragmas)
        return engine

    def looking_engine(self) -> Engine:
        """Read-only, without the export database's pragmas (WAL would stay set in another's file)."""
        return create_engine(_file_url(Path(self.settings.name).resolve(), "ro"), hide_parameters=True)

    def exists(self) -> bool:
        return Path(self.settings.name).exists()

    def create(self) -> None:
        """An empty file (its directory made if missing): SQLite writes its header on the first connection."""
        path = Path(self.settings.name).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def drop(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(self.settings.name + suffix).unlink(missing_ok=True)

    def lock(self) -> FileLock:
        return FileLock(self.settings)

    def prepare_batch(self, conn: Connection, measurements: int) -> None:
        """Refuse to write when the file this connection opened is no longer at its path (deleted or
        replaced: the commits would be lost with it), and size the page cache to the transaction.

        Each measurement adds an entry to the run of its light curve in the src_id index of
        extracted_sources, and rows to the table's newest pages;
        a batch of 16 images of 1000 sources touches ~1000 pages of the index and ~900 new pages
        (4 KiB each). With a cache smaller than that, every batch reads the index back from the
        file: 16 MiB took 18% off such a batch against 4 MiB (benchmarks/RESULTS.md, issue 15 round
        9). A writer that keeps up writes a few images a transaction and keeps the 4 MiB of a small
        one, so a long run's memory stays flat."""
        # the name as given (a link is followed): SQLite would go on writing into the file no longer there
        if _identity(self.settings.name) != conn.info["file"]:
            raise DatabaseGone(
                f"{self.describe()} was deleted or replaced while this run wrote to it: the images "
                "committed after that went into the file no longer there and are lost. Run the "
                "command again (with --db_append only where the file is back)")
        kib = min(max(measurements * CACHE_KIB_PER_MEASUREMENT, CACHE_KIB[0]), CACHE_KIB[1])
        conn.exec_driver_sql(f"PRAGMA cache_size=-{int(kib)}")  # a number of ours: no parameter in a PRAGMA

    def insert(self, conn: Connection, table: Table, columns: Columns) -> None:
        names = tuple(c for c in table.c.keys() if c in columns)
        _write_rows(conn, table.name, names, row_values(columns, names))

    def upsert(self, conn: Connection, tables: Sequence[Table], columns: Columns, rows: np.ndarray,
               keys: Sequence[str]) -> None:
        for table in tables:
            names = tuple(table.c.keys())
            _write_rows(conn, table.name, names, row_values(columns, names, rows), tuple(keys))

    def update(self, conn: Connection, table: Table, columns: Columns, keys: Sequence[str]) -> None:
        names = tuple(c for c in table.c.keys() if c in columns)
        if UPDATE_FROM:
            _write_rows(conn, table.name, names, row_values(columns, names), tuple(keys), _update_sql)
            return
        others = [n for n in names if n not in keys]
        conn.execute(update(table).where(*(table.c[k] == bindparam(f"key_{k}") for k in keys))
                     .values({n: bindparam(f"new_{n}") for n in others}),
                     [{f"{'key' if n in keys else 'new'}_{n}": v for n, v in zip(names, row)}
                      for row in zip(*(python_values(columns[n]) for n in names))])


class FileLock(Lock):
    """An exclusive ``flock`` on ``<db>.lock`` beside the database file."""

    _file = None

    def acquire(self) -> FileLock:
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
            raise self.busy() from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
