"""Throughput benchmarks of trap-dask, side by side with the reference pipeline (trap 1.4.0).

One subcommand per measurement; each prints a Markdown table and records it (machine, date,
exact command, load average) in benchmarks/RESULTS.md under ``## Throughput``::

    python benchmarks/throughput.py surveys                    # simulate the surveys once (cached)
    python benchmarks/throughput.py compare --survey standard  # trap-dask vs trap 1.4.0, + accuracy
    python benchmarks/throughput.py compare --survey small --backend postgres --no-reference
    python benchmarks/throughput.py compare --survey medium30 --repeat 5      # median of 5 trap-dask runs
    python benchmarks/throughput.py scaling --survey standard --threads 1 2
    python benchmarks/throughput.py memory                     # peak RSS, 50 vs 200 standard images
    python benchmarks/throughput.py stages --images 6          # per-stage timing + profile
    python benchmarks/throughput.py startup                    # --help time and fixed start-up

Surveys and databases live under ``--cache`` (default /tmp/trapdask-bench), never in the repository;
PostgreSQL benchmark databases are dropped after each run. ``--src DIR`` measures the trap_dask
package found in DIR (e.g. a ``git archive`` snapshot) instead of the installed one. The reference
needs ``benchmarks/trap_reference/setup_venv.sh`` first (``--trap14-venv``, default /tmp/trap14-venv).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
from results_table import markdown_table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SECTION = "## Throughput"
REFERENCE_TOML = HERE / "trap_reference" / "trap_config.toml"
PG = dict(host="127.0.0.1", port=5432, user="postgres")
#: Log lines after which the first image is submitted: trap-dask (after the header scan) and trap
#: 1.4.0 (its database is set up after the header scan, just before the first image is read).
START_MARKERS = {"trap-dask": r"in flight", "trap 1.4.0": r"Establishing \w+ database connection"}
_LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
#: Targets of issue 6.
MIN_SPEEDUP, MAX_HELP_S, MAX_STARTUP_S, MAX_MEMORY_GROWTH, MAX_WRITER_BUSY = 10.0, 1.0, 5.0, 1.3, 0.5


@dataclass(frozen=True)
class Survey:
    """A simulated survey: ``trap-dask simulate`` flags and where it is cached."""

    name: str
    n_epochs: int
    size: int  #: pixels per side
    counts: tuple[int, int, int, int, int]  #: steady, variable, transient, resolved, pairs
    seed: int

    def flags(self) -> list[str]:
        names = ("--n_steady", "--n_variable", "--n_transient", "--n_resolved", "--n_pairs")
        counts = [x for pair in zip(names, map(str, self.counts)) for x in pair]
        return ["--n_epochs", str(self.n_epochs), "--shape", str(self.size), str(self.size),
                *counts, "--seed", str(self.seed)]


STANDARD_COUNTS = (850, 60, 30, 30, 15)  # 1000 sources (a pair is two)
LONG_COUNTS = (300, 20, 10, 0, 0)
SURVEYS = {
    s.name: s for s in (
        Survey("small", 20, 1024, (200, 25, 10, 10, 5), seed=1),
        Survey("standard", 50, 2048, STANDARD_COUNTS, seed=2),
        Survey("standard200", 200, 2048, STANDARD_COUNTS, seed=2),
        # the shapes of issue 15's held-out surveys
        Survey("medium30", 30, 2048, (700, 50, 20, 20, 5), seed=3),
        Survey("pairs50", 50, 2048, (560, 30, 10, 8, 100), seed=4),
        Survey("huge", 6, 8192, (2800, 100, 40, 40, 10), seed=5),
        # memory with the length of a run (issue 15: flat from 50 to 500 images); 1024^2, so that a
        # catalogue or database cache that grows with the images stands out against one image's arrays
        Survey("long50", 50, 1024, LONG_COUNTS, seed=6),
        Survey("long500", 500, 1024, LONG_COUNTS, seed=6),
    )
}


@dataclass
class RunResult:
    """One end-to-end run of a pipeline, measured from outside its process tree."""

    pipeline: str
    survey: str
    backend: str
    threads: int | None
    n_images: int
    wall_s: float
    startup_s: float | None  #: launch until the first image is submitted
    peak_rss_mb: float  #: sum over the process tree (shared pages counted once per process)
    returncode: int
    n_detections: int = 0
    n_light_curves: int = 0
    writer_busy: float | None = None  #: fraction of the wall time
    accuracy: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.wall_s

    @property
    def steady_images_per_s(self) -> float:
        """Images/s once the first image has started (start-up excluded)."""
        return self.n_images / (self.wall_s - (self.startup_s or 0.0))


# -- measuring a process tree --------------------------------------------------------------------

class TreeMemory(threading.Thread):
    """Samples the summed RSS of a process and all its descendants (Dask workers included)."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.interval_s, self.peak_bytes = psutil.Process(pid), interval_s, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            total = 0
            try:
                for proc in [self.root, *self.root.children(recursive=True)]:
                    total += proc.memory_info().rss
            except psutil.Error:  # a process ended between listing and reading
                pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> float:
        """Stop sampling; the peak in MB."""
        self._stop_event.set()
        self.join()
        return self.peak_bytes / 2**20


def run_measured(cmd: list[str], env: dict[str, str], cwd: Path, log_path: Path,
                 timeout_s: float) -> tuple[float, float, float, int]:
    """Run ``cmd`` with output to ``log_path``; (launch epoch s, wall s, peak RSS MB, return code).

    A run past ``timeout_s`` has its whole process tree killed and returns code -9.
    """
    with open(log_path, "w") as log:
        launched = time.time()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeMemory(proc.pid)
        sampler.start()
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
            for member in tree:
                member.kill()
            returncode = proc.wait()
        wall = time.time() - launched
    return launched, wall, sampler.stop(), returncode


def first_logged(text: str, marker: str) -> float | None:
    """Epoch seconds of the first log line matching ``marker`` (local-time log stamps)."""
    for line in text.splitlines():
        stamp = _LOG_TIME.search(line)
        if stamp and re.search(marker, line):
            return dt.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


# -- the two pipelines ---------------------------------------------------------------------------

def trap_dask_env(src: Path | None) -> dict[str, str]:
    """The environment of a trap-dask run, its package's bytecode compiled (see compile_trap_dask)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    compile_trap_dask(env)
    return env


#: Compiles the trap_dask package that the interpreter imports.
_COMPILE = ("import compileall, pathlib, trap_dask; "
            "compileall.compile_dir(pathlib.Path(trap_dask.__file__).parent, quiet=1)")
_compiled: set[str | None] = set()  #: PYTHONPATHs whose trap_dask was compiled


def compile_trap_dask(env: dict[str, str]) -> None:
    """Write the bytecode of the trap_dask that ``env`` imports, once: an installed package has it
    (as trap 1.4.0's venv has), but an editable checkout under PYTHONDONTWRITEBYTECODE (set on some
    machines) would compile every module at every start (~0.1-0.2 CPU-s of start-up here)."""
    if env.get("PYTHONPATH") not in _compiled:
        subprocess.run([sys.executable, "-c", _COMPILE], env=env, check=True)
        _compiled.add(env.get("PYTHONPATH"))


def trap14_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRAP_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def db_flags(backend: str, name: str, style: str) -> list[str]:
    """Database flags for a fresh export database; ``style`` is the pipeline's."""
    if backend == "sqlite":
        return ["--db_name", name, "--db_overwrite"]
    flags = ["--db_backend", "postgres", "--db_host", PG["host"], "--db_user", PG["user"],
             "--db_name", name, "--db_overwrite", "--db_port", str(PG["port"])]
    # trap 1.4.0 puts the password into its connection URL verbatim: trust auth ignores it
    return flags + (["--db_password", "unused"] if style == "trap 1.4.0" else [])


def db_url(backend: str, name: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{name}"
    return f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}"


def drop_postgres(name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dbname="postgres", **PG)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def reference_toml(args) -> Path:
    """trap 1.4.0's TOML: the reference file, or a copy with ``--reference-deblend``'s deblend_nthresh."""
    if getattr(args, "reference_deblend", None) is None:
        return REFERENCE_TOML
    text = re.sub(r"(?m)^deblend_nthresh\s*=.*$", f"deblend_nthresh = {args.reference_deblend}",
                  REFERENCE_TOML.read_text())
    path = args.cache / "runs" / f"trap_config_deblend{args.reference_deblend}.toml"
    path.write_text(text)
    return path


def run_pipeline(pipeline: str, survey: Survey, backend: str, threads: int | None, args) -> RunResult:
    """Run one pipeline end to end on a cached survey; count and score its export database."""
    survey_dir = ensure_survey(survey, args)
    work = args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    n = getattr(args, "reference_deblend", None)
    deblend = "" if pipeline == "trap-dask" or n is None else f"_deblend{n}"
    tag = f"{'trapdask' if pipeline == 'trap-dask' else 'trap14'}{deblend}_{survey.name}_{backend}_{threads or 'auto'}"
    name = str(work / f"{tag}.db") if backend == "sqlite" else f"bench_{tag}"
    thread_flags = ["--nr_threads", str(threads)] if threads else []
    if pipeline == "trap-dask":
        cmd = [sys.executable, "-m", "trap_dask.cli", "run", "-i", str(survey_dir), *thread_flags,
               *db_flags(backend, name, pipeline)]
        env = trap_dask_env(args.src)
    else:
        cmd = [str(args.trap14_venv / "bin" / "trap-run"), "-i", str(survey_dir), *thread_flags,
               "--config_file", str(reference_toml(args)), "--log_dir", str(work / "trap14-logs"),
               *db_flags(backend, name, pipeline)]
        env = trap14_env(args.trap14_venv)
    log_path = work / f"{tag}.log"
    print(f"running {pipeline} on {survey.name} ({backend}): {shlex.join(cmd)}", flush=True)
    launched, wall, peak, rc = run_measured(cmd, env, work, log_path, args.timeout)
    text = log_path.read_text(errors="replace")
    started = first_logged(text, START_MARKERS[pipeline])
    busy = re.search(r"writer busy (\d+)%", text)
    result = RunResult(pipeline, survey.name, backend, threads, 0, wall,
                       started - launched if started else None, peak, rc,
                       writer_busy=int(busy.group(1)) / 100 if busy else None)
    if rc != 0:  # timed out or failed: what it committed still gives its rate
        print(f"  FAILED (exit {rc}); see {log_path}:\n{text[-2000:]}", file=sys.stderr)
    try:
        score_database(result, db_url(backend, name), survey_dir / "truth.json")
    except Exception as exc:  # noqa: BLE001 (no database or no tables: nothing was committed)
        print(f"  cannot score the database: {exc}", file=sys.stderr)
    if backend == "postgres":
        drop_postgres(name)
    print(f"  {result.n_images} images in {wall:.1f} s, peak RSS {peak:.0f} MB", flush=True)
    return result


# -- accuracy against the truth file -------------------------------------------------------------

def score_database(result: RunResult, url: str, truth_path: Path) -> None:
    """Fill counts and accuracy from an export database (TraP 1.x tables: both pipelines)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:  # `rejected` is boolean or integer, depending on pipeline and backend
            images = [(i, u) for i, u, rejected in conn.execute(sa.text("SELECT id, url, rejected FROM images"))
                      if not rejected]
            rows = conn.execute(sa.text(
                "SELECT im_id, ra, dec, src_id, is_force_fit FROM extracted_sources")).all()
    finally:
        engine.dispose()
    sources = np.array(rows, dtype=float).reshape(-1, 5)
    blind = sources[sources[:, 4] == 0]
    result.n_images = len(images)
    result.n_detections = len(blind)
    result.n_light_curves = len(np.unique(sources[:, 3]))
    result.accuracy = recovery({Path(u).name: i for i, u in images}, blind[:, :3], truth_path)


def recovery(image_ids: dict[str, int], detections: np.ndarray, truth_path: Path,
             min_snr: float = 10.0) -> dict:
    """Completeness of bright true sources and spurious blind detections, per image.

    ``detections`` holds (im_id, ra, dec) rows of blind detections. A true source at >= ``min_snr``
    x rms in an image is recovered when a detection of that image lies within one beam semi-major
    axis of its (jittered) position; a detection with no true source that close is spurious.
    """
    from trap_dask.scoring import match_nearest
    from trap_dask.simulate import load_truth

    truth = load_truth(truth_path)
    spec, src = truth["spec"], truth["sources"]
    radius = spec.beam.smaj  # deg
    n_bright = n_found = n_spurious = 0
    for image in truth["images"]:
        im_id = image_ids.get(Path(image["path"]).name)
        if im_id is None:
            continue
        epoch, band = image["epoch"], image["band"]
        bright = src["peak_flux"][:, epoch, band] >= min_snr * spec.rms
        ra, dec = src["ra_epoch"][:, epoch], src["dec_epoch"][:, epoch]
        det = detections[detections[:, 0] == im_id]
        found, _ = match_nearest(ra[bright], dec[bright], det[:, 1], det[:, 2], radius)
        to_truth, _ = match_nearest(det[:, 1], det[:, 2], ra, dec, radius)
        n_bright, n_found = n_bright + int(bright.sum()), n_found + int((found >= 0).sum())
        n_spurious += int((to_truth < 0).sum())
    return {"recovered": n_found / max(n_bright, 1), "spurious": n_spurious, "n_true": len(src["id"])}


# -- surveys -------------------------------------------------------------------------------------

def ensure_survey(survey: Survey, args) -> Path:
    """The survey's directory under the cache, simulated on first use or again when it was made by
    a simulator with other SurveySpec fields (an older trap-dask)."""
    from dataclasses import fields

    from trap_dask.simulate import SurveySpec

    outdir = args.cache / survey.name
    truth = outdir / "truth.json"
    if truth.exists() and set(json.loads(truth.read_text())["spec"]) != {f.name for f in fields(SurveySpec)}:
        print(f"{outdir} was simulated by another version of the simulator: simulating it again", flush=True)
        truth.unlink()
    if not truth.exists():
        free_gb = psutil.disk_usage(str(args.cache)).free / 1e9
        need_gb = survey.n_epochs * survey.size**2 * 4 / 1e9
        if free_gb < 2 * need_gb:
            raise SystemExit(f"{survey.name} needs {need_gb:.1f} GB; only {free_gb:.1f} GB free in {args.cache}")
        cmd = [sys.executable, "-m", "trap_dask.cli", "simulate", str(outdir), *survey.flags()]
        print(f"simulating: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, env=trap_dask_env(args.src), check=True)
    return outdir


# -- reporting -----------------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def machine() -> str:
    """CPU model, core count and memory, from lscpu and psutil."""
    fields = dict(line.split(":", 1) for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if ":" in line)
    return (f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM")


def code_version(src: Path | None) -> str:
    """Which trap_dask was measured: the git commit (and whether the tree was modified), or --src."""
    if src is not None:
        return f"trap_dask from {src}"
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "trap_dask"], capture_output=True, text=True).stdout
    return f"commit {commit}{' + uncommitted changes in trap_dask/' if dirty.strip() else ''}"


def record(title: str, body: str, args) -> None:
    """Print a result block and insert it at the end of the Throughput section of the results file."""
    load1, load5, _ = os.getloadavg()
    block = (
        f"\n### {title}\n\n"
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}; machine: {machine()}; "
        f"load average before/at the end: {args.load_before:.2f}/{load1:.2f}\n"
        f"- code: {code_version(args.src)}\n"
        f"- command: `{shlex.join(['python', *sys.argv])}`\n\n{body}\n"
    )
    print(block)
    if args.no_record:
        return
    path = args.results
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if SECTION not in text:
        text = (text.rstrip("\n")
                + f"\n\n{SECTION}\n\nRecorded by `benchmarks/throughput.py` (see benchmarks/README.md).\n")
    start = text.index(SECTION) + len(SECTION)
    following = re.search(r"^## ", text[start:], flags=re.M)
    end = start + following.start() if following else len(text)
    path.write_text(text[:end].rstrip("\n") + "\n" + block + ("\n" + text[end:] if following else ""))


def run_rows(results: list[RunResult]) -> str:
    headers = ["pipeline", "survey", "db", "threads", "images", "wall s", "start-up s", "images/s",
               "images/s after start-up", "sources/s", "peak RSS MB", "writer busy",
               "recovered >=10 sigma", "spurious", "light curves / true"]
    rows = [[r.pipeline + ("" if r.returncode == 0 else f" (exit {r.returncode}: partial)"), r.survey, r.backend,
             r.threads or "auto", r.n_images, r.wall_s, r.startup_s,
             r.images_per_s, r.steady_images_per_s, r.n_detections / r.wall_s, r.peak_rss_mb,
             None if r.writer_busy is None else f"{100 * r.writer_busy:.0f}%",
             f"{100 * r.accuracy['recovered']:.1f}%" if r.accuracy else None,
             r.accuracy.get("spurious"),
             f"{r.n_light_curves} / {r.accuracy['n_true']}" if r.accuracy else None]
            for r in results]
    return markdown_table(headers, rows)


# -- subcommands ---------------------------------------------------------------------------------

def cmd_surveys(args) -> None:
    for name in args.survey:
        print(f"{name}: {ensure_survey(SURVEYS[name], args)}")


def median_run(runs: list[RunResult]) -> RunResult:
    """The run of median wall time (the lower middle one of an even number)."""
    return sorted(runs, key=lambda r: r.wall_s)[(len(runs) - 1) // 2]


def cmd_compare(args) -> None:
    """trap-dask and (unless --no-reference) trap 1.4.0 on each survey and backend, with ratios."""
    results, ratios, spread = [], [], []

    def ours_for(name: str, backend: str) -> RunResult:
        """trap-dask ``--repeat`` times in a row: every run is a row; the ratio takes the median one."""
        runs = [run_pipeline("trap-dask", SURVEYS[name], backend, args.threads, args) for _ in range(args.repeat)]
        if len(runs) > 1:
            walls = ", ".join(f"{r.wall_s:.2f}" for r in runs)
            spread.append(f"- {name} ({backend}): trap-dask wall {walls} s; median {median_run(runs).wall_s:.2f} s")
        results.extend(runs)
        return median_run(runs)

    for name in args.survey:
        for backend in args.backend:
            if args.no_reference:
                ours_for(name, backend)
                continue
            ref = run_pipeline("trap 1.4.0", SURVEYS[name], backend, args.threads, args)
            if args.reference_deblend is not None:
                ref = replace(ref, pipeline=f"trap 1.4.0 (deblend_nthresh {args.reference_deblend})")
            ours = ours_for(name, backend)
            results.append(ref)
            if ours.n_images and ref.n_images:
                wall, steady = ours.images_per_s / ref.images_per_s, ours.steady_images_per_s / ref.steady_images_per_s
                gate = verdict(min(wall, steady) >= MIN_SPEEDUP) if name.startswith("standard") else "-"
                ratios.append([name, backend, wall, steady, gate])
    body = run_rows(results)
    busy = [r.writer_busy for r in results if r.writer_busy is not None]
    if busy:
        body += (f"\n\nWriter busy fraction < {MAX_WRITER_BUSY:.0%}: {verdict(max(busy) < MAX_WRITER_BUSY)} "
                 f"(max {max(busy):.0%})")
    if spread:
        body += f"\n\n{args.repeat} trap-dask runs of each, in a row (the ratios below take the median run):\n\n"
        body += "\n".join(spread)
    if ratios:
        body += "\n\nSpeed-up of trap-dask over trap 1.4.0 (target >= 10x on the standard survey, both columns):\n\n"
        body += markdown_table(["survey", "db", "images/s ratio (wall)", "images/s ratio (after start-up)", "target"],
                               ratios)
    record(f"End to end: {', '.join(args.survey)} ({', '.join(args.backend)})", body, args)


def cmd_scaling(args) -> None:
    results = [run_pipeline("trap-dask", SURVEYS[name], "sqlite", n, args)
               for name in args.survey for n in args.threads_list]
    record(f"Scaling with --nr_threads: {', '.join(args.survey)}", run_rows(results), args)


def cmd_memory(args) -> None:
    """Peak RSS of trap-dask for a survey of 50 images and the same of more (--pair)."""
    short, long = (SURVEYS[name] for name in args.pair)
    results = [run_pipeline("trap-dask", survey, "sqlite", args.threads, args) for survey in (short, long)]
    growth = results[1].peak_rss_mb / results[0].peak_rss_mb
    body = run_rows(results) + (
        f"\n\nPeak RSS {long.n_epochs} / {short.n_epochs} images: {growth:.2f} (target <= {MAX_MEMORY_GROWTH}): "
        f"{verdict(growth <= MAX_MEMORY_GROWTH)}")
    record(f"Memory: {short.n_epochs} vs {long.n_epochs} images of {long.size}^2", body, args)


def cmd_stages(args) -> None:
    from stages import in_run_process

    survey_dir = ensure_survey(SURVEYS[args.survey[0]], args)
    body = in_run_process("table", str(survey_dir), str(args.images), str(args.cache / "runs"), str(args.top),
                          env=trap_dask_env(args.src)).strip()
    record(f"Per-stage timing, {args.images} images of {args.survey[0]}", body, args)


def cmd_startup(args) -> None:
    """``trap-dask --help`` wall time and a run's fixed start-up (cluster and writer actor ready)."""
    env = trap_dask_env(args.src)
    helps = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trap_dask.cli", "--help"], env=env, check=True, capture_output=True)
        helps.append(time.perf_counter() - started)
    probes = [json.loads(subprocess.run(
        [sys.executable, str(HERE / "stages.py"), "startup", str(args.cache / "runs")],
        env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1]) for _ in range(args.repeat)]
    med = {key: statistics.median(p[key] for p in probes) for key in probes[0]}
    help_s = statistics.median(helps)
    rows = [
        ["trap-dask --help (process wall time)", help_s, verdict(help_s < MAX_HELP_S)],
        ["import trap_dask.pipeline + distributed", med["import_s"], "-"],
        ["LocalCluster + client ready", med["cluster_s"], "-"],
        ["writer actor ready", med["actor_s"], "-"],
        ["fixed start-up (cluster + actor)", med["cluster_s"] + med["actor_s"],
         verdict(med["cluster_s"] + med["actor_s"] < MAX_STARTUP_S)],
        ["fixed start-up including the imports", sum(med.values()), verdict(sum(med.values()) < MAX_STARTUP_S)],
    ]
    body = markdown_table([f"what (median of {args.repeat})", "seconds", "target"], rows)
    record("Start-up", body, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/trapdask-bench"),
                        help="surveys, databases and logs (default: %(default)s)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="results file (default: %(default)s)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not write the results file")
    parser.add_argument("--src", type=Path, help="measure the trap_dask package in this directory")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds before a run is killed (default: %(default)s)")
    parser.add_argument("--trap14-venv", type=Path, default=Path("/tmp/trap14-venv"),
                        help="virtual environment of trap 1.4.0 (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, surveys=("standard",), **kwargs):
        p = sub.add_parser(name, help=func.__doc__.split("\n")[0] if func.__doc__ else name, **kwargs)
        p.add_argument("--survey", nargs="+", choices=SURVEYS, default=list(surveys))
        p.add_argument("--threads", type=int, default=None, help="--nr_threads for the runs (default: all cores)")
        p.set_defaults(func=func)
        return p

    add("surveys", cmd_surveys, surveys=("small", "standard"))
    compare = add("compare", cmd_compare, surveys=("small", "standard"))
    compare.add_argument("--backend", nargs="+", choices=("sqlite", "postgres"), default=["sqlite"])
    compare.add_argument("--no-reference", action="store_true", help="trap-dask only")
    compare.add_argument("--repeat", type=int, default=1, metavar="N",
                         help="run trap-dask N times per survey and backend (each a row; the ratio takes the run "
                              "of median wall time): a VM's run-to-run spread can exceed 20%%")
    compare.add_argument("--reference-deblend", type=int, metavar="N",
                         help="run trap 1.4.0 with deblend_nthresh N instead of the reference TOML's 32 "
                              "(0 is trap 1.4.0's own default)")
    add("scaling", cmd_scaling).add_argument("--threads-list", type=int, nargs="+", default=[1, 2])
    add("memory", cmd_memory).add_argument(
        "--pair", nargs=2, default=["standard", "standard200"], choices=SURVEYS, metavar=("SHORT", "LONG"),
        help="the surveys compared (default: standard standard200; long50 long500 for issue 15's 50 to 500)")
    stages = add("stages", cmd_stages)
    stages.add_argument("--images", type=int, default=6, help="images timed (the first is a warm-up)")
    stages.add_argument("--top", type=int, default=12, help="hot spots listed from the profile")
    add("startup", cmd_startup).add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    args.cache = args.cache.resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.load_before = os.getloadavg()[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.src is not None:  # the in-process parts (scoring, stages) import trap_dask too
        sys.path.insert(0, str(args.src.resolve()))
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
