"""The export store: one interface to the export database for every backend.

Only the writer actor holds an :class:`ExportStore`. Each image is committed with
:meth:`ExportStore.commit_image` in a single transaction, so the database always holds a
consistent prefix of the run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Connection, Table, bindparam, delete, func, insert, inspect, select, update
from sqlalchemy.exc import DBAPIError, OperationalError

from trap_dask import __version__
from trap_dask.db import schema
from trap_dask.db.backends import DatabaseError, DatabaseSettings, driver_reason
from trap_dask.db.migrations import can_migrate, migrate
from trap_dask.merging import HISTORY_DTYPE
from trap_dask.sources import NOT_EXPORTED

if TYPE_CHECKING:
    from trap_dask.config import Config

log = logging.getLogger(__name__)
Columns = Mapping[str, np.ndarray]


def plain(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with numpy scalars turned into Python ones (psycopg2 does not adapt numpy types)."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}


@dataclass(frozen=True)
class StoredState:
    """Tables of an existing database as column lists (empty dicts for empty tables)."""

    sources: dict[str, list]
    lightcurves: dict[str, list]
    images: dict[str, list]
    bands: dict[str, list]
    monitors: dict[str, list]
    next_image: int
    next_xtrsrc: int
    next_src_id: int


@dataclass(frozen=True)
class KnownImages:
    """The input files an export database already holds, so that an append skips them."""

    checksums: frozenset[str] = frozenset()  #: sha256 (hex) of every file recorded with one
    #: paths of files recorded as rejected without a checksum: their bytes could not be read
    unreadable: frozenset[str] = frozenset()


def _database_errors(method: Callable) -> Callable:
    """Re-raise the driver's errors of a store method as one-line DatabaseErrors."""
    @functools.wraps(method)
    def wrapper(self: ExportStore, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (DBAPIError, self.driver_error) as exc:  # bulk writes use the driver's cursor directly
            raise DatabaseError(f"{self.settings.describe()}: {driver_reason(exc)}") from None

    return wrapper


class ExportStore:
    """Reads and writes the export database; see trap_dask.db.schema for the tables."""

    def __init__(self, settings: DatabaseSettings):
        self.settings = settings
        self.backend = settings.impl
        self.engine = self.backend.make_engine()
        self._batch: Connection | None = None  #: the open transaction of a batch()
        #: the DB-API driver's base exception (raised by the backends' bulk writes)
        self.driver_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    def create(cls, settings: DatabaseSettings, overwrite: bool) -> ExportStore:
        """Create a new export database; an existing one is an error unless ``overwrite``."""
        backend = settings.impl
        if backend.exists():
            if not overwrite:
                raise DatabaseError(
                    f"{settings.describe()} already exists; pass --db_overwrite to replace it"
                )
            backend.drop()
        backend.create()
        store = cls(settings)
        try:
            store._create_tables()
        except DatabaseError:
            store.close()
            backend.drop()
            raise
        return store

    @classmethod
    def prepare(cls, settings: DatabaseSettings, config: Config) -> tuple[bool, KnownImages]:
        """Create the export database of a run, or open it to append (``config.db_append``);
        returns (appending, the files it already holds).

        Appending checks that the association parameters match those of the database's latest
        run (unless ``config.accept_config_change``) and marks the runs left 'running' by a
        killed process as 'killed': call only while holding the run lock.
        """
        import shlex

        from trap_dask.config import association_differences

        if not config.db_append:
            cls.create(settings, overwrite=config.db_overwrite).close()
            return False, KnownImages()
        store = cls.open(settings)
        try:
            stored = store.latest_config()
            differences = association_differences(config, stored) if stored else {}
            if differences and not config.accept_config_change:
                changes = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in differences.items())
                keep = " ".join(f"--{name} {shlex.quote(str(old))}" for name, (old, new) in differences.items()
                                if old is not None)
                raise DatabaseError(
                    f"association parameters differ from those of {settings.describe()} ({changes}); "
                    + (f"pass {keep} to continue as its catalogue was made, or " if keep else "pass ")
                    + "--accept_config_change to use the new values from here on"
                )
            if store.close_stale_runs():
                log.info("resuming after a run that was killed")
            return True, store.known_images()
        finally:
            store.close()

    @classmethod
    def open(cls, settings: DatabaseSettings) -> ExportStore:
        """Open an existing export database of this schema version (to append to it).

        A database without any table (e.g. made by an administrator for the run) gets the schema.
        """
        store = cls(settings)
        try:
            with store.engine.connect() as conn:
                tables = inspect(conn).get_table_names()
                if not tables:
                    versions = [schema.SCHEMA_VERSION]
                elif schema.schema_version.name not in tables:
                    raise DatabaseError(f"{settings.describe()} is not a trap-dask export database")
                else:
                    versions = conn.execute(select(schema.schema_version.c.version)).scalars().all()
            if not tables:
                store._create_tables()
        except OperationalError as exc:
            store.close()
            raise DatabaseError(f"cannot connect to {settings.describe()}: {driver_reason(exc)}") from None
        except DBAPIError as exc:  # e.g. SQLite's "file is not a database"
            store.close()
            raise DatabaseError(
                f"{settings.describe()} is not a trap-dask export database: {driver_reason(exc)}") from None
        except DatabaseError:
            store.close()
            raise
        if len(versions) == 1 and versions[0] < schema.SCHEMA_VERSION and can_migrate(versions[0]):
            store._migrate(versions[0])
        elif versions != [schema.SCHEMA_VERSION]:
            store.close()
            raise DatabaseError(
                f"{settings.describe()} has export schema version {versions}, this trap-dask writes "
                f"version {schema.SCHEMA_VERSION}; append to it with the trap-dask that made it"
            )
        return store

    def _migrate(self, version: int) -> None:
        try:
            with self.engine.begin() as conn:
                migrate(conn, version, _now(), self.backend)
        except DBAPIError as exc:
            self.close()
            raise DatabaseError(f"cannot upgrade {self.settings.describe()} from export schema version "
                                f"{version}: {driver_reason(exc)}") from None

    def _create_tables(self) -> None:
        try:
            schema.metadata.create_all(self.engine)
            with self.engine.begin() as conn:
                conn.execute(insert(schema.schema_version).values(
                    version=schema.SCHEMA_VERSION, software_version=__version__, created_at=_now()
                ))
        except DBAPIError as exc:
            raise DatabaseError(
                f"cannot create the tables in {self.settings.describe()}: {driver_reason(exc)}"
            ) from None

    def close(self) -> None:
        self.engine.dispose()

    # -- runs --------------------------------------------------------------------------
    @_database_errors
    def start_run(self, config_row: dict[str, Any], config_file: str | None) -> int:
        with self.engine.begin() as conn:
            run_id = _next_id(conn, schema.runs.c.id)
            conn.execute(insert(schema.runs).values(
                id=run_id, software_version=__version__, started_at=_now(), status="running",
                n_images=0, config_file=config_file,
            ))
            conn.execute(insert(schema.config), schema.config_rows(
                run_id, plain(config_row), _next_id(conn, schema.config.c.id)))
        return run_id

    @_database_errors
    def close_stale_runs(self) -> int:
        """Mark runs still 'running' as 'killed' (call only while holding the run lock)."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(schema.runs).where(schema.runs.c.status == "running").values(status="killed")
            ).rowcount

    @_database_errors
    def running_images(self) -> int:
        """Images committed by the runs still marked 'running' (their counts move with each image)."""
        runs = schema.runs.c
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(runs.n_images), 0))
                                    .where(runs.status == "running")).scalar())

    @_database_errors
    def latest_config(self) -> dict[str, Any] | None:
        """The config row of the most recent run, or None for an empty database."""
        config = schema.config.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(config.key, config.value, config.type).where(
                config.run == select(func.max(config.run)).scalar_subquery())).mappings().all()
        return schema.config_values(rows) if rows else None

    @_database_errors
    def known_images(self) -> KnownImages:
        """The checksums of the files already in the database, and the paths of those that were unreadable."""
        images = schema.images.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(images.checksum, images.url, images.rejected)).all()
        return KnownImages(
            checksums=frozenset(checksum for checksum, _, _ in rows if checksum),
            unreadable=frozenset(url for checksum, url, rejected in rows if rejected and not checksum),
        )

    @_database_errors
    def load_state(self) -> StoredState:
        """What a new run needs to continue this database: catalogue, light curves, images, ids."""
        with self.engine.connect() as conn:
            def columns(table: Table, order_by: list[str], where=None) -> dict[str, list]:
                query = select(table).order_by(*(table.c[c] for c in order_by))
                result = conn.execute(query if where is None else query.where(where))
                return dict(zip(result.keys(), map(list, zip(*result.all()))))

            def next_id(column) -> int:
                """One past the largest id (ids count from 0)."""
                largest = conn.execute(select(func.max(column))).scalar()
                return 0 if largest is None else largest + 1

            return StoredState(
                sources=columns(schema.runningcatalog, ["src_id"]),
                lightcurves=self._lightcurve_columns(conn),
                images=columns(schema.images, ["id"], where=schema.images.c.rejected.is_(False)),
                bands=columns(schema.frequencybands, ["band_id"]),
                monitors=columns(schema.monitor, ["id"]),
                next_image=next_id(schema.images.c.id),
                next_xtrsrc=next_id(schema.extracted_sources.c.id),
                next_src_id=next_id(schema.runningcatalog.c.src_id),
            )

    @staticmethod
    def _lightcurve_columns(conn: Connection) -> dict[str, list]:
        """``variability`` with its running sums, one row per (src_id, freq_band), as column lists."""
        var, sums = schema.variability, schema.variability_running_averages
        keys = ("src_id", "freq_band")
        query = (select(var, *(c for c in sums.c if c.name not in keys))
                 .join_from(var, sums, (var.c.src_id == sums.c.src_id) & (var.c.freq_band == sums.c.freq_band))
                 .order_by(var.c.src_id, var.c.freq_band))
        result = conn.execute(query)
        return dict(zip(result.keys(), map(list, zip(*result.all()))))

    @_database_errors
    def finish_run(self, run_id: int, status: str, n_images: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(schema.runs).where(schema.runs.c.id == run_id).values(
                finished_at=_now(), status=status, n_images=n_images
            ))

    # -- per image ----------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self) -> Iterator[ExportStore]:
        """Commit every ``commit_image`` inside the block in ONE transaction, when the block exits.

        Nothing is committed before then; an exception in the block (or a failing commit) rolls
        back the whole batch, so the database still ends at an image boundary. Batches do not nest.
        """
        if self._batch is not None:
            raise RuntimeError("ExportStore.batch() does not nest")
        try:
            with self.engine.begin() as conn:
                self._batch = conn
                try:
                    yield self
                finally:
                    self._batch = None
        except (DBAPIError, self.driver_error) as exc:
            raise DatabaseError(f"{self.settings.describe()}: {driver_reason(exc)}") from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """The open batch's transaction, or a new one committed when the block exits."""
        if self._batch is not None:
            yield self._batch
            return
        with self.engine.begin() as conn:
            yield conn

    @_database_errors
    def commit_image(
        self,
        image_row: dict[str, Any],
        *,
        band_rows: list[dict[str, Any]] | None = None,
        sources: np.ndarray | None = None,
        source_ids: Columns | None = None,
        catalogue: Columns | None = None,
        catalogue_rows: np.ndarray | None = None,
        lightcurves: Columns | None = None,
        lightcurve_rows: np.ndarray | None = None,
        new_sources: Columns | None = None,
        monitors: Columns | None = None,
        monitor_catalogue: Columns | None = None,
        merges: Columns | None = None,
        relabelled: Columns | None = None,
    ) -> None:
        """Write one image and everything it changed, in one transaction.

        ``band_rows`` and ``monitors`` (with their ``monitor_catalogue`` rows) are those not yet
        in the database; they go with the image that first needs them. ``source_ids`` may give
        an ``im_id`` per source: forced fits in an earlier image (new sources measured back in
        time) add to that image's ``n_forced``. ``merges`` retire sources into others: their
        light curves and newsource rows go, the earlier measurements in ``relabelled`` get their
        new src_id and parent, and each merge is recorded. Inside :meth:`batch`, the image joins
        the batch's transaction.
        """
        with self._transaction() as conn:
            if band_rows:
                conn.execute(insert(schema.frequencybands), [plain(r) for r in band_rows])
            conn.execute(insert(schema.images), [plain(image_row)])
            runs = schema.runs  # the run's image count moves with its images: right even after kill -9
            conn.execute(update(runs).where(runs.c.id == image_row["run"]).values(n_images=runs.c.n_images + 1))
            if monitors is not None:
                self._insert(conn, schema.monitor, monitors)
                self._upsert(conn, [schema.runningcatalog], monitor_catalogue, None, ["src_id"])
            if sources is not None and len(sources):
                columns = {n: sources[n] for n in sources.dtype.names if n not in NOT_EXPORTED}
                columns.update({"im_id": np.full(len(sources), image_row["id"])}, **source_ids)
                self._insert(conn, schema.extracted_sources, columns)
                earlier, counts = np.unique(columns["im_id"][columns["im_id"] != image_row["id"]], return_counts=True)
                for im_id, count in zip(earlier.tolist(), counts.tolist()):  # backfilled images: one or none
                    conn.execute(update(schema.images).where(schema.images.c.id == im_id).values(
                        n_forced=schema.images.c.n_forced + count))
            if catalogue is not None:
                self._upsert(conn, [schema.runningcatalog], catalogue, catalogue_rows, ["src_id"])
            if lightcurves is not None:  # variability and its running sums: one COPY on PostgreSQL
                self._upsert(conn, [schema.variability, schema.variability_running_averages], lightcurves,
                             lightcurve_rows, ["src_id", "freq_band"])
            if new_sources is not None and len(new_sources["src_id"]):
                ids = _next_id(conn, schema.newsource.c.id) + np.arange(len(new_sources["src_id"]))
                self._insert(conn, schema.newsource, {**new_sources, "id": ids})
            if merges is not None and len(merges["src_id"]):
                self._merge(conn, merges, relabelled)

    def _merge(self, conn: Connection, merges: Columns, relabelled: Columns) -> None:
        """Retire the merged sources (see commit_image); merges are rare, a few statements each."""
        es, news = schema.extracted_sources, schema.newsource
        retired = merges["src_id"].tolist()
        if len(relabelled["id"]):
            conn.execute(update(es).where(es.c.id == bindparam("row_id")).values(
                src_id=bindparam("new_src_id"), parent=bindparam("new_parent")),
                [{"row_id": i, "new_src_id": s, "new_parent": p} for i, s, p in
                 zip(*(relabelled[k].tolist() for k in ("id", "src_id", "parent")))])
        triggers = dict(conn.execute(
            select(news.c.src_id, news.c.trigger_xtrsrc).where(news.c.src_id.in_(retired))).all())
        conn.execute(delete(news).where(news.c.src_id.in_(retired)))
        for table in (schema.variability, schema.variability_running_averages):
            conn.execute(delete(table).where(table.c.src_id.in_(retired)))
        self._insert(conn, schema.merges, {
            **merges, "id": _next_id(conn, schema.merges.c.id) + np.arange(len(retired)),
            "newsource_trigger": np.array([triggers.get(s) for s in retired], dtype=object)})

    @_database_errors
    def history(self, src_ids: np.ndarray) -> np.ndarray:
        """Every measurement of ``src_ids`` with its image's band (HISTORY_DTYPE), for a merge."""
        es, im = schema.extracted_sources, schema.images
        columns = [es.c[n] if n in es.c else im.c[n] for n in HISTORY_DTYPE.names]
        with self.engine.connect() as conn:
            rows = conn.execute(select(*columns).join(im, im.c.id == es.c.im_id)
                                .where(es.c.src_id.in_(np.asarray(src_ids).tolist()))).all()
        return np.array([tuple(r) for r in rows], dtype=HISTORY_DTYPE)

    def _insert(self, conn: Connection, table: Table, columns: Columns) -> None:
        """Insert columnar rows with the backend's bulk path; ``columns`` must be the table's, all of them."""
        _check_columns(table, columns, exact=True)
        self.backend.insert(conn, table, columns)

    def _upsert(self, conn: Connection, tables: list[Table], columns: Columns, rows: np.ndarray | None,
                keys: list[str]) -> None:
        """Insert or update ``rows`` (default all) of columnar data in ``tables`` by primary ``keys``."""
        if rows is None:
            rows = np.arange(len(columns[keys[0]]))
        if len(rows) == 0:
            return
        for table in tables:
            _check_columns(table, columns, exact=False)
        self.backend.upsert(conn, tables, columns, rows, keys)


def _check_columns(table: Table, columns: Columns, exact: bool) -> None:
    """Refuse rows that lack a column of ``table`` (or, ``exact``, that have one it lacks):
    a column is never dropped or left NULL silently when the schema and the data drift apart."""
    missing = [c for c in table.c.keys() if c not in columns]
    unknown = [c for c in columns if c not in table.c] if exact else []
    if missing or unknown:
        raise ValueError(f"rows for {table.name} do not match its columns (trap_dask/db/schema.py): "
                         + "; ".join(f"{what}: {', '.join(names)}" for what, names in
                                     (("missing", missing), ("not in the table", unknown)) if names))


def _next_id(conn: Connection, column) -> int:
    """One past the largest id in ``column``, 1 for an empty table (our own tables count from 1)."""
    return (conn.execute(select(func.max(column))).scalar() or 0) + 1


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)
