"""Variability indices and transient candidates from an export database's tables.

Candidates are the new sources (the ``newsource`` table) and the variability outliers: a
Gaussian is fitted (mean, standard deviation) to log10(eta) and to log10(V) of the light curves
with at least two points, with iterative 3-sigma clipping so that the outliers themselves do not
widen it, and a light curve is an outlier when it lies more than ``eta_sigma`` standard
deviations above the mean in log eta AND more than ``v_sigma`` above the mean in log V (as VAST
does; TraP's own post-processing cuts the same two axes). ``combine="or"`` takes either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Columns of a varmetric frame (the ``variability`` table's names).
VARMETRIC_COLUMNS = ("src_id", "freq_band", "newsource", "v_int", "eta_int", "lightcurve_max",
                     "lightcurve_avg", "wm_ra", "wm_dec", "avg_ra_err", "avg_dec_err",
                     "nr_datapoints", "first_image", "first_detection_time")


def varmetric_from_measurements(meas: pd.DataFrame, forced_fits: bool = False) -> pd.DataFrame:
    """Per (src_id, freq_band) V, eta and the light-curve summaries, computed from measurements.

    ``meas`` is :func:`trap_dask.results.db.measurements`. With ``forced_fits=False`` the forced
    fits are left out of every statistic, as TraP 1.4.0's ``construct_varmetric`` does (a light
    curve of only forced fits in a band has no row). Weighted positions use the blind
    detections only. V uses the sample standard deviation (ddof=1); eta is
    ``N/(N-1) (mean(w I^2) - mean(w I)^2 / mean(w))`` with ``w = 1/int_flux_err^2``; both are
    NaN below two points.
    """
    used = meas if forced_fits else meas[~meas.is_force_fit]
    f = used.assign(w=1.0 / used.int_flux_err ** 2)
    f = f.assign(wi=f.w * f.int_flux, wi2=f.w * f.int_flux ** 2)
    g = f.groupby(["src_id", "freq_band"])
    n = g.size()
    mean = g.int_flux.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        eta = n / (n - 1) * (g.wi2.mean() - g.wi.mean() ** 2 / g.w.mean())
        v = g.int_flux.std(ddof=1) / mean
    blind = meas[~meas.is_force_fit].assign(
        wra=lambda d: 1.0 / d.ra_fit_err ** 2, wdec=lambda d: 1.0 / d.dec_fit_err ** 2)
    blind = blind.assign(wra_ra=blind.wra * blind.ra, wdec_dec=blind.wdec * blind.dec)
    b = blind.groupby(["src_id", "freq_band"])
    first = f.sort_values(["taustart_ts", "id"]).groupby(["src_id", "freq_band"]).first()
    out = pd.DataFrame({
        "newsource": meas.groupby("src_id").id.min().reindex(n.index.get_level_values(0)).to_numpy(),
        "v_int": v.where(n >= 2),
        "eta_int": eta.where(n >= 2).clip(lower=0.0),
        "lightcurve_max": g.int_flux.max(),
        "lightcurve_avg": mean,
        "wm_ra": b.wra_ra.sum() / b.wra.sum(),
        "wm_dec": b.wdec_dec.sum() / b.wdec.sum(),
        "avg_ra_err": b.ra_fit_err.mean(),
        "avg_dec_err": b.dec_fit_err.mean(),
        "nr_datapoints": n,
        "first_image": first.im_id,
        "first_detection_time": first.taustart_ts,
    }, index=n.index)
    return out.reset_index()[list(VARMETRIC_COLUMNS)]


@dataclass(frozen=True)
class SigmaCut:
    """Gaussian fits to log10 eta and log10 V, and the thresholds ``mean + sigma * std``."""

    eta_mean: float
    eta_std: float
    v_mean: float
    v_std: float
    eta_sigma: float
    v_sigma: float

    @property
    def eta_threshold(self) -> float:
        """Threshold on eta (linear, not log)."""
        return float(10 ** (self.eta_mean + self.eta_sigma * self.eta_std))

    @property
    def v_threshold(self) -> float:
        return float(10 ** (self.v_mean + self.v_sigma * self.v_std))

    @property
    def defined(self) -> bool:
        """Whether there were light curves to fit it to: two or more, of two or more points each,
        with eta and V above 0 (none after one image, or when every image was rejected)."""
        return bool(np.isfinite([self.eta_mean, self.eta_std, self.v_mean, self.v_std]).all())


def fit_sigma_cut(var: pd.DataFrame, eta_sigma: float, v_sigma: float) -> SigmaCut:
    """Fit the log-normal distributions of eta and V over light curves of >= 2 points with
    positive eta and V, each with iterative 3-sigma clipping (NaN thresholds when fewer than two
    qualify)."""
    from astropy.stats import sigma_clipped_stats

    ok = (var.nr_datapoints >= 2) & (var.eta_int > 0) & (var.v_int > 0)
    if ok.sum() < 2:
        return SigmaCut(np.nan, np.nan, np.nan, np.nan, eta_sigma, v_sigma)
    eta_mean, _, eta_std = sigma_clipped_stats(np.log10(var.eta_int[ok].to_numpy()), sigma=3.0, maxiters=10)
    v_mean, _, v_std = sigma_clipped_stats(np.log10(var.v_int[ok].to_numpy()), sigma=3.0, maxiters=10)
    return SigmaCut(float(eta_mean), float(eta_std), float(v_mean), float(v_std), eta_sigma, v_sigma)


def outliers(var: pd.DataFrame, cut: SigmaCut, combine: str = "and") -> pd.Series:
    """Boolean per row of ``var``: above both thresholds (``combine="and"``) or either ("or")."""
    several = var.nr_datapoints >= 2
    high_eta = several & (var.eta_int > cut.eta_threshold)
    high_v = several & (var.v_int > cut.v_threshold)
    if combine not in ("and", "or"):
        raise ValueError(f"combine must be 'and' or 'or', not {combine!r}")
    return (high_eta & high_v) if combine == "and" else (high_eta | high_v)


def select_candidates(var: pd.DataFrame, new: pd.DataFrame, meas: pd.DataFrame, cut: SigmaCut,
                      combine: str = "and") -> pd.DataFrame:
    """One row per candidate (src_id, band): new sources and variability outliers.

    Columns: src_id, freq_band, freq_mhz, ra, dec (deg, weighted mean), first_image,
    first_time (UTC), n_points, eta, v, max_flux_mjy, significance (highest
    significance_detection_level of its detections in the band), new (bool),
    newsource_type, sigma_rms_max, variable (bool). Sorted by significance, highest first.
    """
    var = var.assign(variable=outliers(var, cut, combine).to_numpy())
    new_keys = new.drop_duplicates(["src_id", "freq_band"]).set_index(["src_id", "freq_band"])
    keys = var.set_index(["src_id", "freq_band"]).index
    var = var.assign(new=keys.isin(new_keys.index))
    chosen = var[var.new | var.variable].copy()
    detected = meas[~meas.is_force_fit].groupby(["src_id", "freq_band"]).significance_detection_level.max()
    index = pd.MultiIndex.from_frame(chosen[["src_id", "freq_band"]])
    out = pd.DataFrame({
        "src_id": chosen.src_id.to_numpy(),
        "freq_band": chosen.freq_band.to_numpy(),
        "freq_mhz": chosen.freq_central.to_numpy() / 1e6 if "freq_central" in chosen else np.nan,
        "ra": chosen.wm_ra.to_numpy(),
        "dec": chosen.wm_dec.to_numpy(),
        "first_image": chosen.first_image.to_numpy(),
        "first_time": chosen.first_detection_time.to_numpy(),
        "n_points": chosen.nr_datapoints.to_numpy(),
        "eta": chosen.eta_int.to_numpy(),
        "v": chosen.v_int.to_numpy(),
        "max_flux_mjy": chosen.lightcurve_max.to_numpy() * 1e3,
        "significance": detected.reindex(index).to_numpy(),
        "new": chosen.new.to_numpy(),
        "newsource_type": pd.array(new_keys.newsource_type.reindex(index), dtype="Int64"),
        "sigma_rms_max": new_keys.sigma_rms_max.reindex(index).to_numpy(),
        "variable": chosen.variable.to_numpy(),
    })
    return out.sort_values(["significance", "src_id"], ascending=[False, True], na_position="last",
                           ignore_index=True)
