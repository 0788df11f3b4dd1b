"""A static HTML report of an export database: summary, candidates, eta-V diagram, and per
candidate its light curve and stamps. The directory holds index.html and the files it links
(PNGs, candidates.csv); open index.html in any browser, no server needed."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from trap_dask import __version__
from trap_dask.results import _candidates, image_checksums, lightcurves, summary, varmetric
from trap_dask.results.plots import etav_figure, lightcurve_figure, save
from trap_dask.results.stamps import stamps_figure

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; padding: 0 1.5em; max-width: 1300px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; white-space: normal; } tr.new td:first-child { border-left: 4px solid #f28e2b; }
tr.variable td:first-child { border-left: 4px solid #d62728; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.summary dt { font-weight: 600; } img { max-width: 100%; border: 1px solid #eee; }
section.candidate { margin: 1.5em 0; }
"""

CANDIDATE_COLUMNS = {
    "src_id": "src_id", "freq_mhz": "band (MHz)", "ra": "RA (deg)", "dec": "Dec (deg)",
    "first_time": "first seen (UTC)", "first_image": "first image", "n_points": "points",
    "eta": "η", "v": "V", "max_flux_mjy": "max flux (mJy)", "significance": "max S/N",
    "sigma_rms_max": "σ (rms max)",
}


def _cell(value: Any, name: str) -> str:
    if isinstance(value, float) and pd.isna(value):
        return ""
    if name in ("ra", "dec"):
        return f"{value:.5f}"
    if name == "first_time":
        return f"{pd.Timestamp(value):%Y-%m-%d %H:%M:%S}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _candidates_table(cands: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t in CANDIDATE_COLUMNS.values()) + "<th>why</th>"
    rows = []
    for row in cands.to_dict("records"):
        why = " + ".join(w for w, flag in (("new source", row["new"]), ("variable", row["variable"])) if flag)
        klass = "new" if row["new"] else "variable"
        cells = "".join(f"<td>{_cell(row[c], c)}</td>" for c in CANDIDATE_COLUMNS)
        link = f'<a href="#src{row["src_id"]}-{row["freq_band"]}">{why}</a>'
        rows.append(f'<tr class="{klass}">{cells}<td>{link}</td></tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _summary_list(info: dict[str, Any], db_name: str, cut) -> str:
    items = {
        "database": db_name,
        "images": f"{info['images']} ({info['images_rejected']} rejected"
                  + (f", {later} of them processed later)" if (later := int(info["rejections"].later.notna().sum()))
                     else ")"),
        "bands": ", ".join(f"{f:.1f} MHz" for f in info["bands_mhz"]) or "none",
        "time span (UTC)": (f"{info['first_time']} to {info['last_time']}" if pd.notna(info["first_time"])
                            else "none: no image was accepted"),
        "light curves (sources)": info["sources"],
        "measurements": f"{info['detections']} detections, {info['forced_fits']} forced fits",
        "new sources": info["new_sources"],
        "runs": "; ".join(f"run {r.id}: {r.status}, {r.n_images} images, trap-dask {r.software_version}, "
                          f"started {pd.Timestamp(r.started_at):%Y-%m-%d %H:%M:%S} UTC"
                          for r in info["runs"].itertuples()),
        "variability cut": (f"log η > {cut.eta_mean:.3f} + {cut.eta_sigma:g} × {cut.eta_std:.3f} "
                            f"(η > {cut.eta_threshold:.3g}), log V > {cut.v_mean:.3f} + {cut.v_sigma:g} × "
                            f"{cut.v_std:.3f} (V > {cut.v_threshold:.3g})") if cut.defined
                           else "none: fewer than two light curves of two or more points to fit it to",
    }
    body = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items())
    rejected = "".join(f"<tr><td>{r.id}</td><td>{html.escape(str(r.url))}</td>"
                       f"<td>{html.escape(str(r.rejection_reason))}"
                       f"{'' if pd.isna(r.later) else f'; processed later as image {r.later}'}</td></tr>"
                       for r in info["rejections"].itertuples())
    if rejected:
        rejected = ("<h3>Rejected images</h3><table><thead><tr><th>id</th><th>file</th><th>reason</th></tr>"
                    f"</thead><tbody>{rejected}</tbody></table>")
    return f'<dl class="summary">{body}</dl>{rejected}'


def write_report(db: Any, outdir: str | Path, eta_sigma: float, v_sigma: float, combine: str = "and",
                 forced_fits: bool = True, max_candidates: int = 50, db_name: str | None = None) -> Path:
    """Write ``outdir/index.html`` and its files; returns the path of index.html."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    info = summary(db)
    var = varmetric(db, forced_fits)
    cands, cut = _candidates(db, eta_sigma, v_sigma, combine, forced_fits)
    cands.to_csv(out / "candidates.csv", index=False)
    save(etav_figure(var, cut, cands, combine), out / "etav.png")
    meas, checksums = lightcurves(db), image_checksums(db)
    freqs = dict(zip(var.freq_band.astype(int), var.freq_central))
    shown = cands.head(max_candidates)
    sections, written = [], set()
    for row in shown.itertuples():
        rows = meas[meas.src_id == row.src_id]
        lc_png, st_png = f"lightcurve_{row.src_id}.png", f"stamps_{row.src_id}_band{row.freq_band}.png"
        if lc_png not in written:  # one light curve (all bands) per source
            save(lightcurve_figure(rows, row.src_id, freqs), out / lc_png)
            written.add(lc_png)
        save(stamps_figure(rows[rows.freq_band == row.freq_band], row.src_id, checksums=checksums), out / st_png,
             dpi=90)
        why = " and ".join(w for w, f in (("a new source", row.new), ("a variability outlier", row.variable)) if f)
        sections.append(
            f'<section class="candidate" id="src{row.src_id}-{row.freq_band}">'
            f"<h3>source {row.src_id}, band {row.freq_band}: {why}</h3>"
            f"<p>RA {row.ra:.5f}°, Dec {row.dec:.5f}°; η = {row.eta:.3g}, V = {row.v:.3g}, "
            f"max flux {row.max_flux_mjy:.3g} mJy, {row.n_points} points.</p>"
            f'<img src="{lc_png}" alt="light curve of source {row.src_id}">'
            f'<img src="{st_png}" alt="stamps of source {row.src_id}"></section>'
        )
    more = "" if len(cands) <= max_candidates else f"<p>Showing the first {max_candidates} of {len(cands)}.</p>"
    title = f"trap-dask report: {html.escape(db_name or str(db))}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style></head>
<body>
<h1>{title}</h1>
<p>Made by trap-dask {__version__}. Candidates: new sources, and light curves above the sigma cut in
{"both" if combine == "and" else "either of"} log η and log V ({"forced fits counted" if forced_fits else
"blind detections only"}). <a href="candidates.csv">candidates.csv</a></p>
<h2>Run summary</h2>
{_summary_list(info, db_name or str(db), cut)}
<h2>Candidates ({len(cands)})</h2>
{_candidates_table(cands) if len(cands) else "<p>No candidates.</p>"}
<h2>η–V diagram</h2>
<img src="etav.png" alt="eta-V diagram">
<h2>Candidate light curves and stamps</h2>
{more}{"".join(sections) or "<p>No candidates.</p>"}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
