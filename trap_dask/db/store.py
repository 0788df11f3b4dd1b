"""The export store: one interface to the export database for every backend.

Only the writer actor holds an :class:`ExportStore`. Each image is committed with
:meth:`ExportStore.commit_image` in a single transaction, so the database always holds a
consistent prefix of the run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Connection, Select, Table, bindparam, delete, func, insert, inspect, select, update
from sqlalchemy.engine import Compiled
from sqlalchemy.exc import DBAPIError, OperationalError

from trap_dask import __version__
from trap_dask.bands import Band, fixed_bands, overlapped_stored
from trap_dask.checksums import kind_for
from trap_dask.columns import Columns, concat, take
from trap_dask.db import schema
from trap_dask.db.backends import DatabaseError, DatabaseSettings, cannot_connect, driver_reason
from trap_dask.db.migrations import can_migrate, migrate
from trap_dask.sources import HISTORY_DTYPE, NOT_EXPORTED

if TYPE_CHECKING:
    from trap_dask.config import Config

log = logging.getLogger(__name__)


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

    checksums: frozenset[str] = frozenset()  #: the checksum of every file recorded with one (trap_dask.checksums)
    #: paths of the files recorded with a checksum
    paths: frozenset[str] = frozenset()
    #: paths of files recorded as rejected without a checksum: their bytes could not be read
    unreadable: frozenset[str] = frozenset()
    #: the start (UTC) of the latest image it holds that was not rejected; None: none
    latest: datetime | None = None
    #: (size in bytes, modification time in ns, checksum) of the files recorded with them, by path
    stored: Mapping[str, tuple[int, int, str]] = field(default_factory=dict)

    @property
    def checksum_kind(self) -> str:
        """The kind of checksum a run compares with these and writes (trap_dask.checksums.kind_for)."""
        return kind_for(self.checksums)


class RunTakenOver(DatabaseError):
    """A transaction of a run that another writer has taken over (marked it 'killed'): refused."""


def _database_errors(method: Callable) -> Callable:
    """Re-raise the driver's errors of a store method as one-line DatabaseErrors."""
    @functools.wraps(method)
    def wrapper(self: ExportStore, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (DBAPIError, self.driver_error) as exc:  # bulk writes use the driver's cursor directly
            raise DatabaseError(f"{self.settings.describe()}: {driver_reason(exc)}") from None

    return wrapper


#: Tables every trap-dask export database has had, whatever its schema version: what tells one
#: from another application's database (a ``schema_version`` table alone is common).
EXPORT_TABLES = frozenset({"schema_version", "images", "extracted_sources"})


def _export_tables(settings: DatabaseSettings) -> list[str]:
    """The database's tables: none (nothing at all, in any schema), or those of a trap-dask export
    database; DatabaseError if it is something else. Looked at without changing anything."""
    engine = settings.impl.looking_engine()
    try:
        with engine.connect() as conn:
            look = inspect(conn)
            tables = look.get_table_names()
            held = [name for space in look.get_schema_names() if space != "information_schema"
                    for name in (*look.get_table_names(space), *look.get_view_names(space),
                                 *(look.get_sequence_names(space) if conn.dialect.supports_sequences else ()))]
    except OperationalError:  # cannot connect (a DBAPIError too): the caller says so
        raise
    except DBAPIError as exc:  # e.g. SQLite's "file is not a database"
        raise DatabaseError(f"{settings.describe()} is not a trap-dask export database: {driver_reason(exc)}") from None
    finally:
        engine.dispose()
    if held and not EXPORT_TABLES <= set(tables):
        raise DatabaseError(f"{settings.describe()} is not a trap-dask export database")
    return tables


class ExportStore:
    """Reads and writes the export database; see trap_dask.db.schema for the tables."""

    def __init__(self, settings: DatabaseSettings):
        self.settings = settings
        self.backend = settings.impl
        self.engine = self.backend.make_engine()
        self._batch: list[ImageRows] | None = None  #: the images of an open batch()
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
            cls._replaceable(settings)
            backend.drop()
        backend.create()
        store = cls(settings)
        try:
            store._create_tables()
        except DatabaseError as exc:
            store.close()
            backend.drop()
            raise DatabaseError(f"{exc}; the new database was removed: run the same command again") from None
        return store

    @classmethod
    def prepare(cls, settings: DatabaseSettings, config: Config) -> tuple[bool, KnownImages]:
        """Create the export database of a run, or open it to append (``config.db_append``);
        returns (appending, the files it already holds).

        Appending checks that the association parameters match those of the database's latest
        run (unless ``config.accept_config_change``) and marks the runs left 'running' by a
        killed process as 'killed': call only while holding the run lock.
        """
        from trap_dask.config import AUTO, AUTO_PARAMETERS, association_differences

        def shown(name: str, value: Any) -> Any:  # as the user writes it
            return AUTO if value is None and name in AUTO_PARAMETERS else value

        if not config.db_append:
            cls.create(settings, overwrite=config.db_overwrite).close()
            return False, KnownImages()
        store = cls.open(settings)
        try:
            stored = store.latest_config()
            differences = association_differences(config, stored) if stored else {}
            if differences and not config.accept_config_change:
                changes = "; ".join(f"{name}: {shown(name, old)!r} -> {shown(name, new)!r}"
                                    for name, (old, new) in differences.items())
                keep = " ".join(_flag(name, shown(name, old)) for name, (old, new) in differences.items()
                                if shown(name, old) is not None)
                raise DatabaseError(
                    f"association parameters differ from those of {settings.describe()} ({changes}); "
                    + (f"pass {keep} to continue as its catalogue was made, or " if keep else "pass ")
                    + "--accept_config_change to use the new values from here on"
                )
            if ranges := config.frequency_bands():
                _say_overlapped_bands(ranges, store.bands())
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
            if not _export_tables(settings):
                versions = [schema.SCHEMA_VERSION]
                store._create_tables()
            else:
                with store.engine.connect() as conn:
                    versions = conn.execute(select(schema.schema_version.c.version)).scalars().all()
        except OperationalError as exc:
            store.close()
            raise cannot_connect(settings, exc) from None
        except DBAPIError as exc:  # e.g. a table it may not read
            store.close()
            raise DatabaseError(f"{settings.describe()}: {driver_reason(exc)}") from None
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

    @classmethod
    def _replaceable(cls, settings: DatabaseSettings) -> None:
        """Raise unless ``--db_overwrite`` may replace the existing database: a trap-dask export
        database (of any schema version) or an empty one, never another file or database (a FITS
        image given as --db_name by mistake, another application's data)."""
        try:
            _export_tables(settings)
        except OperationalError as exc:
            raise cannot_connect(settings, exc) from None
        except DatabaseError as exc:
            raise DatabaseError(f"{exc}; --db_overwrite replaces only those: choose another --db_name, "
                                "or remove it yourself if it is not needed") from None

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
            self.backend.create_tables(self.engine)
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
        """Mark runs still 'running' as 'killed' (call only while holding the run lock); returns the
        images they committed (their counts move with each transaction), read once they are
        marked in the same transaction: a writer of theirs that lives on waits for it and then can
        commit nothing more (_count_in_runs), so none is missed."""
        runs = schema.runs.c
        with self.engine.begin() as conn:
            self.backend.wait_for_any_lock(conn)  # a lost writer's transaction ends when its server says
            stale = list(conn.execute(select(runs.id).where(runs.status == "running")).scalars())
            if not stale:
                return 0
            conn.execute(update(schema.runs).where(runs.id.in_(stale)).values(status="killed"))
            return int(conn.execute(select(func.coalesce(func.sum(runs.n_images), 0))
                                    .where(runs.id.in_(stale))).scalar())

    @_database_errors
    def latest_config(self) -> dict[str, Any] | None:
        """The config row of the most recent run, or None for an empty database."""
        config = schema.config.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(config.key, config.value, config.type).where(
                config.run == select(func.max(config.run)).scalar_subquery())).mappings().all()
        return schema.config_values(rows) if rows else None

    @_database_errors
    def bands(self) -> list[Band]:
        """The frequency bands of the database, by id."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(schema.frequencybands).order_by(schema.frequencybands.c.band_id))
            return [Band(**row._mapping) for row in rows]

    @_database_errors
    def known_images(self) -> KnownImages:
        """The checksums of the files already in the database (with their paths, sizes and modification
        times), and the paths of those that were unreadable."""
        images = schema.images.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(images.checksum, images.url, images.rejected, images.file_size,
                                       images.file_mtime)).all()
            latest = conn.execute(select(func.max(images.taustart_ts)).where(~images.rejected)).scalar()
        return KnownImages(
            checksums=frozenset(checksum for checksum, *_ in rows if checksum),
            paths=frozenset(url for checksum, url, *_ in rows if checksum),
            unreadable=frozenset(url for checksum, url, rejected, *_ in rows if rejected and not checksum),
            latest=latest,
            stored={url: (size, mtime, checksum) for checksum, url, _, size, mtime in rows
                    if checksum and size is not None and mtime is not None},
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
    def finish_run(self, run_id: int, status: str) -> None:
        """Record a run's end. Its ``n_images`` moved in each of its transactions (a count kept by
        the writer could fall short: a batch its committer process wrote and died before saying so)."""
        with self.engine.begin() as conn:  # a run taken over (marked 'killed') keeps that status
            conn.execute(update(schema.runs).where(schema.runs.c.id == run_id, schema.runs.c.status == "running")
                         .values(finished_at=_now(), status=status))

    # -- per image ----------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self) -> Iterator[ExportStore]:
        """Commit every ``commit_image`` inside the block in ONE transaction, when the block exits.

        The images' rows are gathered and written together at the exit (:meth:`_write`): one bulk
        insert per table, each catalogue and light-curve row upserted once with its last state.
        Nothing is committed before then, and the arrays given to ``commit_image`` must not change
        until the block exits; an exception in the block (or a failing write) rolls back the whole
        batch, so the database still ends at an image boundary. Batches do not nest.
        """
        if self._batch is not None:
            raise RuntimeError("ExportStore.batch() does not nest")
        self._batch = []
        try:
            yield self
            images = self._batch
        finally:
            self._batch = None
        self._commit(images)

    @_database_errors
    def _commit(self, images: list[ImageRows]) -> None:
        """Write ``images`` (in time order) in one transaction."""
        if images:
            with self.engine.begin() as conn:
                self.backend.prepare_batch(conn, sum(len(image.sources["id"]) for image in images
                                                     if image.sources is not None))
                self._write(conn, images)

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
        the batch and is written when it ends; rows that do not match their table's columns are
        refused here, at once.
        """
        extracted = None
        if sources is not None and len(sources):
            extracted = {n: sources[n] for n in sources.dtype.names if n not in NOT_EXPORTED}
            extracted.update({"im_id": np.full(len(sources), image_row["id"])}, **source_ids)
        changed = [_rows(columns, rows) for columns, rows in
                   ((monitor_catalogue, None), (catalogue, catalogue_rows)) if columns is not None]
        image = ImageRows(
            image=plain(image_row), bands=[plain(r) for r in band_rows or []], sources=extracted,
            catalogue=_concat(changed), lightcurves=_rows(lightcurves, lightcurve_rows),
            new_sources=new_sources if new_sources is not None and len(new_sources["src_id"]) else None,
            monitors=monitors, merges=merges if merges is not None and len(merges["src_id"]) else None,
            relabelled=relabelled)
        image.check()
        if self._batch is not None:
            self._batch.append(image)
        else:
            self._commit([image])

    def _write(self, conn: Connection, images: list[ImageRows]) -> None:
        """Write ``images`` in ``conn``'s transaction, together (each table in one statement) up to an
        image that changes a light curve a merge before it in the group removed (never, in practice)."""
        first, retired = 0, np.zeros(0, np.int64)
        for i, image in enumerate(images):
            if image.lightcurves is not None and np.isin(image.lightcurves["src_id"], retired).any():
                self._write_together(conn, images[first:i])
                first, retired = i, np.zeros(0, np.int64)
            if image.merges is not None:
                retired = np.concatenate([retired, image.merges["src_id"]])
        self._write_together(conn, images[first:])

    def _count_in_runs(self, conn: Connection, images: list[ImageRows]) -> None:
        """Add the images to their runs' counts (so the count is right even after kill -9), first in
        the transaction: a run no longer 'running' was taken over (a writer started after this one
        was given up for lost marks it 'killed'), so this transaction is refused, and a writer
        that lives on after all never writes beside its successor."""
        runs = schema.runs
        for run, count in Counter(image.image["run"] for image in images).items():
            moved = conn.execute(update(runs).where(runs.c.id == run, runs.c.status == "running")
                                 .values(n_images=runs.c.n_images + count)).rowcount
            if moved != 1:
                raise RunTakenOver(f"{self.settings.describe()}: run {run} is no longer running (another writer "
                                   "took over from this one); its images are not written")

    def _write_together(self, conn: Connection, images: list[ImageRows]) -> None:
        """Write ``images`` as if one after the other: per-image rows are inserted together, catalogue
        and light-curve rows upserted once in their last state; then, in image order, the newsource
        rows and merges (a merge removes newsource and light-curve rows, and later ids follow it)."""
        self._count_in_runs(conn, images)
        bands = [row for image in images for row in image.bands]
        if bands:
            conn.execute(insert(schema.frequencybands), bands)
        named = [c for c in schema.images.c.keys() if any(c in image.image for image in images)]
        conn.execute(insert(schema.images), [{c: image.image.get(c) for c in named} for image in images])
        monitors = _concat([image.monitors for image in images if image.monitors is not None])
        if monitors is not None:
            self.backend.insert(conn, schema.monitor, monitors)
        self._insert_sources(conn, images)
        catalogue = _concat([image.catalogue for image in images if image.catalogue is not None])
        if catalogue is not None:
            self._upsert(conn, [schema.runningcatalog], catalogue, ["src_id"])
        curves = _concat([image.lightcurves for image in images if image.lightcurves is not None])
        if curves is not None:  # variability and its running sums: one COPY on PostgreSQL
            self._upsert(conn, [schema.variability, schema.variability_running_averages], curves,
                         ["src_id", "freq_band"])
        first = 0
        for i, image in enumerate(images):
            if image.merges is not None or i == len(images) - 1:
                self._insert_new_sources(conn, images[first:i + 1])
                first = i + 1
            if image.merges is not None:
                self._merge(conn, image.merges, image.relabelled)

    def _insert_new_sources(self, conn: Connection, images: list[ImageRows]) -> None:
        """Insert the images' newsource rows in one statement, numbered on from the largest id."""
        new = _concat([image.new_sources for image in images if image.new_sources is not None])
        if new is not None:
            ids = _next_id(conn, schema.newsource.c.id) + np.arange(len(new["src_id"]))
            self.backend.insert(conn, schema.newsource, {**new, "id": ids})

    def _insert_sources(self, conn: Connection, images: list[ImageRows]) -> None:
        """Insert the images' measurements in one statement; forced fits in an earlier image (new
        sources measured back in time) add to that image's ``n_forced``."""
        measured = [image for image in images if image.sources is not None]
        if not measured:
            return
        columns = _concat([image.sources for image in measured])
        self.backend.insert(conn, schema.extracted_sources, columns)
        own = np.repeat([image.image["id"] for image in measured], [len(image.sources["id"]) for image in measured])
        earlier, counts = np.unique(columns["im_id"][columns["im_id"] != own], return_counts=True)
        if len(earlier):  # backfilled images: one or none per image
            im = schema.images
            conn.execute(update(im).where(im.c.id == bindparam("earlier")).values(
                n_forced=im.c.n_forced + bindparam("count")),
                [{"earlier": i, "count": c} for i, c in zip(earlier.tolist(), counts.tolist())])

    def _merge(self, conn: Connection, merges: Columns, relabelled: Columns) -> None:
        """Retire the merged sources (see commit_image); merges are rare, a few statements each."""
        es, news = schema.extracted_sources, schema.newsource
        retired = merges["src_id"].tolist()
        if len(relabelled["id"]):  # each id once, its last relabelling
            self.backend.update(conn, es, take(relabelled, last_of_each_key([relabelled["id"]])), ["id"])
        triggers = dict(conn.execute(
            select(news.c.src_id, news.c.trigger_xtrsrc).where(news.c.src_id.in_(retired))).all())
        conn.execute(delete(news).where(news.c.src_id.in_(retired)))
        for table in (schema.variability, schema.variability_running_averages):
            conn.execute(delete(table).where(table.c.src_id.in_(retired)))
        self.backend.insert(conn, schema.merges, {
            **merges, "id": _next_id(conn, schema.merges.c.id) + np.arange(len(retired)),
            "newsource_trigger": np.array([triggers.get(s) for s in retired], dtype=object)})

    @_database_errors
    def history(self, src_ids: np.ndarray, ids: np.ndarray = ()) -> np.ndarray:
        """Every measurement of ``src_ids``, and those with the given ``ids``, with its image's band
        (HISTORY_DTYPE, in id order), for a merge.

        A merge waits for it, so the statement is compiled once per database and its rows come
        straight from the driver's cursor (no SQLAlchemy rows): ~0.5 ms less a merge than
        ``conn.execute`` (benchmarks/RESULTS.md, issue 15 round 9)."""
        values = {"src_ids": np.asarray(src_ids).tolist()}
        if len(ids):  # not an empty IN: an OR with it would keep the src_id index out of the query
            values["ids"] = np.asarray(ids).tolist()
        with self.engine.connect() as conn:
            compiled = self._history_statements[len(values)]
            expanded = compiled.construct_expanded_state(values)
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                cursor.execute(expanded.statement, expanded.positional_parameters if compiled.positional
                               else expanded.parameters)
                rows = cursor.fetchall()
            finally:
                cursor.close()
        return np.array(rows, dtype=HISTORY_DTYPE)

    @functools.cached_property
    def _history_statements(self) -> dict[int, Compiled]:
        """:meth:`history`'s statements compiled for this database, by the number of IN lists."""
        return {n: statement.compile(dialect=self.engine.dialect) for n, statement in _HISTORY.items()}

    def _upsert(self, conn: Connection, tables: list[Table], columns: Columns, keys: list[str]) -> None:
        """Insert or update columnar rows in ``tables`` by their primary ``keys``; of rows with the same
        key, the last wins."""
        if len(columns[keys[0]]):
            self.backend.upsert(conn, tables, columns, last_of_each_key([columns[k] for k in keys]), keys)


def _history_statement(with_ids: bool) -> Select:
    """The measurements of the src_ids ``src_ids`` (and, ``with_ids``, of the ids ``ids``) with their
    images' bands, in id order: HISTORY_DTYPE's columns; the IN lists expand when executed."""
    es, im = schema.extracted_sources, schema.images
    wanted = es.c.src_id.in_(bindparam("src_ids", expanding=True))
    if with_ids:
        wanted = wanted | es.c.id.in_(bindparam("ids", expanding=True))
    return (select(*(es.c[n] if n in es.c else im.c[n] for n in HISTORY_DTYPE.names))
            .join(im, im.c.id == es.c.im_id).where(wanted).order_by(es.c.id))


#: ExportStore.history's statements, by the number of IN lists
_HISTORY = {1: _history_statement(False), 2: _history_statement(True)}


@dataclass(frozen=True)
class ImageRows:
    """What one image writes, as ``commit_image`` was given it, with the rows to upsert taken out."""

    image: dict[str, Any]  #: its images row
    bands: list[dict[str, Any]]  #: frequencybands rows first needed by this image
    sources: Columns | None  #: extracted_sources, every column
    catalogue: Columns | None  #: runningcatalog rows it changed (monitor sources first)
    lightcurves: Columns | None  #: variability rows with their running sums it changed
    new_sources: Columns | None  #: newsource rows but their ids
    monitors: Columns | None  #: monitor rows first registered with this image
    merges: Columns | None  #: merges (MERGE_COLUMNS) it made
    relabelled: Columns | None  #: earlier measurements a merge moved (id, src_id, parent)

    def check(self) -> None:
        """Refuse rows that do not match their table's columns (ValueError); the store numbers
        newsource and merges rows (and finds each merge's newsource trigger) itself."""
        numbered = {"id": ()}
        for table, columns, exact in ((schema.extracted_sources, self.sources, True),
                                      (schema.monitor, self.monitors, True),
                                      (schema.newsource, self.new_sources and {**self.new_sources, **numbered}, True),
                                      (schema.merges, self.merges and {**self.merges, **numbered,
                                                                       "newsource_trigger": ()}, True),
                                      (schema.runningcatalog, self.catalogue, False),
                                      (schema.variability, self.lightcurves, False),
                                      (schema.variability_running_averages, self.lightcurves, False)):
            if columns is not None:
                _check_columns(table, columns, exact)


def _say_overlapped_bands(ranges: list[tuple[float, float]], stored: list[Band]) -> None:
    """Warn of each fixed band (low, high in Hz) of an append that shares frequencies with a band
    of the database without being it: the images appended there go to the new band."""
    for new, old in overlapped_stored(fixed_bands(ranges, stored), stored):
        log.warning("frequency_band [%.10g, %.10g] Hz overlaps band %d of the database [%.10g, %.10g] Hz: the images "
                    "appended there go to the new band, and their light curves' variability is measured apart "
                    "from the earlier images'", new.freq_low, new.freq_high, old.band_id, old.freq_low,
                    old.freq_high)


def _rows(columns: Columns | None, rows: np.ndarray | None) -> Columns | None:
    """``rows`` of columnar data (default all), None for none."""
    if columns is None or (rows is not None and len(rows) == 0):
        return None
    return dict(columns) if rows is None else take(columns, rows)


def _concat(parts: list[Columns | None]) -> Columns | None:
    """Columnar parts with the same columns, one after the other (None for none)."""
    parts = [part for part in parts if part is not None]
    if len(parts) <= 1:
        return parts[0] if parts else None
    return concat(parts)


def last_of_each_key(keys: list[np.ndarray]) -> np.ndarray:
    """Indices of the last row of each distinct key (a tuple of ``keys`` columns), in key order."""
    n = len(keys[0])
    order = np.lexsort([np.arange(n), *reversed(keys)])
    ends = np.ones(n, bool)
    ends[:-1] = np.any([k[order][1:] != k[order][:-1] for k in keys], axis=0) if n else ends[:-1]
    return order[ends]


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


def _flag(name: str, value: Any) -> str:
    """The command-line flag that sets parameter ``name`` to ``value`` (a switch for a bool)."""
    import shlex

    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {shlex.quote(str(value))}"
