"""Helpers for tests that run the pipeline against any backend and compare database contents."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy import select

from trap_dask.config import build_config
from trap_dask.db import schema
from trap_dask.db.backends import DatabaseSettings, make_engine
from trap_dask.pipeline import run_pipeline

#: Science tables and the columns that differ between one run and several by design (and the
#: files' stamps: a copy of an image has its own size or modification time).
COMPARED = {
    "images": ("run", "file_size", "file_mtime"), "extracted_sources": (), "variability": (), "newsource": (),
    "runningcatalog": (), "frequencybands": (), "monitor": (),
}


#: Runs a Python command line (``-m module ...``) in place of itself once the kernel is asked to
#: SIGKILL it when its parent (pytest) dies: a pytest killed by a CI timeout or by hand would
#: otherwise leave the runs it started (in sessions of their own) going on for minutes.
_DIES_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
                     "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def spawn(command: list[str], **popen) -> subprocess.Popen:
    """A Python command line (``[sys.executable, ...]``) in a session of its own (a test may kill
    its whole process group), killed with the test session (Linux; elsewhere it outlives a killed pytest)."""
    if sys.platform == "linux":
        command = [command[0], "-c", _DIES_WITH_PARENT, *command[1:]]
    return subprocess.Popen(command, start_new_session=True, **popen)


def flags(settings: DatabaseSettings) -> dict:
    base = {"db_backend": settings.backend, "db_name": settings.name, "scheduler": "threads", "nr_threads": 2,
            "detection_threshold": 5.0, "monitor_loc": "[[150.01, 30.01]]"}
    if settings.backend == "postgres":
        base.update(db_host=settings.host, db_port=settings.port, db_user=settings.user)
    return base


def run(settings: DatabaseSettings, inputs, **extra):
    values = {"input_images": tuple(inputs), **flags(settings), **extra}
    return run_pipeline(build_config(values, {}, None))


def dump(settings: DatabaseSettings) -> dict[str, list[tuple]]:
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            out = {}
            for name, skip in COMPARED.items():
                table = schema.metadata.tables[name]
                cols = [c for c in table.c if c.name not in skip]
                out[name] = conn.execute(select(*cols).order_by(*table.primary_key.columns)).all()
            return out
    finally:
        engine.dispose()




def same_tables(a: dict[str, list[tuple]], b: dict[str, list[tuple]], rel: float = 1e-9) -> bool:
    """Whether two dumps hold the same rows, floats equal to ``rel``: a run whose images were measured
    again after a lost worker may differ in the last digits (numpy's vectorised sums depend on the
    arrays' alignment in memory), never in what was linked to what."""
    import math

    def same(x, y) -> bool:
        if isinstance(x, float) and isinstance(y, float):
            return math.isclose(x, y, rel_tol=rel, abs_tol=1e-300) or (math.isnan(x) and math.isnan(y))
        return x == y

    return a.keys() == b.keys() and all(
        len(a[t]) == len(b[t]) and all(len(r) == len(s) and all(map(same, r, s)) for r, s in zip(a[t], b[t]))
        for t in a)


def schema_versions(settings: DatabaseSettings) -> list[int]:
    """The export schema versions a database records (one, after an upgrade)."""
    engine = make_engine(settings)
    try:
        with engine.connect() as conn:
            return conn.execute(select(schema.schema_version.c.version)).scalars().all()
    finally:
        engine.dispose()


def to_schema_7(settings: DatabaseSettings) -> None:
    """Turn a database back into export schema version 7: no sums of the sources' shapes."""
    from trap_dask.shapes import SHAPE_SUMS

    engine = make_engine(settings)
    with engine.begin() as conn:
        for name in SHAPE_SUMS:
            conn.exec_driver_sql(f"ALTER TABLE runningcatalog DROP COLUMN acc_shape_{name}")
        conn.execute(schema.schema_version.update().values(version=7))
    engine.dispose()
