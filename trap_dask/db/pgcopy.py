"""PostgreSQL bulk writes with binary COPY: inserts, and upserts through a temporary staging table.

Each column is encoded with numpy straight into PostgreSQL's binary COPY format (big-endian
int4/int8/float8, booleans, timestamps as microseconds since 2000-01-01, UTF-8 text; NaN and None
as NULL), so floats arrive bit-identical and nothing is formatted as text per value. The rows
are streamed through psycopg2's ``copy_expert`` inside the caller's transaction.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy import BigInteger, Boolean, Connection, DateTime, Float, Integer, String, Table

from trap_dask.columns import Columns

_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_TRAILER = struct.pack(">h", -1)
_EPOCH = np.datetime64("2000-01-01T00:00:00", "us")


def _nulls(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind == "O":
        return np.array([v is None or (isinstance(v, float) and v != v) for v in values.tolist()], bool)
    if values.dtype.kind == "M":
        return np.isnat(values)
    return np.zeros(len(values), bool)


def _filled(values: np.ndarray, null: np.ndarray, fill) -> np.ndarray:
    if values.dtype.kind != "O" or not null.any():
        return values
    values = values.copy()
    values[null] = fill
    return values


def _python_values(values: np.ndarray) -> list:
    """A column as Python values for the driver, NULL (NaN, NaT, None) as None."""
    null = _nulls(values)
    if not null.any():
        return values.tolist()
    return [None if missing else value for value, missing in zip(values.tolist(), null.tolist())]


def encode_column(values: np.ndarray, sqltype) -> tuple[np.ndarray, np.dtype, np.ndarray]:
    """One column's binary COPY fields: its values as a record field of ``dtype`` (big-endian, fixed
    width; texts padded with NUL bytes, their lengths say where each ends) and the lengths (n,),
    -1 for NULL (its field's bytes are then left out)."""
    values = np.asarray(values)
    null = _nulls(values)
    if isinstance(sqltype, Boolean):
        data, dtype = _filled(values, null, False).astype(bool), np.dtype("u1")
    elif isinstance(sqltype, Integer):
        dtype = np.dtype(">i8" if isinstance(sqltype, BigInteger) else ">i4")
        data = _filled(values, null, 0)
        if data.dtype.kind == "f":
            data = np.where(null, 0, data)
    elif isinstance(sqltype, Float):  # Double too
        data, dtype = _filled(values, null, np.nan), np.dtype(">f8")
    elif isinstance(sqltype, DateTime):
        if values.dtype.kind == "M":
            stamps = values.astype("datetime64[us]")
        else:  # datetime objects, None for NULL; a light curve's times repeat: convert each once
            cache: dict = {}
            stamps = np.array([cache[v] if v in cache else cache.setdefault(v, np.datetime64(v, "us"))
                               for v in _filled(values, null, None).tolist()], dtype="datetime64[us]")
        data, dtype = np.where(np.isnat(stamps), 0, (stamps - _EPOCH).astype(np.int64)), np.dtype(">i8")
    elif isinstance(sqltype, String):  # Text too
        encoded = [b"" if null[i] else str(v).encode() for i, v in enumerate(values.tolist())]
        lengths = np.array([len(e) for e in encoded], np.int32)
        data = np.array(encoded, dtype=f"S{max(lengths.max(initial=0), 1)}")
        return data, data.dtype, np.where(null, -1, lengths).astype(np.int32)
    else:
        raise TypeError(f"no binary COPY encoding for {sqltype!r}")
    return data, dtype, np.where(null, -1, dtype.itemsize).astype(np.int32)


def binary_copy_data(types: Mapping[str, Any], columns: Columns, names: Sequence[str],
                     rows: np.ndarray | None) -> bytes:
    """The rows of ``columns`` (``names`` in order, ``rows`` or all; ``types``: each one's SQL
    type) as a binary COPY stream: one record array of every tuple at its fields' full widths,
    filled a column at a time, then the bytes past each field's length (NULLs, shorter texts) left out."""
    n = len(columns[names[0]]) if rows is None else len(rows)
    if n == 0:
        return _HEADER + _TRAILER
    fields = [encode_column(columns[name] if rows is None else columns[name][rows], types[name])
              for name in names]
    layout = np.dtype([("count", ">i2")] + [item for i, (_, dtype, _) in enumerate(fields)
                                            for item in ((f"length{i}", ">i4"), (f"value{i}", dtype))])
    tuples = np.empty(n, dtype=layout)
    tuples["count"] = len(names)
    for i, (data, _, lengths) in enumerate(fields):
        tuples[f"length{i}"], tuples[f"value{i}"] = lengths, data
    short = [i for i, (_, dtype, lengths) in enumerate(fields) if (lengths != dtype.itemsize).any()]
    if not short:
        return _HEADER + tuples.tobytes() + _TRAILER
    matrix = tuples.view(np.uint8).reshape(n, layout.itemsize)
    keep = np.ones(matrix.shape, bool)
    for i in short:
        dtype, offset = layout.fields[f"value{i}"]
        keep[:, offset : offset + dtype.itemsize] = np.arange(dtype.itemsize) < np.maximum(fields[i][2], 0)[:, None]
    return _HEADER + matrix[keep].tobytes() + _TRAILER


def _copy(conn: Connection, target: str, names: Sequence[str], data: bytes) -> None:
    quote = conn.dialect.identifier_preparer.quote
    sql = f"COPY {target} ({', '.join(quote(n) for n in names)}) FROM STDIN WITH (FORMAT binary)"
    with conn.connection.dbapi_connection.cursor() as cursor:
        cursor.copy_expert(sql, io.BytesIO(data))


def copy_insert(conn: Connection, table: Table, columns: Columns) -> None:
    """Insert every row of ``columns`` into ``table`` with COPY."""
    names = [c for c in table.c.keys() if c in columns]
    _copy(conn, conn.dialect.identifier_preparer.format_table(table), names,
          binary_copy_data({c.name: c.type for c in table.columns}, columns, names, None))


def copy_upsert(conn: Connection, tables: Sequence[Table], columns: Columns, rows: np.ndarray,
                keys: Sequence[str]) -> None:
    """Insert or update ``rows`` of ``columns`` in each of ``tables`` by their primary ``keys``:
    one COPY into a staging table holding the columns of all of them, then, in one round trip, an
    UPDATE of the rows each table has and an INSERT of those it lacks (``rows`` hold each key
    once). Together they took 20-35% less server time than ``INSERT .. ON CONFLICT DO UPDATE``,
    which tries each row as an insert first (benchmarks/RESULTS.md, issue 15 round 6)."""
    quote = conn.dialect.identifier_preparer.quote
    types = {c.name: c.type for table in tables for c in table.columns}
    staging = quote("staging_" + "_".join(table.name.strip("_") for table in tables))
    listed = ", ".join(f"{quote(n)} {t.compile(dialect=conn.dialect)}" for n, t in types.items())
    conn.exec_driver_sql(f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} ({listed})")
    _copy(conn, staging, list(types), binary_copy_data(types, columns, list(types), rows))
    match = " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in keys)
    statements = []
    for table in tables:
        target = conn.dialect.identifier_preparer.format_table(table)
        names = ", ".join(quote(n) for n in table.c.keys())
        updates = ", ".join(f"{quote(n)} = s.{quote(n)}" for n in table.c.keys() if n not in keys)
        statements += [f"UPDATE {target} AS t SET {updates} FROM {staging} AS s WHERE {match}",
                       f"INSERT INTO {target} ({names}) SELECT {names} FROM {staging} AS s "
                       f"WHERE NOT EXISTS (SELECT FROM {target} AS t WHERE {match})"]
    statements.append(f"TRUNCATE {staging}")  # not DELETE: nothing vacuums temporary tables
    with conn.connection.dbapi_connection.cursor() as cursor:
        cursor.execute("; ".join(statements))


def array_update(conn: Connection, table: Table, columns: Columns, keys: Sequence[str]) -> None:
    """Set the other columns of ``columns`` in the rows of ``table`` whose ``keys`` they give: one
    UPDATE joined to the columns passed as arrays (``unnest``), one round trip. For the few
    hundred rows of a merge's relabelling; a statement per row would be a round trip each, and a
    staging table (as :func:`copy_upsert`) took longer at that size (benchmarks/RESULTS.md, issue
    15 round 9). NaN goes as NULL, as in a COPY."""
    quote = conn.dialect.identifier_preparer.quote
    names = [c for c in table.c.keys() if c in columns]
    arrays = ", ".join(f"%s::{table.c[n].type.compile(dialect=conn.dialect)}[]" for n in names)
    updates = ", ".join(f"{quote(n)} = s.{quote(n)}" for n in names if n not in keys)
    match = " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in keys)
    values = [_python_values(np.asarray(columns[n])) for n in names]
    with conn.connection.dbapi_connection.cursor() as cursor:
        cursor.execute(f"UPDATE {conn.dialect.identifier_preparer.format_table(table)} AS t SET {updates} "
                       f"FROM unnest({arrays}) AS s({', '.join(quote(n) for n in names)}) WHERE {match}", values)
