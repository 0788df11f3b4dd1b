"""TraP 1.4.0's own readers (trap.post_processing) run on a trap-dask export and agree with it.

trap 1.4.0 lives in its own virtual environment (benchmarks/trap_reference/setup_venv.sh, at
$TRAP14_VENV or /tmp/trap14-venv); .ci/run builds it. Without it the test is skipped, except
under CI=true, where it fails.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests._runs import run
from trap_dask.db.backends import DatabaseSettings
from trap_dask.simulate import SurveySpec, simulate_survey

VENV = Path(os.environ.get("TRAP14_VENV", "/tmp/trap14-venv"))
SCRIPT = Path(__file__).parent / "trap14" / "readers.py"
SPEC = SurveySpec(n_epochs=8, shape=(256, 256), n_steady=10, n_variable=3, n_transient=2, n_resolved=0,
                  n_pairs=1, min_separation=4.0, jitter=0.1, seed=21)
ARCSEC = 1 / 3600


def trap14_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        message = f"trap 1.4.0 venv not found at {VENV}: run benchmarks/trap_reference/setup_venv.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="module")
def readers(tmp_path_factory):
    """The export, and what trap 1.4.0's construct_lightcurves/construct_varmetric make of it."""
    python = trap14_python()
    folder = tmp_path_factory.mktemp("trap14")
    simulate_survey(folder / "survey", SPEC)
    db = folder / "export.db"
    run(DatabaseSettings(backend="sqlite", name=str(db)), [str(folder / "survey")])
    out = folder / "trap14.json"
    done = subprocess.run([str(python), str(SCRIPT), str(db), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return db, json.loads(out.read_text())


def query(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_the_export_has_what_trap14_readers_index_by(readers):
    db, _ = readers
    for table, column in (("images", "id"), ("extracted_sources", "id"), ("extracted_sources", "src_id"),
                          ("frequencybands", "band_id")):
        (low, high, distinct), = query(
            db, f"SELECT min({column}), max({column}), count(DISTINCT {column}) FROM {table}")
        assert (low, high) == (0, distinct - 1), f"{table}.{column} is not 0..n-1"
    (forced,), = query(db, "SELECT count(*) FROM extracted_sources WHERE is_force_fit")
    assert forced > 0  # the comparison below leaves something out


def test_trap14_lightcurves_are_the_stored_measurements(readers):
    db, trap = readers
    (band,) = trap["lightcurves"]  # one band
    assert band["columns"] == [f"im_{i}" for i in range(SPEC.n_epochs)]
    ours = {(s, i): f for s, i, f in query(db, "SELECT src_id, im_id, int_flux FROM extracted_sources")}
    duplicates = {s for (s,) in query(db, "SELECT DISTINCT src_id FROM extracted_sources WHERE is_duplicate")}
    compared = 0
    for src_id, row in zip(band["index"], band["values"]):
        if src_id in duplicates:  # trap 1.4.0 copies a duplicate's parent history into it
            continue
        for im_id, flux in enumerate(row):
            expected = ours.get((src_id, im_id))
            assert (flux is None) == (expected is None), (src_id, im_id)
            assert flux is None or math.isclose(flux, expected, rel_tol=1e-12)
            compared += flux is not None
    assert compared == len(ours) - sum(1 for (s, _) in ours if s in duplicates)


def test_trap14_varmetric_agrees_for_light_curves_without_forced_fits(readers):
    db, trap = readers
    theirs = {(r["src_id"], r["freq_band"]): r for r in trap["varmetric"] if r["src_id"] is not None}
    clean = {s for (s,) in query(db, "SELECT src_id FROM extracted_sources GROUP BY src_id "
                                     "HAVING max(is_force_fit) = 0 AND max(is_duplicate) = 0")}
    rows = query(db, "SELECT src_id, freq_band, newsource, v_int, eta_int, lightcurve_max, lightcurve_avg, "
                     "wm_ra, wm_dec, nr_datapoints, first_image FROM variability")
    compared = 0
    for src, band, newsource, v, eta, lc_max, lc_avg, ra, dec, n, first in rows:
        if src not in clean or n < 2:  # trap 1.4.0 leaves forced fits out on purpose; eta needs 2 points
            continue
        t = theirs[(src, band)]
        assert t["nr_datapoints"] == n and t["newsource"] == newsource and t["first_image"] == first
        np.testing.assert_allclose([t["v_int"], t["eta_int"], t["lightcurve_max"], t["lightcurve_avg"]],
                                   [v, eta, lc_max, lc_avg], rtol=1e-6, err_msg=f"src_id {src}")
        # positions: trap 1.4.0 weights by the fit errors only, trap-dask by them with the
        # systematic errors added, so the weighted means differ by a fraction of an arcsec
        assert abs(t["wm_ra"] - ra) * math.cos(math.radians(dec)) < 1 * ARCSEC
        assert abs(t["wm_dec"] - dec) < 1 * ARCSEC
        compared += 1
    assert compared >= SPEC.n_steady // 2
