"""Association figures of three-band surveys with close pairs, over seeds, jitter models and the
systematic error (too small, too large, auto): the sweep of RESULTS.md issue 15 round 12.

Usage: python benchmarks/pair_bands_sweep.py OUT.json [WORKDIR]
Run it once more with ``PYTHONPATH`` on an older ``trap_dask`` (a ``git archive`` of it) to compare.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import trap_dask.scoring as tm
from trap_dask.config import build_config
from trap_dask.pipeline import run_pipeline
from trap_dask.simulate import SurveySpec, load_truth, simulate_survey

SEEDS = range(6)
#: (jitter in beam FWHM, phase-screen scale in beams; 0: independent per source)
JITTERS = ((0.05, 0.0), (0.3, 0.0), (0.3, 10.0))
#: ew/ns_sys_err in arcsec ("auto": trap-dask's default)
SYS_ERRS = ("auto", 0.1, 10.0)


def sweep(workdir: Path) -> dict[str, list[float]]:
    """``"seed jitter/scale sys_err"`` -> [split, mixed, extra src_ids, weakest blind S/N]."""
    out = {}
    for seed in SEEDS:
        for jitter, scale in JITTERS:
            spec = SurveySpec(n_epochs=4, freqs=(150e6, 160e6, 1.4e9), seed=seed, n_pairs=6, jitter=jitter,
                              jitter_scale=scale)
            field = workdir / f"s{seed}_j{jitter}_{scale}"
            truth = load_truth(field / "truth.json" if field.exists() else simulate_survey(field, spec))
            for sys_err in SYS_ERRS:
                db = workdir / "sweep.db"
                values = dict(input_images=(str(field),), db_name=str(db), db_overwrite=True, scheduler="threads",
                              nr_threads=2)
                if sys_err != "auto":
                    values.update(ew_sys_err=sys_err, ns_sys_err=sys_err)
                run_pipeline(build_config(values, {}, None))
                f = tm.association_figures(tm.read_light_curves(str(db), truth), truth, spec.beam.smaj)
                with sqlite3.connect(db) as conn:
                    weakest, = conn.execute("SELECT min(significance_detection_level) FROM extracted_sources "
                                            "WHERE is_force_fit = 0").fetchone()
                out[f"{seed} {jitter}/{scale} {sys_err}"] = [f["split"], f["mixed"], f["extra_ids"], weakest]
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    work = Path(sys.argv[2] if len(sys.argv) == 3 else "/tmp/trapdask-bench/pair_bands")
    work.mkdir(parents=True, exist_ok=True)
    Path(sys.argv[1]).write_text(json.dumps(sweep(work), indent=1))
