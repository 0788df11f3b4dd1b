"""trap-dask's extractor against PySE (radio-pyse 0.7.1) with equal thresholds and box sizes.

Usage: python benchmarks/compare_pyse.py [--venv benchmarks/.venv-pyse] [--workdir DIR] [--detection 8]

Run with the project's Python. PySE runs in its own virtual environment (made by
``benchmarks/pyse/setup_venv.sh``) through ``benchmarks/pyse/run_pyse.py``. On a simulated
2048x2048 image (point and resolved sources, with truth) and on the real images in
``/work/shared/realdata`` both extractors use the same detection threshold (``--detection``,
default 8), analysis 3 and 50x50 pixel background boxes. Sources match within half the beam's
major FWHM. Printed per image set: the fraction of
PySE's sources we find and of ours PySE finds, the median integrated-flux ratio (ours / PySE),
the median position offset, each side's time per image and, with truth, each side's flux and
completeness against the injected sources.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trap_dask.extraction.params import ExtractionParams
from trap_dask.image import ImageError, read_meta
from trap_dask.scoring import extract_file, match_mutual, robust_stats
from trap_dask.simulate import SurveySpec, load_truth, simulate_survey

HERE = Path(__file__).resolve().parent
REALDATA = Path("/work/shared/realdata")


def run_pyse(venv: Path, images: list[str], out: Path, params: ExtractionParams) -> list[dict]:
    """PySE's sources of each image (see run_pyse.py), run in its own venv."""
    cmd = [str(venv / "bin" / "python"), str(HERE / "pyse" / "run_pyse.py"), str(out), *images,
           "--detection", str(params.detection_threshold), "--analysis", str(params.analysis_threshold),
           "--back-size", str(params.back_size_x)]
    subprocess.run(cmd, check=True, capture_output=True)
    records = json.loads(out.read_text())
    for record in records:
        record["sources"] = {k: np.asarray(v, float) for k, v in record["sources"].items()}
    return records


def ours(path: str, params: ExtractionParams) -> tuple[np.ndarray, float]:
    """Our detections of one image and the wall time of reading and extracting it (s)."""
    start = time.perf_counter()
    sources, _ = extract_file(path, params)
    return sources, time.perf_counter() - start


def compare(path: str, pyse: dict, truth: dict | None, params: ExtractionParams) -> dict[str, float]:
    """Agreement figures of one image; with ``truth``, each side's figures against it too."""
    mine, seconds = ours(path, params)
    theirs = pyse["sources"]
    radius = read_meta(path).beam.smaj  # half the major FWHM, deg
    to_pyse, to_ours = match_mutual(mine["ra"], mine["dec"], theirs["ra"], theirs["dec"], radius)
    ok = to_pyse >= 0
    dra = (mine["ra"][ok] - theirs["ra"][to_pyse[ok]]) * np.cos(np.deg2rad(mine["dec"][ok]))
    offset = np.hypot(dra, mine["dec"][ok] - theirs["dec"][to_pyse[ok]]) * 3600.0
    out = dict(
        n_ours=len(mine), n_pyse=len(theirs["ra"]),
        pyse_matched=float(np.mean(to_ours >= 0)) if len(to_ours) else float("nan"),
        ours_matched=float(np.mean(ok)) if len(ok) else float("nan"),
        flux_ratio=robust_stats(mine["int_flux"][ok] / theirs["flux"][to_pyse[ok]])[0],
        offset_arcsec=float(np.median(offset)) if ok.any() else float("nan"),
        seconds_ours=seconds, seconds_pyse=pyse["seconds"],
    )
    if truth is not None:
        src = truth["sources"]
        for name, ra, dec, flux in (("ours", mine["ra"], mine["dec"], mine["int_flux"]),
                                    ("pyse", theirs["ra"], theirs["dec"], theirs["flux"])):
            idx, _ = match_mutual(src["ra"], src["dec"], ra, dec, radius)
            found = idx >= 0
            out[f"{name}_complete"] = float(np.mean(found))
            out[f"{name}_spurious"] = int(len(ra) - found.sum())
            out[f"{name}_flux_vs_truth"] = robust_stats(flux[idx[found]] / src["int_flux"][found, 0, 0])[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=str(HERE / ".venv-pyse"), help="PySE virtual environment")
    parser.add_argument("--workdir", help="keep the simulated images here (default: temporary)")
    parser.add_argument("--detection", type=float, default=8.0, help="detection threshold of both, x rms")
    args = parser.parse_args()
    params = ExtractionParams(detection_threshold=args.detection, analysis_threshold=3.0, back_size_x=50,
                              back_size_y=50)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        spec = SurveySpec(n_epochs=2, shape=(2048, 2048), n_steady=800, n_variable=0, n_transient=0,
                          n_resolved=100, n_pairs=50, flux_range=(8.0, 200.0), jitter=0.0, seed=7)
        truth = load_truth(simulate_survey(workdir / "sim", spec))
        real = []
        for path in sorted(REALDATA.glob("*.fits")):
            try:
                read_meta(str(path))
                real.append(str(path))
            except ImageError as exc:
                print(f"skipped {path.name}: {exc}", file=sys.stderr)
        sets = {"simulated": ([im["path"] for im in truth["images"]], truth)}
        sets.update({Path(p).name: ([p], None) for p in real})
        for name, (images, known) in sets.items():
            records = run_pyse(Path(args.venv), images, workdir / f"pyse_{name}.json", params)
            rows = [compare(path, rec, known, params) for path, rec in zip(images, records)]
            summary = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
            print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
