"""After the run: the results API, the five subcommands on both backends, and real plots."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests._runs import run
from trap_dask import results
from trap_dask.cli import main
from trap_dask.db.backends import DatabaseSettings
from trap_dask.results.select import fit_sigma_cut, outliers, varmetric_from_measurements
from trap_dask.simulate import SurveySpec, simulate_survey

SPEC = SurveySpec(n_epochs=8, shape=(256, 256), n_steady=10, n_variable=3, n_transient=2, n_resolved=0,
                  n_pairs=0, min_separation=4.0, jitter=0.1, seed=33)


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("results") / "survey"
    simulate_survey(folder, SPEC)
    return folder


@pytest.fixture(scope="module")
def sqlite_db(survey) -> str:
    db = str(survey.parent / "export.db")
    run(DatabaseSettings(backend="sqlite", name=db), [str(survey)])
    return db


def db_argument(settings: DatabaseSettings) -> str:
    return settings.impl.address()


def plot_content(path: Path) -> tuple[float, int]:
    """(fraction of pixels unlike the most common colour, number of distinct colours) of a PNG."""
    from matplotlib.image import imread

    pixels = (imread(path)[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    return 1.0 - counts.max() / len(pixels), len(colours)


def assert_real_plot(path: Path, min_fraction: float = 0.03, min_colours: int = 30) -> None:
    assert path.is_file() and path.stat().st_size > 5000, path
    fraction, colours = plot_content(path)
    assert fraction > min_fraction and colours > min_colours, (path, fraction, colours)


# -- the API -----------------------------------------------------------------------------------
def test_varmetric_recomputed_with_forced_fits_is_the_stored_table(sqlite_db):
    stored = results.varmetric(sqlite_db).set_index(["src_id", "freq_band"]).sort_index()
    computed = varmetric_from_measurements(results.lightcurves(sqlite_db), forced_fits=True)
    computed = computed.set_index(["src_id", "freq_band"]).sort_index()
    several = stored.nr_datapoints >= 2
    assert (computed.nr_datapoints == stored.nr_datapoints).all()
    np.testing.assert_allclose(computed.eta_int[several], stored.eta_int[several], rtol=1e-6)
    np.testing.assert_allclose(computed.v_int[several], stored.v_int[several], rtol=1e-6)
    np.testing.assert_allclose(computed.lightcurve_max, stored.lightcurve_max, rtol=1e-12)


def test_varmetric_without_forced_fits_counts_only_detections(sqlite_db):
    meas = results.lightcurves(sqlite_db)
    blind = results.varmetric(sqlite_db, forced_fits=False)
    counts = meas[~meas.is_force_fit].groupby(["src_id", "freq_band"]).size()
    assert blind.set_index(["src_id", "freq_band"]).nr_datapoints.sort_index().tolist() == counts.sort_index().tolist()
    assert meas.is_force_fit.any() and "freq_central" in blind


def test_sigma_cut_and_or():
    rng = np.random.default_rng(1)
    var = pd.DataFrame({"eta_int": 10 ** rng.normal(0, 0.3, 200), "v_int": 10 ** rng.normal(-1.5, 0.2, 200),
                        "nr_datapoints": 10})
    var.loc[0, ["eta_int", "v_int"]] = [1e3, 1.0]    # high in both
    var.loc[1, ["eta_int", "v_int"]] = [1e3, 0.03]   # high eta only
    var.loc[2, "nr_datapoints"] = 1                  # never an outlier
    var.loc[2, ["eta_int", "v_int"]] = [1e4, 2.0]
    cut = fit_sigma_cut(var, 3.0, 3.0)
    both = outliers(var, cut, "and")
    either = outliers(var, cut, "or")
    assert both[0] and not both[1] and not both[2]
    assert either[0] and either[1] and not either[2]
    assert 10 ** cut.eta_mean == pytest.approx(1.0, rel=0.3)


def test_candidates_hold_the_new_sources(sqlite_db):
    cands = results.candidates(sqlite_db)
    new = results.summary(sqlite_db)["new_sources"]
    assert new >= 1 and cands.new.sum() == new
    assert {"src_id", "ra", "dec", "freq_mhz", "first_time", "eta", "v", "max_flux_mjy", "significance"} <= set(cands)
    table = results.candidates(sqlite_db, table=True)
    assert str(table["max_flux_mjy"].unit) == "mJy" and table.meta["cut"]["eta_sigma"] == 3.0


# -- the subcommands, on both backends ------------------------------------------------------------
def test_subcommands_on_each_backend(db_settings, survey, tmp_path, capsys):
    run(db_settings, [str(survey)])
    db = db_argument(db_settings)
    cands = results.candidates(db)
    src = int(cands.src_id.iloc[0])

    assert main(["candidates", db]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"^\s+{src}\s+0\s", printed, re.M) and "candidates (" in printed
    for fmt, name in (("csv", "c.csv"), ("ecsv", "c.ecsv"), ("votable", "c.xml"), ("parquet", "c.parquet")):
        assert main(["candidates", db, "--format", fmt, "-o", str(tmp_path / name)]) == 0
    from astropy.table import Table

    assert len(Table.read(tmp_path / "c.ecsv")) == len(cands) == len(pd.read_csv(tmp_path / "c.csv"))
    assert len(Table.read(tmp_path / "c.xml")) == len(cands) == len(pd.read_parquet(tmp_path / "c.parquet"))

    assert main(["lightcurve", db, str(src), "-o", str(tmp_path / "lc.png")]) == 0
    assert_real_plot(tmp_path / "lc.png")
    capsys.readouterr()
    assert main(["lightcurve", db, str(src)]) == 0
    assert "int_flux_mjy" in capsys.readouterr().out
    assert main(["lightcurve", db, str(src), "-o", str(tmp_path / "lc.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "lc.csv")) == len(results.lightcurves(db, src))
    assert main(["etav", db, "-o", str(tmp_path / "etav.png")]) == 0
    assert_real_plot(tmp_path / "etav.png")
    assert main(["stamps", db, str(src), "-o", str(tmp_path / "stamps.png")]) == 0
    assert_real_plot(tmp_path / "stamps.png", min_fraction=0.2)
    assert main(["report", db, "-o", str(tmp_path / "report")]) == 0
    index = (tmp_path / "report" / "index.html").read_text()
    assert f"source {src}" in index and "Run summary" in index
    assert main(["lightcurve", db, "99999", "-o", str(tmp_path / "none.png")]) == 1
    assert "no measurements of source 99999" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["every image rejected", "one image"])
def test_results_of_a_run_without_light_curves_to_rank(survey, tmp_path, capsys, case):
    """A run whose every image was rejected, and a run of one image, still give a report (its
    address a file URI, spaces escaped), an empty candidates table in every format and an eta-V
    diagram (its log axes had nothing to scale by: matplotlib's error before)."""
    db = str(tmp_path / "few.db")
    images = sorted(str(p) for p in survey.glob("*.fits"))
    if case == "every image rejected":
        run(DatabaseSettings(backend="sqlite", name=db), images[:2], rms_max=1e-9)
    else:
        run(DatabaseSettings(backend="sqlite", name=db), images[:1])
    capsys.readouterr()
    assert main(["report", db, "-o", str(tmp_path / "the report")]) == 0
    assert "(file://" + str(tmp_path).replace(" ", "%20") + "/the%20report/index.html)" in capsys.readouterr().out
    index = (tmp_path / "the report" / "index.html").read_text()
    assert "<h2>Candidates (0)</h2>" in index and (tmp_path / "the report" / "etav.png").stat().st_size > 5000
    assert ("Rejected images" in index) == (case == "every image rejected")
    assert "none: fewer than two light curves of two or more points to fit it to" in index
    assert ("none: no image was accepted" in index) == (case == "every image rejected")
    assert not re.search(r"\bnan\b|\bnat\b", index.split("<body")[-1].lower())
    capsys.readouterr()
    assert main(["candidates", db]) == 0
    out = capsys.readouterr().out
    assert "0 candidates (0 new sources" in out and "nan" not in out
    assert "fewer than two light curves of two or more points to fit a cut to" in out
    for fmt, name in (("csv", "c.csv"), ("ecsv", "c.ecsv"), ("votable", "c.xml")):
        assert main(["candidates", db, "--format", fmt, "-o", str(tmp_path / name)]) == 0
    from astropy.table import Table

    assert len(Table.read(tmp_path / "c.ecsv")) == 0 == len(pd.read_csv(tmp_path / "c.csv"))
    assert main(["etav", db, "-o", str(tmp_path / "etav.png")]) == 0




def test_stamps_say_which_images_changed_or_miss_the_source(survey, tmp_path, monkeypatch):
    """An image whose file changed since the run (its stored checksum differs) or that no longer
    reaches the source gets a panel saying so, never a cutout of other data; the rest are drawn (a
    moved image made the whole figure fail before, a changed one drew the wrong pixels)."""
    import shutil

    from astropy.io import fits

    from trap_dask import results
    from trap_dask.results.stamps import stamps_figure

    copies = tmp_path / "images"
    shutil.copytree(survey, copies)
    db = str(tmp_path / "moved.db")
    run(DatabaseSettings(backend="sqlite", name=db), [str(copies)])
    meas = results.lightcurves(db)
    src = int(meas.groupby("src_id").size().idxmax())
    rows = meas[meas.src_id == src].sort_values("taustart_ts")
    first, second = rows.url.iloc[0], rows.url.iloc[1]
    import os

    from trap_dask import tasks

    hashed = []
    monkeypatch.setattr(tasks, "bytes_checksum",
                        lambda raw, kind, hash=tasks.bytes_checksum: hashed.append(1) or hash(raw, kind))
    for url in rows.url:  # settled files (modified > 2 s ago) are hashed once, however many figures
        os.utime(url, ns=(os.stat(url).st_atime_ns, os.stat(url).st_mtime_ns - 10**10))
    for _ in range(2):
        figure = stamps_figure(rows, src, checksums=results.image_checksums(db))
    assert len(hashed) == len(rows) and not any(ax.texts for ax in figure.axes[:len(rows)])
    with fits.open(first, mode="update") as hdul:
        hdul[0].data[:] = hdul[0].data[::-1]
    figure = stamps_figure(rows, src, checksums=results.image_checksums(db))
    panels = [[t.get_text() for t in ax.texts] for ax in figure.axes[:len(rows)]]
    assert panels[0] == ["image changed\nsince the run"] and all(p == [] for p in panels[1:])
    with fits.open(second, mode="update") as hdul:
        hdul[0].header["CRVAL1"] += 5.0
    figure = stamps_figure(rows, src)  # no checksums: the files are not checked
    panels = [[t.get_text() for t in ax.texts] for ax in figure.axes[:len(rows)]]
    assert panels[1] == ["source not\non this image"] and panels[0] == [] and len(figure.axes[2].images) == 1


def test_outputs_are_written_where_said(sqlite_db, tmp_path, capsys):
    """A plot named without a suffix is written as NAME.png and said so; a table's folder is made
    if missing, as a plot's is; a file that is not a database is named in the error."""
    from trap_dask import results

    assert main(["etav", sqlite_db, "-o", str(tmp_path / "eta_v")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'eta_v.png'}\n" and (tmp_path / "eta_v.png").is_file()
    assert main(["candidates", sqlite_db, "--format", "votable", "-o", str(tmp_path / "new" / "c.xml")]) == 0
    assert (tmp_path / "new" / "c.xml").stat().st_size > 0
    src = str(results.lightcurves(sqlite_db).src_id.iloc[0])
    assert main(["lightcurve", sqlite_db, src, "-o", str(tmp_path / "curves" / "lc.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "curves" / "lc.csv")) > 0
    capsys.readouterr()
    (tmp_path / "notes.txt").write_text("not a database")
    assert main(["candidates", str(tmp_path / "notes.txt")]) == 1
    assert capsys.readouterr().err == f"trap-dask candidates: error: {tmp_path / 'notes.txt'}: file is not a database\n"

@pytest.mark.parametrize("argv, wanted", [
    (["lightcurve", "x.db", "99999999999999999999"], "'99999999999999999999': give a source id"),
    (["stamps", "x.db", "-5", "-o", "s.png"], "'-5': give a source id"),
    (["stamps", "x.db", "1", "-o", "s.png", "--max-stamps", "0"], "'0': give a whole number, 1 or more"),
    (["candidates", "x.db", "--eta-sigma", "nan"], "'nan': give a number of sigma, 0 or more"),
    (["etav", "x.db", "-o", "e.png", "--v-sigma", "-1"], "'-1': give a number of sigma, 0 or more"),
])
def test_arguments_out_of_range_are_one_line_errors(capsys, argv, wanted):
    """Numbers the database or the cuts cannot take are refused by the parser, before the database
    is opened (a src_id beyond SQLite's integers was a traceback, NaN cuts an empty table)."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and wanted in capsys.readouterr().err


def test_a_rejected_image_mended_and_appended_is_said_to_be_processed_later(survey, tmp_path):
    """The rejected row stays (the history of the database); the report says the file was processed
    in a later run, and as which image, rather than listing it as if it were still rejected."""
    import shutil

    from trap_dask import results
    from trap_dask.results.report import write_report

    images = sorted(survey.glob("*.fits"))[:3]
    copies = [shutil.copy(image, tmp_path / image.name) for image in images]
    broken = Path(copies[2])  # the last: an append adds images after those the database holds
    broken.write_bytes(broken.read_bytes()[:5000])  # truncated: rejected as unreadable
    settings = DatabaseSettings(backend="sqlite", name=str(tmp_path / "mended.db"))
    run(settings, [str(c) for c in copies])
    shutil.copy(images[2], broken)
    run(settings, [str(c) for c in copies], db_append=True)
    rejections = results.summary(settings.name)["rejections"]
    assert len(rejections) == 1 and rejections.later.iloc[0] == 3 and rejections.url.iloc[0] == str(broken)
    index = write_report(settings.name, tmp_path / "report", 3.0, 3.0).read_text()
    assert "4 (1 rejected, 1 of them processed later)" in index and "; processed later as image 3</td>" in index

def test_help_of_each_subcommand(capsys):
    for command in ("candidates", "lightcurve", "etav", "stamps", "report"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0 and "DB" in capsys.readouterr().out


# -- the report in a real browser -----------------------------------------------------------------
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium not installed under CI=true (.ci/run installs it with apt-get)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return found


def test_report_renders_in_headless_chromium(sqlite_db, tmp_path):
    browser = chromium()
    assert main(["report", sqlite_db, "-o", str(tmp_path / "report")]) == 0
    index = tmp_path / "report" / "index.html"
    linked = re.findall(r'(?:src|href)="([^"#][^"]*)"', index.read_text())
    assert any(link.endswith(".png") for link in linked) and "candidates.csv" in linked
    for link in linked:
        assert (index.parent / link).is_file(), link
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600",
             f"--user-data-dir={tmp_path / 'profile'}"]
    done = subprocess.run([browser, *flags, f"--screenshot={shot}", index.as_uri()], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert_real_plot(shot, min_fraction=0.05)
    dom = subprocess.run([browser, *flags, "--dump-dom", index.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert "<table>" in dom and "etav.png" in dom


def test_stamps_of_an_image_no_longer_on_disk_say_so(sqlite_db, tmp_path):
    from trap_dask.results.plots import save
    from trap_dask.results.stamps import stamps_figure

    src = int(results.candidates(sqlite_db).src_id.iloc[0])
    meas = results.lightcurves(sqlite_db, src)
    meas.loc[meas.index[0], "url"] = str(tmp_path / "moved.fits")
    fig = stamps_figure(meas, src)
    assert any(t.get_text() == "image not readable" for ax in fig.axes for t in ax.texts)
    assert_real_plot(save(fig, tmp_path / "stamps.png"), min_fraction=0.2)
