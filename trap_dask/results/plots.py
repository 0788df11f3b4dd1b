"""Light-curve and eta-V plots with matplotlib (Agg backend: files, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from trap_dask.results.select import SigmaCut, outliers  # noqa: E402

#: Band colours (colour-blind safe, matplotlib's tab10 order) and markers per measurement kind.
COLOURS = plt.get_cmap("tab10").colors


def _band_label(band: int, freq_hz: float | None) -> str:
    return f"band {band}" + (f" ({freq_hz / 1e6:.1f} MHz)" if freq_hz is not None and np.isfinite(freq_hz) else "")


def lightcurve_figure(meas: pd.DataFrame, src_id: int, freqs: dict[int, float] | None = None,
                      title: str | None = None) -> plt.Figure:
    """Integrated flux (mJy) with 1-sigma error bars against time (UTC), one colour per band;
    blind detections as filled circles, forced fits as open squares."""
    freqs = freqs or {}
    fig, ax = plt.subplots(figsize=(7.0, 3.6), layout="constrained")
    for i, (band, rows) in enumerate(meas.groupby("freq_band")):
        colour = COLOURS[i % len(COLOURS)]
        label = _band_label(int(band), freqs.get(int(band)))
        ax.plot(rows.taustart_ts, rows.int_flux * 1e3, "-", color=colour, alpha=0.4, lw=1)
        for forced, style in ((False, dict(fmt="o", mfc=colour)), (True, dict(fmt="s", mfc="white"))):
            part = rows[rows.is_force_fit == forced]
            if len(part):
                ax.errorbar(part.taustart_ts, part.int_flux * 1e3, yerr=part.int_flux_err * 1e3,
                            color=colour, mec=colour, ms=6, capsize=2, lw=1, **style,
                            label=f"{label}, {'forced fit' if forced else 'detection'}")
    ax.axhline(0.0, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("integrated flux density (mJy)")
    ax.set_title(title or f"source {src_id}")
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.legend(fontsize="small", loc="best")
    ax.grid(alpha=0.3)
    return fig


def etav_figure(var: pd.DataFrame, cut: SigmaCut, candidates: pd.DataFrame | None = None,
                combine: str = "and") -> plt.Figure:
    """Eta against V on log axes for every light curve of >= 2 points, with the sigma-cut lines;
    outliers in red, new sources circled, candidates labelled with their src_id."""
    several = var[(var.nr_datapoints >= 2) & (var.eta_int > 0) & (var.v_int > 0)]
    fig, ax = plt.subplots(figsize=(6.4, 5.0), layout="constrained")
    high = outliers(several, cut, combine) if np.isfinite(cut.eta_threshold) else np.zeros(len(several), bool)
    ax.scatter(several.eta_int[~high], several.v_int[~high], s=14, color="tab:blue", alpha=0.6,
               label=f"light curves ({len(several)})", edgecolors="none")
    ax.scatter(several.eta_int[high], several.v_int[high], s=30, color="tab:red",
               label=f"variability outliers ({int(np.sum(high))})", edgecolors="none")
    if np.isfinite(cut.eta_threshold):
        ax.axvline(cut.eta_threshold, color="tab:red", ls="--", lw=1,
                   label=f"log η cut: mean + {cut.eta_sigma:g}σ")
        ax.axhline(cut.v_threshold, color="tab:purple", ls="--", lw=1,
                   label=f"log V cut: mean + {cut.v_sigma:g}σ")
    if candidates is not None and len(candidates):
        keys = set(zip(candidates.src_id[candidates.new], candidates.freq_band[candidates.new]))
        new = several[[k in keys for k in zip(several.src_id, several.freq_band)]]
        ax.scatter(new.eta_int, new.v_int, s=90, facecolors="none", edgecolors="tab:orange", lw=1.5,
                   label=f"new sources ({len(new)})")
        shown = several.merge(candidates[["src_id", "freq_band"]], on=["src_id", "freq_band"])
        for row in shown.itertuples():
            ax.annotate(str(row.src_id), (row.eta_int, row.v_int), xytext=(4, 3),
                        textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if not len(several):  # nothing to scale the log axes by
        ax.set_xlim(1e-2, 1e2)
        ax.set_ylim(1e-3, 1.0)
        ax.text(0.5, 0.5, "no light curve of two or more points", transform=ax.transAxes, ha="center")
    ax.set_xlabel("η (reduced weighted χ² of the integrated flux)")
    ax.set_ylabel("V (coefficient of variation of the integrated flux)")
    ax.set_title("η–V diagram")
    ax.legend(fontsize="small", loc="lower right")
    ax.grid(alpha=0.3, which="both")
    return fig


def save(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (its folder made if missing; ``.png`` added to a name without a
    suffix, as matplotlib does); returns the path written."""
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
