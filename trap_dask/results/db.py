"""Reading an export database into pandas DataFrames (SQLite file or PostgreSQL, read only).

``db`` anywhere in :mod:`trap_dask.results` is one of: a SQLite file path, a SQLAlchemy URL
(``postgresql://user@host:5432/name``), a :class:`~trap_dask.db.backends.DatabaseSettings`, or
an open SQLAlchemy ``Engine`` (left open).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine, create_engine, inspect, make_url, text
from sqlalchemy.exc import DBAPIError

from trap_dask.db.backends import DatabaseError, DatabaseSettings, driver_reason, make_engine

#: Measurement columns read for light curves, and the image columns they are joined with.
MEASUREMENT_COLUMNS = ("id", "src_id", "parent", "im_id", "ra", "dec", "ra_fit_err", "dec_fit_err",
                       "peak_flux", "peak_flux_err", "int_flux", "int_flux_err",
                       "significance_detection_level", "is_force_fit", "is_duplicate")
IMAGE_COLUMNS = ("taustart_ts", "freq_band", "url", "rb_smaj", "rb_smin", "rb_pa")


@contextlib.contextmanager
def connect(db: Any) -> Iterator[Engine]:
    """An engine on the export database ``db``; disposed afterwards unless it was given."""
    if isinstance(db, Engine):
        yield db
        return
    if isinstance(db, DatabaseSettings):
        engine = make_engine(db)
    elif "://" in str(db):
        url = make_url(str(db))
        if url.drivername in ("postgresql", "postgres"):  # the driver trap-dask installs
            url = url.set(drivername="postgresql+psycopg2")
        engine = create_engine(url, hide_parameters=True)
    else:
        path = Path(db)
        if not path.is_file():
            raise DatabaseError(f"no SQLite export database at {path}")
        engine = create_engine(f"sqlite:///{path.resolve()}", hide_parameters=True)  # only SELECTs
    # what messages name it by, never with a password
    shown = db.describe() if isinstance(db, DatabaseSettings) else (
        engine.url.render_as_string(hide_password=True) if "://" in str(db) else str(db))
    try:
        try:
            with engine.connect() as conn:
                tables = set(inspect(conn).get_table_names())
        except DBAPIError as exc:  # SQLite's "file is not a database"; a server's refusal
            raise DatabaseError(f"{shown}: {driver_reason(exc)}") from None
        if "extracted_sources" not in tables or "variability" not in tables:
            raise DatabaseError(f"{shown} is not a trap-dask export database (no extracted_sources/variability)")
        yield engine
    finally:
        engine.dispose()


def read_sql(engine: Engine, sql: str, **params: Any) -> pd.DataFrame:
    with engine.connect() as conn:
        frame = pd.read_sql_query(text(sql), conn, params=params)
    for column in frame.columns:  # SQLite returns booleans as 0/1 and times as text
        if column.startswith("is_") or column == "rejected":
            frame[column] = frame[column].astype(bool)
        elif column.endswith("_ts") or column.endswith("_time"):
            frame[column] = pd.to_datetime(frame[column])
    return frame


def images(engine: Engine) -> pd.DataFrame:
    """The ``images`` table with each band's central frequency (``freq_central``, Hz), by id."""
    return read_sql(engine, "SELECT i.*, b.freq_central FROM images i "
                            "LEFT JOIN frequencybands b ON b.band_id = i.freq_band ORDER BY i.id")


def measurements(engine: Engine, src_id: int | None = None) -> pd.DataFrame:
    """Extracted sources with the time, band, file and beam of their image, in time order."""
    cols = ", ".join([f"x.{c}" for c in MEASUREMENT_COLUMNS] + [f"i.{c}" for c in IMAGE_COLUMNS])
    where = "" if src_id is None else "WHERE x.src_id = :src_id"
    params = {} if src_id is None else {"src_id": int(src_id)}
    return read_sql(engine, f"SELECT {cols} FROM extracted_sources x JOIN images i ON i.id = x.im_id "
                            f"{where} ORDER BY i.taustart_ts, x.id", **params)


def variability(engine: Engine) -> pd.DataFrame:
    """The ``variability`` table (forced fits counted) with each band's central frequency."""
    return read_sql(engine, "SELECT v.*, b.freq_central FROM variability v "
                            "LEFT JOIN frequencybands b ON b.band_id = v.freq_band ORDER BY v.src_id, v.freq_band")


def newsources(engine: Engine) -> pd.DataFrame:
    """The ``newsource`` table with the band and time of the image each source appeared in."""
    return read_sql(engine, "SELECT n.src_id, n.im_id, n.newsource_type, n.sigma_rms_min, n.sigma_rms_max, "
                            "i.freq_band, i.taustart_ts FROM newsource n JOIN images i ON i.id = n.im_id "
                            "ORDER BY n.id")


def summary(engine: Engine) -> dict[str, Any]:
    """Counts and times of the run(s) that made the database, for the report and the terminal."""
    def one(sql: str) -> Any:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()

    imgs = images(engine)
    accepted = imgs[~imgs.rejected]
    runs = read_sql(engine, "SELECT id, software_version, started_at, finished_at, status, n_images "
                            "FROM runs ORDER BY id")
    return {
        "images": len(imgs),
        "images_rejected": int(imgs.rejected.sum()),
        "bands_mhz": sorted(float(f) / 1e6 for f in accepted.freq_central.dropna().unique()),
        "first_time": accepted.taustart_ts.min(),
        "last_time": accepted.taustart_ts.max(),
        "sources": int(one("SELECT count(DISTINCT src_id) FROM extracted_sources") or 0),
        "detections": int(one("SELECT count(*) FROM extracted_sources WHERE NOT is_force_fit") or 0),
        "forced_fits": int(one("SELECT count(*) FROM extracted_sources WHERE is_force_fit") or 0),
        "new_sources": int(one("SELECT count(*) FROM newsource") or 0),
        "runs": runs,
        "rejections": _rejections(imgs),
    }


def _rejections(imgs: pd.DataFrame) -> pd.DataFrame:
    """The rejected images (id, url, rejection_reason) and ``later``: the id of an image of the same
    file accepted after it (the file mended and appended), else NA."""
    rejected = imgs[imgs.rejected][["id", "url", "rejection_reason"]]
    accepted = imgs[~imgs.rejected][["id", "url"]].rename(columns={"id": "later"})
    pairs = rejected.merge(accepted, on="url")
    pairs = pairs[pairs.later > pairs.id].groupby("id", as_index=False).later.min()
    return rejected.merge(pairs, on="id", how="left").astype({"later": "Int64"})


def as_int(value: Any) -> int:
    """A numpy/pandas integer as a Python int (for SQL parameters and file names)."""
    return int(np.asarray(value).item())
