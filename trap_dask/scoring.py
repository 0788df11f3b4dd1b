"""Scoring against a simulated survey's truth (:mod:`trap_dask.simulate`): extract an image, match
catalogues, error pulls, and the association figures of a run's export.

Everything here is a pure function of arrays (positions in deg, fluxes in Jy/beam or Jy), except
:func:`extract_file`, which reads one FITS image the way a pipeline worker does, and
:func:`read_light_curves`, which reads a SQLite export.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from trap_dask.association import angle_of_chord, chord, unit_vectors
from trap_dask.extraction.extract import PreparedImage, extract_sources, prepare_image
from trap_dask.extraction.params import ExtractionParams
from trap_dask.image import read_image, read_meta

#: Robust standard deviation of a Gaussian from its median absolute deviation.
MAD_TO_STD = 1.4826


def extract_file(path: str, params: ExtractionParams) -> tuple[np.ndarray, PreparedImage]:
    """Blind detections (SOURCE_DTYPE rows) of one FITS image and its prepared maps."""
    meta = read_meta(path)
    data, wcs = read_image(meta)
    image = prepare_image(data, wcs, meta.beam, params)
    return extract_sources(image, params), image


def match_nearest(
    ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """For every position of set 1 the index of its nearest position in set 2 within ``radius``.

    Positions and ``radius`` in deg. Returns (index into set 2, -1 when none; separation in deg,
    NaN when none).
    """
    n1 = len(np.atleast_1d(ra1))
    if n1 == 0 or len(np.atleast_1d(ra2)) == 0:
        return np.full(n1, -1), np.full(n1, np.nan)
    dist, idx = cKDTree(unit_vectors(ra2, dec2)).query(unit_vectors(ra1, dec1), distance_upper_bound=chord(radius))
    found = np.isfinite(dist)
    sep = np.where(found, angle_of_chord(dist), np.nan)
    return np.where(found, idx, -1), sep


def match_mutual(
    ra1: np.ndarray, dec1: np.ndarray, ra2: np.ndarray, dec2: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour matches that are mutual: i in set 1 and j in set 2 each other's nearest.

    Returns (index into set 2 per entry of set 1, -1 when unmatched; index into set 1 per entry
    of set 2, -1 when unmatched). ``radius`` in deg.
    """
    to2, _ = match_nearest(ra1, dec1, ra2, dec2, radius)
    to1, _ = match_nearest(ra2, dec2, ra1, dec1, radius)
    ok1 = (to2 >= 0) & (to1[np.maximum(to2, 0)] == np.arange(len(to2)))
    ok2 = (to1 >= 0) & (to2[np.maximum(to1, 0)] == np.arange(len(to1)))
    return np.where(ok1, to2, -1), np.where(ok2, to1, -1)


def robust_stats(values: np.ndarray) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 x median absolute deviation) of finite values."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    median = float(np.median(values))
    return median, float(MAD_TO_STD * np.median(np.abs(values - median)))


@dataclass(frozen=True)
class Pulls:
    """(measured - true) / reported error of one set of matched measurements (dimensionless)."""

    peak: np.ndarray
    int_flux: np.ndarray
    ra: np.ndarray
    dec: np.ndarray

    def summary(self) -> dict[str, tuple[float, float]]:
        """(median, robust std) of each pull."""
        return {name: robust_stats(getattr(self, name)) for name in ("peak", "int_flux", "ra", "dec")}


def pulls(measured: np.ndarray, true_ra: np.ndarray, true_dec: np.ndarray,
          true_peak: np.ndarray, true_int: np.ndarray) -> Pulls:
    """Pulls of SOURCE_DTYPE rows against their true positions (deg) and fluxes (Jy/beam, Jy).

    The RA pull uses the RA difference wrapped to [-180, 180) deg over ``ra_fit_err`` (an error
    along the RA coordinate); where the position was not fitted (error 0) the position pulls are
    NaN.
    """
    dra = (measured["ra"] - true_ra + 180.0) % 360.0 - 180.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return Pulls(
            peak=(measured["peak_flux"] - true_peak) / measured["peak_flux_err"],
            int_flux=(measured["int_flux"] - true_int) / measured["int_flux_err"],
            ra=np.where(measured["ra_fit_err"] > 0, dra / measured["ra_fit_err"], np.nan),
            dec=np.where(measured["dec_fit_err"] > 0, (measured["dec"] - true_dec) / measured["dec_fit_err"], np.nan),
        )


#: The (src_id, im_id) of each new source in a trap-dask export.
NEW_SOURCES_SQL = "SELECT src_id, im_id FROM newsource"


def read_light_curves(db_path: str, truth: dict, new_sources_sql: str = NEW_SOURCES_SQL) -> dict[str, np.ndarray]:
    """Measurements of a pipeline run's SQLite export, with each image's truth epoch.

    Returns columns ``id, src_id, epoch, ra, dec, int_flux, int_flux_err, is_force_fit,
    is_duplicate`` of ``extracted_sources`` (deg, Jy) and ``newsource_src, newsource_epoch``
    (what ``new_sources_sql`` selects as (src_id, im_id)) and ``var_src, var_eta`` (the
    variability table). Images are matched to the truth by file name.
    """
    epoch_of = {Path(im["path"]).name: im["epoch"] for im in truth["images"]}
    with sqlite3.connect(db_path) as conn:
        images = conn.execute("SELECT id, url FROM images").fetchall()
        image_epoch = {im_id: epoch_of[Path(url).name] for im_id, url in images}
        rows = conn.execute(
            "SELECT id, src_id, im_id, ra, dec, int_flux, int_flux_err, is_force_fit, is_duplicate "
            "FROM extracted_sources"
        ).fetchall()
        news = conn.execute(new_sources_sql).fetchall()
        var = conn.execute("SELECT src_id, eta_int FROM variability").fetchall()
    cols = np.array(rows, dtype=float).reshape(-1, 9).T
    out = dict(zip(("id", "src_id", "im_id", "ra", "dec", "int_flux", "int_flux_err", "is_force_fit",
                    "is_duplicate"), cols))
    for key in ("id", "src_id", "im_id"):
        out[key] = out[key].astype(int)
    out["is_force_fit"], out["is_duplicate"] = out["is_force_fit"] > 0, out["is_duplicate"] > 0
    out["epoch"] = np.array([image_epoch[i] for i in out.pop("im_id")], dtype=int)
    news = np.array(news, dtype=int).reshape(-1, 2)
    out["newsource_src"] = news[:, 0]
    out["newsource_epoch"] = np.array([image_epoch[i] for i in news[:, 1]], dtype=int)
    var = np.array(var, dtype=float).reshape(-1, 2)
    out["var_src"], out["var_eta"] = var[:, 0].astype(int), var[:, 1]
    return out


def assign_truth(lc: dict[str, np.ndarray], truth: dict, radius: float) -> np.ndarray:
    """True source id of every blind detection (nearest one switched on within ``radius`` deg), else -1.

    Forced fits get -1: their positions are the catalogue's, not a measurement.
    """
    src = truth["sources"]
    owner = np.full(len(lc["id"]), -1)
    for epoch in np.unique(lc["epoch"]):
        on = np.flatnonzero(src["peak_flux"][:, epoch, 0] != 0)
        rows = np.flatnonzero((lc["epoch"] == epoch) & ~lc["is_force_fit"])
        idx, _ = match_nearest(lc["ra"][rows], lc["dec"][rows],
                               src["ra_epoch"][on, epoch], src["dec_epoch"][on, epoch], radius)
        owner[rows] = np.where(idx >= 0, on[np.maximum(idx, 0)], -1)
    return owner


def association_figures(lc: dict[str, np.ndarray], truth: dict, radius: float) -> dict[str, float]:
    """Split, mixing, new-source and variability-ranking figures of a run against the truth.

    ``split``: fraction of detected true sources whose detections carry several src_ids;
    ``mixed``: fraction of src_ids whose detections belong to several true sources;
    ``transients_new``: fraction of transients whose detection at their switch-on epoch starts a
    src_id listed as a new source at that epoch; ``top_eta_variable``: fraction of the top-N
    src_ids by eta_int whose true source is variable or a transient, with N the number of
    injected variables; ``top_eta_variable_all``: the same with N = variables + transients (the
    issue's figure: a transient's light curve starts at its first detection, so only one that
    varies after it, e.g. fades, can rank); ``unassigned``: fraction of blind detections with no
    true source within ``radius``; ``extra_ids``: src_ids beyond one per detected true source;
    ``alive_twice``: true sources with two src_ids measured (detected or force-fitted) in one image.
    """
    src = truth["sources"]
    owner = assign_truth(lc, truth, radius)
    ok = owner >= 0
    pairs = np.unique(np.column_stack([owner[ok], lc["src_id"][ok]]), axis=0)
    true_ids, n_srcids = np.unique(pairs[:, 0], return_counts=True)
    src_ids, n_owners = np.unique(pairs[:, 1], return_counts=True)
    # majority true source of each src_id
    combo, counts = np.unique(np.column_stack([lc["src_id"][ok], owner[ok]]), axis=0, return_counts=True)
    order = np.lexsort((-counts, combo[:, 0]))
    first = np.unique(combo[order, 0], return_index=True)[1]
    majority = dict(zip(combo[order][first, 0].tolist(), combo[order][first, 1].tolist()))

    transients = np.flatnonzero(src["kind"] == "transient")
    news = set(zip(lc["newsource_src"].tolist(), lc["newsource_epoch"].tolist()))
    hit = []
    for t in transients:
        epoch = int(src["switch_on_epoch"][t])
        rows = np.flatnonzero((owner == t) & (lc["epoch"] == epoch))
        hit.append(any((int(lc["src_id"][r]), epoch) in news for r in rows))
    variable = np.isin(src["kind"], ("variable", "transient"))
    ranked = lc["var_src"][np.argsort(-np.nan_to_num(lc["var_eta"], nan=-np.inf), kind="stable")]
    ranked_true = np.array([majority.get(int(s), -1) for s in ranked], dtype=int)
    truly = (ranked_true >= 0) & variable[np.maximum(ranked_true, 0)]

    # a sky source with two src_ids alive at once: both measured (detected or force-fitted) in one image
    row_owner = np.array([majority.get(int(sid), -1) for sid in lc["src_id"]], dtype=int)
    live = row_owner >= 0
    alive = np.unique(np.column_stack([lc["epoch"][live], row_owner[live], lc["src_id"][live]]), axis=0)
    _, first_of, n_alive = np.unique(alive[:, :2], axis=0, return_index=True, return_counts=True)
    doubled = np.unique(alive[first_of[n_alive > 1], 1])

    def top_fraction(n_top: int) -> float:
        return float(np.mean(truly[:n_top])) if n_top else float("nan")

    return dict(
        split=float(np.mean(n_srcids > 1)) if len(true_ids) else float("nan"),
        mixed=float(np.mean(n_owners > 1)) if len(src_ids) else float("nan"),
        transients_new=float(np.mean(hit)) if hit else float("nan"),
        top_eta_variable=top_fraction(int(np.sum(src["kind"] == "variable"))),
        top_eta_variable_all=top_fraction(int(variable.sum())),
        unassigned=float(np.mean(~ok[~lc["is_force_fit"]])),
        extra_ids=float(np.sum(n_srcids - 1)),
        alive_twice=float(len(doubled)),
    )
