"""Helpers for tests that run the pipeline against any backend and compare database contents."""

from __future__ import annotations

from sqlalchemy import select

from trap_dask.config import build_config
from trap_dask.db import schema
from trap_dask.db.backends import DatabaseSettings, make_engine
from trap_dask.pipeline import run_pipeline

#: Science tables and the columns that differ between one run and several by design.
COMPARED = {
    "images": ("run",), "extracted_sources": (), "variability": (), "newsource": (),
    "runningcatalog": (), "frequencybands": (), "monitor": (),
}


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


