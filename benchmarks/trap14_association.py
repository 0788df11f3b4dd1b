"""Association of the reference pipeline (trap 1.4.0) on trap-dask's systematic-error sweep fields.

Runs ``trap-run`` (trap 1.4.0, with ``benchmarks/trap_reference/trap_config.toml``'s parameters
and 2 threads) on the sweep fields of ``benchmarks/accuracy.py --sweep`` at ew/ns_sys_err of 0.5x,
1x and 5x the injected positional scatter, and scores each SQLite export with the sweep's own
figures (``trap_dask.scoring.association_figures``): split, mixed, top-N by eta, transients new,
alive twice. Prints one Markdown row per run::

    python benchmarks/accuracy.py --sweep --workdir /tmp/swp        # simulates the fields (once)
    python benchmarks/trap14_association.py [--workdir /tmp/swp] [--settings 0.5 1 5]

The fields must exist under ``--workdir``; databases, TOML copies and logs go to
``WORKDIR/trap14``. trap 1.4.0 needs ``benchmarks/trap_reference/setup_venv.sh`` first. One run
(40 images of 2048x2048 pixels, deblend_nthresh 32) took 22 minutes on 2 cores shared with other
jobs (load average about 8), 3 of them start-up: the six default runs take about two hours.

trap 1.4.0's export has no ``newsource`` table: its ``variability`` table names every light
curve's first extracted source (column ``newsource``), which is taken as that light curve's
new-source entry. Images are mapped to truth epochs by file name.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from throughput import REFERENCE_TOML, db_flags, run_measured, trap14_env

from trap_dask.scoring import association_figures, read_light_curves
from trap_dask.simulate import load_truth

FIELDS = ("sweep_40_0.05_0_0", "sweep_40_0.05_10_0")
SETTINGS = (0.5, 1.0, 5.0)  #: systematic error as multiples of the injected scatter per axis


def sys_err_toml(sys_err: float, out_dir: Path) -> Path:
    """A copy of the reference TOML with ew_sys_err = ns_sys_err = ``sys_err`` (arcsec)."""
    text = REFERENCE_TOML.read_text()
    for key in ("ew_sys_err", "ns_sys_err"):
        text, n = re.subn(rf"(?m)^{key}\s*=.*$", f"{key} = {sys_err}", text)
        assert n == 1, f"{key} not found once in {REFERENCE_TOML}"
    path = out_dir / f"trap_config_sys_err{sys_err:g}.toml"
    path.write_text(text)
    return path


def run_trap14(field: Path, sys_err: float, out_dir: Path, venv: Path, timeout_s: float) -> tuple[Path, float, int]:
    """Run trap 1.4.0 over ``field`` at ``sys_err`` arcsec into a fresh SQLite database.

    Returns (database path, wall s, exit code).
    """
    tag = f"{field.name}_trap14_{sys_err:g}"
    db = out_dir / f"{tag}.db"
    cmd = [str(venv / "bin" / "trap-run"), "-i", str(field), "--nr_threads", "2",
           "--config_file", str(sys_err_toml(sys_err, out_dir)), "--log_dir", str(out_dir / "trap14-logs"),
           *db_flags("sqlite", str(db), "trap 1.4.0")]
    print(f"running: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    _, wall, _, rc = run_measured(cmd, trap14_env(venv), out_dir, out_dir / f"{tag}.log", timeout_s)
    return db, wall, rc


#: trap 1.4.0 has no newsource table: each light curve's first extracted source stands for it
#: (``variability.newsource``), which can only flatter its "transients new" figure.
TRAP14_NEW_SOURCES_SQL = ("SELECT v.src_id, x.im_id FROM variability v "
                          "JOIN extracted_sources x ON x.id = v.newsource")


def row(field: Path, truth: dict, setting: float, sys_err: float, wall: float, rc: int, db: Path) -> str:
    """One Markdown row, in the number formats of accuracy.py's sweep rows."""
    spec = truth["spec"]
    mode = f"phase screen {spec.jitter_scale:g} beams" if spec.jitter_scale else "independent"
    label = f'{setting:g}x = {sys_err:g}"'
    if rc != 0:
        return f"| {mode} | {label} | trap-run exit {rc} | | | | | {wall:.0f} |"
    fig = association_figures(read_light_curves(str(db), truth, TRAP14_NEW_SOURCES_SQL), truth, spec.beam.smaj)
    return (f"| {mode} | {label} | {100 * fig['split']:.2f}% | {100 * fig['mixed']:.2f}% | "
            f"{100 * fig['top_eta_variable_all']:.0f}% | {100 * fig['transients_new']:.0f}% | "
            f"{fig['alive_twice']:g} (+{fig['extra_ids']:g} ids) | {wall:.0f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/swp"),
                        help="directory holding the sweep fields (default: %(default)s)")
    parser.add_argument("--trap14-venv", type=Path, default=Path("/tmp/trap14-venv"),
                        help="virtual environment of trap 1.4.0 (default: %(default)s)")
    parser.add_argument("--fields", nargs="+", default=list(FIELDS), help="field directories under --workdir")
    parser.add_argument("--settings", type=float, nargs="+", default=list(SETTINGS),
                        help="ew/ns_sys_err as multiples of the injected scatter (default: 0.5 1 5)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is killed")
    args = parser.parse_args(argv)
    out_dir = args.workdir / "trap14"
    (out_dir / "trap14-logs").mkdir(parents=True, exist_ok=True)
    lines = ["| field | ew/ns_sys_err | split | mixed | top-N by eta | transients new | "
             "alive twice (+extra ids) | wall s |", "|---|---|---|---|---|---|---|---|"]
    for name in args.fields:
        field = args.workdir / name
        truth = load_truth(field / "truth.json")
        injected = truth["spec"].jitter * 2.0 * truth["spec"].beam.smaj * 3600.0  # arcsec per axis
        for setting in args.settings:
            sys_err = round(setting * injected, 4)
            db, wall, rc = run_trap14(field, sys_err, out_dir, args.trap14_venv, args.timeout)
            lines.append(row(field, truth, setting, sys_err, wall, rc, db))
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
