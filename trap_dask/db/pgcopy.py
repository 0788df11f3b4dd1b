"""PostgreSQL bulk writes with COPY: inserts, and upserts through a temporary staging table.

Columns are formatted to CSV with numpy (floats in their shortest round-trip form, so values
come back bit-identical; NaN as NULL) and streamed through psycopg2's ``copy_expert`` inside
the caller's transaction.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
from sqlalchemy import Connection, Table

Columns = Mapping[str, np.ndarray]


def csv_column(values: np.ndarray) -> list[str]:
    """One column as CSV text fields: NULL (empty) for NaN/None, 't'/'f' for booleans.

    Floats use Python's shortest round-trip ``repr`` (several times faster than numpy's
    ``astype(str)``), so they are stored bit-identical.
    """
    if values.dtype.kind == "b":
        return ["t" if v else "f" for v in values.tolist()]
    if values.dtype.kind == "f":
        return ["" if text == "nan" else text for text in map(repr, values.tolist())]
    return ["" if v is None else str(v) for v in values.tolist()]


def _csv(columns: Columns, names: Sequence[str], rows: np.ndarray | None) -> io.StringIO:
    fields = [csv_column(columns[n] if rows is None else columns[n][rows]) for n in names]
    return io.StringIO("".join(",".join(row) + "\n" for row in zip(*fields)))


def _copy(conn: Connection, target: str, names: Sequence[str], data: io.StringIO) -> None:
    quote = conn.dialect.identifier_preparer.quote
    sql = f"COPY {target} ({', '.join(quote(n) for n in names)}) FROM STDIN WITH (FORMAT csv)"
    with conn.connection.dbapi_connection.cursor() as cursor:
        cursor.copy_expert(sql, data)


def copy_insert(conn: Connection, table: Table, columns: Columns) -> None:
    """Insert every row of ``columns`` into ``table`` with COPY."""
    names = [c for c in table.c.keys() if c in columns]
    _copy(conn, conn.dialect.identifier_preparer.format_table(table), names, _csv(columns, names, None))


def copy_upsert(conn: Connection, table: Table, columns: Columns, rows: np.ndarray, keys: Sequence[str]) -> None:
    """Insert or update ``rows`` of ``columns`` in ``table`` by primary ``keys``, via a staging table."""
    quote = conn.dialect.identifier_preparer.quote
    target = conn.dialect.identifier_preparer.format_table(table)
    staging = quote(f"staging_{table.name}")
    names = list(table.c.keys())
    conn.exec_driver_sql(f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} (LIKE {target})")
    _copy(conn, staging, names, _csv(columns, names, rows))
    updates = ", ".join(f"{quote(n)} = EXCLUDED.{quote(n)}" for n in names if n not in keys)
    conn.exec_driver_sql(
        f"INSERT INTO {target} SELECT * FROM {staging} "
        f"ON CONFLICT ({', '.join(quote(k) for k in keys)}) DO UPDATE SET {updates}"
    )
    conn.exec_driver_sql(f"DELETE FROM {staging}")
