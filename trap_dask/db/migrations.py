"""Upgrades of an export database made by an earlier trap-dask, one schema version at a time.

``MIGRATIONS[v](conn, backend)`` takes a database of schema version ``v`` to ``v + 1`` inside the
caller's transaction; :func:`migrate` applies the steps in order and records the new version. The
TraP 1.x tables keep their columns (steps add tables, and columns with NULL for what existed
before; version 3 turns ``config`` into TraP's own key/value layout), so TraP 1.x readers and
earlier notebooks of the science tables keep working on an upgraded database.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sqlalchemy import Connection, Table, bindparam, delete, insert, inspect, select, update

from trap_dask import __version__
from trap_dask.db import schema
from trap_dask.db.backends import Backend
from trap_dask.shapes import SHAPE_SUMS, intrinsic_from_axes, set_intrinsic_shapes, shape_sum_increments, sky_cov
from trap_dask.sources import SOURCE_DTYPE


def add_missing_columns(conn: Connection, table: Table) -> None:
    """ALTER TABLE ADD COLUMN for each column of ``table`` the database lacks (NULL in old rows)."""
    present = {column["name"] for column in inspect(conn).get_columns(table.name)}
    quote = conn.dialect.identifier_preparer.quote
    for column in table.columns:
        if column.name not in present:
            conn.exec_driver_sql(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} "
                                 f"{column.type.compile(dialect=conn.dialect)}")


def _v1_to_v2(conn: Connection, backend: Backend) -> None:
    """`images` gains each image's systematic error and measured astrometric offsets and scatter;
    `runningcatalog` gains `merged_into` (-1 for the sources so far) and the `merges` table is added;
    the running sums move from `variability` to `_variability_running_averages` (as in TraP 1.4.0).
    Ids already given keep their values (version 1 counted from 1); new ones follow them."""
    add_missing_columns(conn, schema.images)
    add_missing_columns(conn, schema.runningcatalog)
    conn.execute(update(schema.runningcatalog).values(merged_into=-1))
    schema.merges.create(conn, checkfirst=True)
    sums = schema.variability_running_averages
    sums.create(conn, checkfirst=True)
    quote = conn.dialect.identifier_preparer.quote
    names = ", ".join(quote(c.name) for c in sums.columns)
    conn.exec_driver_sql(f"INSERT INTO {quote(sums.name)} ({names}) "
                         f"SELECT {names} FROM {quote(schema.variability.name)}")
    for column in sums.columns:
        if not column.primary_key:
            conn.exec_driver_sql(f"ALTER TABLE {quote(schema.variability.name)} DROP COLUMN {quote(column.name)}")


def _v2_to_v3(conn: Connection, backend: Backend) -> None:
    """`config` becomes one row per parameter (run, section, key, value, type), as TraP 1.x keeps
    it, instead of a column per parameter (a new parameter no longer changes the schema); on
    PostgreSQL the tables updated by every image get fillfactor 50 (their updates stay on the page)."""
    quote = conn.dialect.identifier_preparer.quote
    wide = conn.exec_driver_sql(f"SELECT * FROM {quote(schema.config.name)} ORDER BY {quote('run')}").mappings().all()
    conn.exec_driver_sql(f"DROP TABLE {quote(schema.config.name)}")
    schema.config.create(conn)
    rows: list[dict] = []
    for row in wide:
        parameters = {key: value for key, value in row.items() if key != "run"}
        rows += schema.config_rows(row["run"], parameters, first_id=len(rows) + 1)
    if rows:
        conn.execute(insert(schema.config), rows)
    for table, options in schema.STORAGE.items():
        backend.set_storage(conn, table, options)


def _v3_to_v4(conn: Connection, backend: Backend) -> None:
    """On PostgreSQL, `extracted_sources.im_id` no longer has a foreign key to `images` (checked
    row by row, it doubled the time to write an image's measurements; the writer commits an image
    and its measurements together). SQLite keeps it. No table or column changes."""
    if conn.dialect.name != "postgresql":
        return
    quote = conn.dialect.identifier_preparer.quote
    table = schema.extracted_sources.name
    for key in inspect(conn).get_foreign_keys(table):
        if key["constrained_columns"] == ["im_id"] and key["referred_table"] == schema.images.name:
            conn.exec_driver_sql(f"ALTER TABLE {quote(table)} DROP CONSTRAINT {quote(key['name'])}")


def _v4_to_v5(conn: Connection, backend: Backend) -> None:
    """`variability.eta_int` loses its index: every image changes the eta_int of many light curves,
    and the index made each of those updates write a new index entry (on PostgreSQL, off the page).
    No table or column changes."""
    conn.exec_driver_sql(f"DROP INDEX IF EXISTS {conn.dialect.identifier_preparer.quote('ix_variability_eta')}")


def _v5_to_v6(conn: Connection, backend: Backend) -> None:
    """`images` gains `file_size` and `file_mtime` (NULL for the images so far): an append
    recognises a file already in the database by its path, size and modification time without
    reading it, and checksums only the others."""
    add_missing_columns(conn, schema.images)


def _v6_to_v7(conn: Connection, backend: Backend) -> None:
    """`images` gains `xtr_outline`, points around each image's extraction region (NULL for the
    images so far, which keep their circle alone): a source counts as covered by an earlier image
    only inside it, not anywhere in the circle round its corners."""
    add_missing_columns(conn, schema.images)


#: Measurements read at a time by the upgrade to schema 8 (~100 bytes each in numpy).
MIGRATION_ROWS = 100_000


def _v7_to_v8(conn: Connection, backend: Backend) -> None:
    """`runningcatalog` gains the running sums of each source's intrinsic shape (`acc_shape_weight`,
    `acc_shape_ee`, `acc_shape_en`, `acc_shape_nn`), with which a resolved source is force-fitted
    with its own shape instead of the beam's: filled from the detections so far (their stored axes
    less the beam, which near a pole or far out in a wide field is not quite how the run turns the
    beam at each source), a merged-away source's into the one it was merged into."""
    add_missing_columns(conn, schema.runningcatalog)
    sources, images = schema.extracted_sources, schema.images
    query = (select(sources.c.src_id, sources.c.semimajor_axis, sources.c.semiminor_axis,
                    sources.c.parallactic_angle, sources.c.int_flux, sources.c.int_flux_err, sources.c.gaussian_fit,
                    images.c.rb_smaj, images.c.rb_smin, images.c.rb_pa)
             .join(images, images.c.id == sources.c.im_id).where(sources.c.is_force_fit.is_(False)))
    table = schema.runningcatalog
    src_ids = np.array(conn.execute(select(table.c.src_id).order_by(table.c.src_id)).scalars().all(), dtype="i8")
    sums = {name: np.zeros(len(src_ids)) for name in SHAPE_SUMS}
    for part in conn.execute(query.execution_options(yield_per=MIGRATION_ROWS)).partitions():
        columns = [np.array(column, dtype=float) for column in zip(*part)]
        detections = np.zeros(len(part), SOURCE_DTYPE)
        for name, column in zip(("semimajor_axis", "semiminor_axis", "parallactic_angle", "int_flux",
                                 "int_flux_err", "gaussian_fit"), columns[1:7]):
            detections[name] = np.nan_to_num(column, nan=0.0) if name == "gaussian_fit" else column
        beams = sky_cov(columns[7] * 3600.0, columns[8] * 3600.0, columns[9])
        set_intrinsic_shapes(detections, intrinsic_from_axes(detections, beams))
        increments = shape_sum_increments(detections, beams)
        row = np.searchsorted(src_ids, columns[0].astype("i8"))
        for name in SHAPE_SUMS:
            np.add.at(sums[name], row, increments[name])
    # as a run merges: the retired source's sums (its measurements set aside) go to the kept one
    merges = schema.merges.c
    for drop, keep in conn.execute(select(merges.src_id, merges.merged_into).order_by(merges.id)).all():
        drop, keep = np.searchsorted(src_ids, [drop, keep])
        for name in SHAPE_SUMS:
            sums[name][keep] += sums[name][drop]
            sums[name][drop] = 0.0
    conn.execute(update(table).values({f"acc_shape_{name}": 0.0 for name in SHAPE_SUMS}))
    values = [{"key": int(src_ids[i]), **{f"v_{name}": float(sums[name][i]) for name in SHAPE_SUMS}}
              for i in np.flatnonzero(sums["weight"]).tolist()]
    if values:
        conn.execute(update(table).where(table.c.src_id == bindparam("key"))
                     .values({f"acc_shape_{name}": bindparam(f"v_{name}") for name in SHAPE_SUMS}), values)


def _v8_to_v9(conn: Connection, backend: Backend) -> None:
    """`images.checksum` of a new database is `xxh3:` and the file's 128-bit XXH3 hash (hex), 7x faster
    to compute than the sha256 (hex) it was: a database upgraded from an earlier version keeps
    its sha256 checksums and goes on with them (trap_dask.checksums). No table or column changes;
    the new version keeps a trap-dask that writes sha256 from appending to a database of XXH3."""


MIGRATIONS: dict[int, Callable[[Connection, Backend], None]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4,
                                                                4: _v4_to_v5, 5: _v5_to_v6, 6: _v6_to_v7,
                                                                7: _v7_to_v8, 8: _v8_to_v9}


def can_migrate(version: int) -> bool:
    return all(v in MIGRATIONS for v in range(version, schema.SCHEMA_VERSION))


def migrate(conn: Connection, version: int, now, backend: Backend) -> None:
    """Bring a database of schema ``version`` to the current one (in ``conn``'s transaction)."""
    for step in range(version, schema.SCHEMA_VERSION):
        MIGRATIONS[step](conn, backend)
    conn.execute(delete(schema.schema_version))
    conn.execute(insert(schema.schema_version).values(
        version=schema.SCHEMA_VERSION, software_version=__version__, created_at=now))
