"""Upgrades of an export database made by an earlier trap-dask, one schema version at a time.

``MIGRATIONS[v]`` takes a database of schema version ``v`` to ``v + 1`` inside the caller's
transaction; :func:`migrate` applies the steps in order and records the new version. Each step
only adds (tables, columns with NULL for what existed before), so TraP 1.x readers and earlier
notebooks keep working on an upgraded database.
"""

from __future__ import annotations

from typing import Callable

from sqlalchemy import Connection, Table, delete, insert, inspect, update

from trap_dask import __version__
from trap_dask.db import schema


def add_missing_columns(conn: Connection, table: Table) -> None:
    """ALTER TABLE ADD COLUMN for each column of ``table`` the database lacks (NULL in old rows)."""
    present = {column["name"] for column in inspect(conn).get_columns(table.name)}
    quote = conn.dialect.identifier_preparer.quote
    for column in table.columns:
        if column.name not in present:
            conn.exec_driver_sql(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} "
                                 f"{column.type.compile(dialect=conn.dialect)}")


def _v1_to_v2(conn: Connection) -> None:
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
    conn.exec_driver_sql(f"INSERT INTO {quote(sums.name)} ({names}) SELECT {names} FROM {quote(schema.variability.name)}")
    for column in sums.columns:
        if not column.primary_key:
            conn.exec_driver_sql(f"ALTER TABLE {quote(schema.variability.name)} DROP COLUMN {quote(column.name)}")


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2}


def can_migrate(version: int) -> bool:
    return all(v in MIGRATIONS for v in range(version, schema.SCHEMA_VERSION))


def migrate(conn: Connection, version: int, now) -> None:
    """Bring a database of schema ``version`` to the current one (in ``conn``'s transaction)."""
    for step in range(version, schema.SCHEMA_VERSION):
        MIGRATIONS[step](conn)
    conn.execute(delete(schema.schema_version))
    conn.execute(insert(schema.schema_version).values(
        version=schema.SCHEMA_VERSION, software_version=__version__, created_at=now))
