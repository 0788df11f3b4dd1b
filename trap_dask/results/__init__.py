"""Looking at an export database after the run: light curves, variability, candidates, plots.

The Python side of ``trap-dask candidates|lightcurve|etav|stamps|report``, for notebooks::

    from trap_dask import results
    lc = results.lightcurves("demo.db", src_id=3)   # one row per measurement, time order
    var = results.varmetric("demo.db")              # one row per (src_id, freq_band)
    cands = results.candidates("demo.db", eta_sigma=3, v_sigma=3)

``db`` is a SQLite file, a SQLAlchemy URL (``postgresql://postgres@127.0.0.1:5432/field1``),
a DatabaseSettings or an Engine. Only the database (and, for stamps, the images it names) is read.
pandas and matplotlib are imported by this package, never by ``trap_dask`` itself.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from trap_dask.results import db as _db
from trap_dask.results.select import (
    SigmaCut,
    fit_sigma_cut,
    select_candidates,
    varmetric_from_measurements,
)

__all__ = ["SigmaCut", "candidates", "image_checksums", "lightcurves", "summary", "varmetric"]

#: Default sigma cuts on log10 eta and log10 V.
ETA_SIGMA = 3.0
V_SIGMA = 3.0


def lightcurves(db: Any, src_id: int | None = None) -> pd.DataFrame:
    """Every measurement (or those of ``src_id``) with its image's time, band, file and beam.

    Columns: the ``extracted_sources`` ones (fluxes in Jy, positions in deg, ``is_force_fit``)
    plus ``taustart_ts`` (UTC), ``freq_band``, ``url``, ``rb_smaj/rb_smin/rb_pa`` (deg); sorted
    by time. ``df.groupby(["src_id", "freq_band"])`` gives the light curves.
    """
    with _db.connect(db) as engine:
        return _db.measurements(engine, src_id)


def image_checksums(db: Any) -> dict[int, str]:
    """The checksum of each image's file as the run read it (trap_dask.checksums), by image id
    (stamps check the files against them)."""
    with _db.connect(db) as engine:
        frame = _db.read_sql(engine, "SELECT id, checksum FROM images WHERE checksum IS NOT NULL")
    return dict(zip(frame["id"].tolist(), frame["checksum"].tolist()))


def varmetric(db: Any, forced_fits: bool = True) -> pd.DataFrame:
    """V, eta and the light-curve summaries per (src_id, freq_band).

    ``forced_fits=True``: the ``variability`` table as the pipeline wrote it, forced fits
    counted (classic TraP: a fading transient is only seen through its forced fits).
    ``forced_fits=False``: recomputed from the blind detections only, as TraP 1.4.0's
    ``construct_varmetric`` does. Either way a ``freq_central`` column (Hz) is added.
    """
    with _db.connect(db) as engine:
        if forced_fits:
            return _db.variability(engine)
        bands = _db.read_sql(engine, "SELECT band_id AS freq_band, freq_central FROM frequencybands")
        computed = varmetric_from_measurements(_db.measurements(engine), forced_fits=False)
    return computed.merge(bands, on="freq_band", how="left")


def candidates(db: Any, eta_sigma: float = ETA_SIGMA, v_sigma: float = V_SIGMA, combine: str = "and",
               forced_fits: bool = True, table: bool = False) -> pd.DataFrame:
    """New sources and variability outliers, one row per (source, band); see
    :func:`trap_dask.results.select.select_candidates` for the columns. ``table=True`` returns an
    astropy Table with units. The fitted cut is in ``result.attrs["cut"]`` (DataFrame) or
    ``result.meta["cut"]`` (Table)."""
    frame, cut = _candidates(db, eta_sigma, v_sigma, combine, forced_fits)
    return to_table(frame, cut) if table else frame


def _candidates(db: Any, eta_sigma: float, v_sigma: float, combine: str, forced_fits: bool
                ) -> tuple[pd.DataFrame, SigmaCut]:
    with _db.connect(db) as engine:
        var = varmetric(engine, forced_fits)
        cut = fit_sigma_cut(var, eta_sigma, v_sigma)
        frame = select_candidates(var, _db.newsources(engine), _db.measurements(engine), cut, combine)
    frame.attrs["cut"] = cut
    return frame, cut


def to_table(frame: pd.DataFrame, cut: SigmaCut | None = None):
    """A candidates frame as an astropy Table with units and the cut in its meta."""
    from astropy import units as u
    from astropy.table import Table
    from astropy.time import Time

    out = Table.from_pandas(frame.drop(columns=["first_time"]))
    first = pd.to_datetime(frame.first_time).to_numpy(dtype="datetime64[ns]")  # typed also when empty
    out.add_column(Time(first, format="datetime64", scale="utc").isot, name="first_time",
                   index=list(frame.columns).index("first_time"))
    for name, unit in (("ra", u.deg), ("dec", u.deg), ("freq_mhz", u.MHz), ("max_flux_mjy", u.mJy)):
        out[name].unit = unit
    if cut is not None:
        out.meta["cut"] = {k: float(v) for k, v in vars(cut).items()}
    return out


def summary(db: Any) -> dict[str, Any]:
    """Counts and times of the database's images, sources and runs."""
    with _db.connect(db) as engine:
        return _db.summary(engine)
