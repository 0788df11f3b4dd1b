"""In-process measurements of trap-dask's stages, for ``throughput.py stages`` and ``startup``.

:func:`stage_table` pushes a few images one after the other through the same functions the
workers and the writer actor run (``trap_dask.tasks.scan/load/extract/force``, ``Writer.associate``
/ ``commit``), with a CPU-time timer wrapped around each inner stage, then profiles the same loop
with cProfile. ``python benchmarks/stages.py startup DIR`` prints (JSON) the import time and how long a
LocalCluster and the writer actor take to be ready, measured in a fresh process.
"""

from __future__ import annotations

import cProfile
import functools
import gc
import importlib
import io
import json
import os
import pstats
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from results_table import markdown_table

#: The stages' clock: CPU time of this process (all in one thread), so that other work on a
#: shared machine does not count; the run's total is wall time.
CLOCK = time.process_time

#: (stage, module, attribute): the functions timed (none of them calls another).
STAGES = (
    ("checksum (scan)", "trap_dask.tasks", "file_checksum"),
    ("checksum (load)", "trap_dask.tasks", "bytes_checksum"),
    ("read header (scan)", "trap_dask.tasks", "read_meta"),
    ("read pixels", "trap_dask.tasks", "read_image"),
    ("quality control", "trap_dask.tasks", "check_quality"),
    ("background/prepare", "trap_dask.tasks", "prepare_image"),
    ("extract", "trap_dask.tasks", "extract_image"),
    ("forced fits", "trap_dask.tasks", "forced_fit"),
    ("associate (plan)", "trap_dask.catalogue", "RunningCatalogue.plan"),
    ("catalogue update", "trap_dask.catalogue", "RunningCatalogue.update"),
    ("catalogue apply", "trap_dask.catalogue", "RunningCatalogue.apply"),
    # the writer's flush writes what commit_image gathered (ExportStore.batch), one transaction per call
    ("commit (database)", "trap_dask.writer", "Writer.flush"),
)


@contextmanager
def timed_stages(totals: dict[str, list[float]]):
    """Wrap every STAGES function with a timer appending seconds per call to ``totals[stage]``."""
    patched = []
    for stage, module_name, attr in STAGES:
        owner = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        if name not in owner.__dict__:
            continue  # an older trap_dask (stages.py compare) without this stage's function
        original = owner.__dict__[name]

        def timer(*args, _f=original, _stage=stage, **kwargs):
            started = CLOCK()
            try:
                return _f(*args, **kwargs)
            finally:
                totals[_stage].append(CLOCK() - started)

        setattr(owner, name, functools.wraps(original)(timer))
        patched.append((owner, name, original))
    try:
        yield totals
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


def _first_images(survey_dir: Path, n_images: int, workdir: Path) -> list[str]:
    """The first ``n_images`` FITS files of a survey, by name, with ``workdir`` made for their database."""
    workdir.mkdir(parents=True, exist_ok=True)
    return sorted(str(p) for p in survey_dir.glob("*.fits"))[:n_images]


def _as_a_run_makes_them(paths: list[str], db_path: Path, **writer_options):
    """(writer, extraction parameters, quality parameters, the scanned ``paths`` in time order) on a
    fresh database at ``db_path``, with the defaults of a run."""
    from trap_dask import tasks
    from trap_dask.config import Config
    from trap_dask.db.store import ExportStore
    from trap_dask.pipeline import database_settings, extraction_params, quality_params
    from trap_dask.writer import Writer

    config = Config(input_images=tuple(paths), db_name=str(db_path), db_overwrite=True)
    settings = database_settings(config)
    ExportStore.create(settings, overwrite=True).close()
    writer = Writer(settings, config, None, **writer_options)
    scans = sorted((tasks.scan(p) for p in paths), key=lambda s: s.meta.taustart_ts)
    return writer, extraction_params(config), quality_params(config), scans


def _write(writer, result, loaded, params) -> None:
    """The writer's part of one image (its extraction ``result``; ``loaded`` for the forced fits)."""
    from trap_dask import tasks
    from trap_dask.messages import CommitSummary

    outcome = writer.associate(result)
    if not isinstance(outcome, CommitSummary):
        writer.commit(tasks.force(loaded, outcome, params) if len(outcome) else None)


def process_images(paths: list[str], db_path: Path) -> None:
    """Scan, load, extract, associate, force-fit and commit ``paths`` in order, in this process,
    one image a transaction."""
    from trap_dask import tasks

    writer, params, quality, scans = _as_a_run_makes_them(paths, db_path)
    for scanned in scans:
        loaded = tasks.load(scanned, quality, params)
        _write(writer, tasks.extract(loaded, params), loaded, params)
    writer.finish("completed")


def plain_threads(survey_dir: Path, n_images: int, workdir: Path, n_threads: int) -> dict[str, float]:
    """What :func:`process_images` does with the worker stages (read, checksum, quality, background,
    extraction) in ``n_threads`` plain threads and the writer's in this one, in time order, its
    commits staged as in a run, no Dask: the images/s and CPU an image that any scheduler could
    reach on this machine, against which a run's distribution overhead is measured. The first
    image warms up, untimed; at most ``2 * n_threads`` images are held at once."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    from trap_dask import tasks

    paths = _first_images(survey_dir, n_images, workdir)
    if len(paths) < 2:
        raise ValueError("plain needs two images at least (the first warms up)")
    writer, params, quality, scans = _as_a_run_makes_them(paths, workdir / "plain.db", stage_every_image=True)

    def write(loaded: tasks.LoadedImage) -> None:
        _write(writer, loaded.result, loaded, params)

    write(tasks.process(scans[0], quality, params))
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        with ThreadPoolExecutor(n_threads) as pool:
            pending: deque[Future[tasks.LoadedImage]] = deque()
            for scanned in scans[1:]:
                pending.append(pool.submit(tasks.process, scanned, quality, params))
                if len(pending) >= 2 * n_threads:
                    write(pending.popleft().result())
            while pending:
                write(pending.popleft().result())
    finally:
        writer.finish("completed")
    n = len(scans) - 1
    return {"images": n, "images_per_s": n / (time.perf_counter() - wall),
            "cpu_ms_per_image": 1e3 * (time.process_time() - cpu) / n}


def stage_table(survey_dir: Path, n_images: int, workdir: Path, top: int = 12) -> str:
    """Markdown: ms per image of each stage (first image excluded as warm-up) and profile hot spots."""
    paths = _first_images(survey_dir, n_images, workdir)
    totals: dict[str, list[float]] = defaultdict(list)
    started = time.perf_counter()
    with timed_stages(totals):
        process_images(paths, workdir / "stages.db")
    wall = time.perf_counter() - started
    steady = {stage: sum(times[1:]) / (len(times) - 1) for stage, times in totals.items() if len(times) > 1}
    per_image = sum(steady.values())
    rows = [[stage, 1e3 * steady[stage], f"{100 * steady[stage] / per_image:.0f}%", 1e3 * totals[stage][0]]
            for stage, _, _ in STAGES if stage in steady]
    body = markdown_table(["stage", "CPU ms / image (images 2..N)", "share", "CPU ms, first image"], rows)
    body += (f"\n\nSum of stages {1e3 * per_image:.0f} ms CPU per image on one core "
             f"({len(paths)} images, {wall:.1f} s in all including warm-up).")
    return body + "\n\n" + hot_spots(paths, workdir / "stages-profile.db", top)


def hot_spots(paths: list[str], db_path: Path, top: int) -> str:
    """cProfile of the same loop: the functions with the most own time (share of the total)."""
    profiler = cProfile.Profile()
    profiler.runcall(process_images, paths, db_path)
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = stats.total_tt
    rows = sorted(((tt, ct, nc, func) for func, (_, nc, tt, ct, _) in stats.stats.items()), reverse=True)[:top]
    table = [[f"{Path(f[0]).name}:{f[1]} {f[2]}", 1e3 * tt / len(paths), f"{100 * tt / total:.1f}%",
              f"{100 * ct / total:.1f}%", nc] for tt, ct, nc, f in rows]
    return (f"cProfile of the same loop ({len(paths)} images, {total:.1f} s profiled), by own time:\n\n"
            + markdown_table(["function", "own ms / image", "own share", "cumulative share", "calls"], table))


def startup_probe(workdir: Path) -> dict[str, float]:
    """Seconds to import the pipeline (without garbage collection, as ``trap-dask run`` imports
    it), start its LocalCluster and have the writer actor ready."""
    started = time.perf_counter()
    gc.disable()
    from distributed import Client  # noqa: F401

    from trap_dask.cluster import start_client
    from trap_dask.config import Config
    from trap_dask.db.store import ExportStore
    from trap_dask.pipeline import database_settings
    from trap_dask.writer import Writer

    gc.enable()
    imported = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    config = Config(db_name=str(workdir / "startup.db"), db_overwrite=True)
    settings = database_settings(config)
    ExportStore.create(settings, overwrite=True).close()
    session = start_client(config)
    ready = time.perf_counter()
    session.submit_writer(Writer, settings, config, None, backend=settings.backend)
    writer = session.writer_actor()
    actor = time.perf_counter()
    writer.finish("completed").result()
    session.close()
    return {"import_s": imported - started, "cluster_s": ready - imported, "actor_s": actor - ready}


#: What the processes that time the stages add to their environment: one BLAS thread, as
#: ``trap-dask run`` sets (a multi-threaded OpenBLAS made the stages 10-30% slower and noisier;
#: RESULTS.md, issue 15 round 5). numpy reads it when it loads: the stages run in a process of their own.
ONE_BLAS_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def as_a_run(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with what ``trap-dask run`` loads numpy with: one BLAS thread, and its CPU dispatch
    (trap_dask.cpu: no AVX-512 sorts where they are slow)."""
    from trap_dask.cpu import numpy_environ

    return {**env, **ONE_BLAS_THREAD, **numpy_environ(env)}


def in_run_process(*args: str, env: dict[str, str] | None = None) -> str:
    """stdout of ``python stages.py ARGS`` in a fresh process, in ``env`` (default: this process's)
    as in a run (:func:`as_a_run`)."""
    return subprocess.run([sys.executable, __file__, *args], env=as_a_run(env or os.environ),
                          capture_output=True, text=True, check=True).stdout


def _as_a_run() -> None:
    """The memory settings of ``trap-dask run`` (a process that times the stages calls this first)."""
    from trap_dask.allocator import reuse_freed_memory

    reuse_freed_memory()


def stage_times(survey_dir: Path, n_images: int, workdir: Path) -> dict[str, float]:
    """CPU ms per image of each stage (images 2..N), as :func:`stage_table` measures them."""
    paths = _first_images(survey_dir, n_images, workdir)
    totals: dict[str, list[float]] = defaultdict(list)
    with timed_stages(totals):
        process_images(paths, workdir / "stages.db")
    return {stage: 1e3 * sum(t[1:]) / (len(t) - 1) for stage, t in totals.items() if len(t) > 1}


#: The worker stages of one image (the writer's stages and the scan are others' work).
WORKER_STAGES = ("checksum (load)", "read pixels", "quality control", "background/prepare", "extract")


def compare_sources(before: Path, after: Path, survey_dir: Path, n_images: int, workdir: Path,
                    rounds: int = 1) -> str:
    """Markdown: CPU ms per image of every stage with the ``trap_dask`` package of ``before`` and
    of ``after`` (directories holding one, e.g. ``git archive BASE trap_dask | tar -x -C DIR``),
    each in a fresh process pinned to one core, as in a run (:func:`as_a_run`), alternately ``rounds`` times;
    per stage the smallest of the rounds (the least disturbed on a shared machine)."""
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(rounds):
        for name, src in (("before", before), ("after", after)):
            cmd = ["taskset", "-c", "1", sys.executable, __file__, "times", str(survey_dir), str(n_images),
                   str(workdir / name)]
            out = subprocess.run(cmd, env={**as_a_run(os.environ), "PYTHONPATH": str(src)},
                                 capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {name: {stage: min(r[stage] for r in rs) for stage in rs[0]} for name, rs in runs.items()}
    rows = [[stage, best["before"][stage], best["after"][stage], f"{best['after'][stage] / best['before'][stage]:.2f}"]
            for stage, _, _ in STAGES if stage in best["before"] and stage in best["after"]]
    measured = [r[0] for r in rows]  # the stages both sides time (an older side may time fewer)
    worker = [k for k in WORKER_STAGES if k in measured]
    for label, keys in ((f"worker stages ({', '.join(worker)})", worker), ("all stages", measured)):
        b, a = (sum(best[name][k] for k in keys) for name in ("before", "after"))
        rows.append([f"**{label}**", b, a, f"**{a / b:.2f}**"])
    return markdown_table(["stage", "before, CPU ms / image", "after, CPU ms / image", "after / before"], rows)


if __name__ == "__main__":
    usage = ("usage: python benchmarks/stages.py startup WORKDIR\n"
             "       python benchmarks/stages.py compare BEFORE_SRC AFTER_SRC SURVEY_DIR "
             "[N_IMAGES [ROUNDS [WORKDIR]]]\n"
             "       python benchmarks/stages.py times SURVEY_DIR N_IMAGES WORKDIR   (JSON, for compare)\n"
             "       python benchmarks/stages.py table SURVEY_DIR N_IMAGES WORKDIR TOP   (Markdown, throughput.py)\n"
             "       python benchmarks/stages.py plain SURVEY_DIR N_IMAGES WORKDIR THREADS   (JSON: no Dask)")
    if len(sys.argv) == 3 and sys.argv[1] == "startup":
        print(json.dumps(startup_probe(Path(sys.argv[2]))))
    elif len(sys.argv) == 5 and sys.argv[1] == "times":
        _as_a_run()
        print(json.dumps(stage_times(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))))
    elif len(sys.argv) == 6 and sys.argv[1] == "table":
        _as_a_run()
        print(stage_table(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), top=int(sys.argv[5])))
    elif len(sys.argv) == 6 and sys.argv[1] == "plain":
        _as_a_run()
        print(json.dumps(plain_threads(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))))
    elif 5 <= len(sys.argv) <= 8 and sys.argv[1] == "compare":
        n, rounds = (int(sys.argv[5]) if len(sys.argv) > 5 else 6), (int(sys.argv[6]) if len(sys.argv) > 6 else 1)
        work = Path(sys.argv[7]) if len(sys.argv) > 7 else Path("/tmp/trapdask-bench/runs/compare")
        print(compare_sources(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), n, work, rounds))
    else:
        sys.exit(usage)
