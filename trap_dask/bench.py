"""``trap-dask bench``: simulate a survey, run it on the cluster you would use, print where the time goes.

The survey is written with ``trap_dask.simulate`` into a temporary directory and processed into a
throw-away database (a SQLite file there, or a PostgreSQL database made for the run and dropped
at the end), with the same cluster flags as ``trap-dask run``: a local cluster by default,
``--scheduler_address`` for a running one, ``--cluster slurm|pbs`` for batch jobs.
``--workers 1 2 4`` runs once per count and prints the columns side by side.

Per-stage times come from the workers and the writer themselves (``seconds`` of the messages:
perf_counter around each stage), summed over the run and divided by the number of images. The CPU
rows set the stages' CPU time (each worker thread's and the writer's, ``Writer.stage_cpu``) against
that of every process of the cluster from when it is up until the images are done
(:func:`cluster_cpu`): the rest is what distributing the work costs (Dask's scheduler and event
loops, transfers, threads handing work on) and the start-up after the cluster's (the writer's
imports, a worker process's first tasks), which weighs less the more images a run has.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

#: Parameters of ``trap-dask run`` that bench sets itself.
OWN_PARAMETERS = ("input_images", "db_name", "db_append", "db_overwrite")
#: Share of each kind of source in a survey of N sources (trap-dask's standard survey: 850 steady,
#: 60 variable, 30 transients, 30 resolved and 15 pairs of 1000).
SOURCE_MIX = {"n_steady": 0.85, "n_variable": 0.06, "n_transient": 0.03, "n_resolved": 0.03, "n_pairs": 0.015}
#: Rows of the table: (label, key of a run's numbers, format).
ROWS = (
    ("images", "images", "{:.0f}"),
    ("images/s (whole run)", "images_per_s", "{:.2f}"),
    ("images/s (after start-up)", "steady_images_per_s", "{:.2f}"),
    ("start-up: launch -> first image submitted, s", "startup_s", "{:.2f}"),
    ("wall time, s", "wall_s", "{:.1f}"),
    ("read, ms/image (worker)", "read", "{:.1f}"),
    ("quality, ms/image (worker)", "quality", "{:.1f}"),
    ("background, ms/image (worker)", "background", "{:.1f}"),
    ("extract, ms/image (worker)", "extract", "{:.1f}"),
    ("forced fits + backfill, ms/image (worker)", "forced", "{:.1f}"),
    ("associate, ms/image (writer)", "associate", "{:.1f}"),
    ("light curves, ms/image (writer)", "update", "{:.1f}"),
    ("commit, ms/image (writer, its own thread or process)", "commit", "{:.1f}"),
    ("waiting for a commit, ms/image (writer)", "wait", "{:.1f}"),
    ("CPU, ms/image (every process of the cluster, while the images are processed)", "cpu", "{:.0f}"),
    ("of it in the stages above (workers' and writer's threads), %", "stage_cpu_pct", "{:.0f}"),
    ("of it elsewhere (Dask, transfers, the writer's and workers' start-up), %", "overhead_pct", "{:.0f}"),
    ("writer busy, % of the wall time", "writer_busy", "{:.0f}"),
    ("worker utilisation, % of the extraction threads", "utilisation", "{:.0f}"),
    ("extraction threads", "threads", "{:.0f}"),
    ("transactions of several images", "batches", "{:.0f}"),
    ("transactions in the writer's committer process", "process_batches", "{:.0f}"),
)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``run`` (cluster, extraction, association...) except the inputs and the
    database name, and the survey's and the benchmark's own."""
    from trap_dask.cli import add_run_arguments

    survey = parser.add_argument_group("the simulated survey")
    survey.add_argument("-i", "--images", type=int, default=24, metavar="N",
                        help="images (epochs) in the survey (default: %(default)s)")
    survey.add_argument("--size", type=int, default=1024, metavar="PIXELS",
                        help="pixels per side of each image (default: %(default)s)")
    survey.add_argument("--sources", type=int, default=300, metavar="N",
                        help="sources per image: 85%% steady, 6%% variable, 3%% transient, 3%% resolved, "
                             "3%% in close pairs (default: %(default)s)")
    survey.add_argument("--seed", type=int, default=1, help="random seed of the survey (default: %(default)s)")
    survey.add_argument("--survey_dir", "--survey-dir", metavar="DIR",
                        help="write (or reuse, when it holds the same survey) the survey here instead "
                             "of a temporary directory, which is removed at the end")
    bench = parser.add_argument_group("the benchmark")
    bench.add_argument("--workers", type=int, nargs="+", metavar="N",
                       help="run once per count and print the runs side by side: N extraction threads "
                            "(--nr_threads) on a local cluster, N worker processes (--n_workers) with "
                            "--cluster slurm|pbs (default: one run with the cluster as configured)")
    bench.add_argument("--report", metavar="FILE.html",
                       help="save Dask's performance report of the run (task stream, profiles, "
                            "transfers); with several --workers, one file per count (FILE-wN.html)")
    add_run_arguments(parser, exclude=OWN_PARAMETERS)


def survey_spec(args: argparse.Namespace):
    from trap_dask.simulate import SurveySpec

    counts = {name: max(1 if name == "n_steady" else 0, round(share * args.sources))
              for name, share in SOURCE_MIX.items()}
    return SurveySpec(n_epochs=args.images, shape=(args.size, args.size), seed=args.seed, **counts)


#: Pixels of an image per simulated source at least (sources 4 beams apart, the beam ~6 pixels
#: wide, and a margin: the simulator places ~1200-1400 pixels' worth at most).
PIXELS_PER_SOURCE = 1500


def _wrong_flags(args: argparse.Namespace) -> str | None:
    """What is wrong with the benchmark's own flags, before anything is simulated or run; None if nothing."""
    if args.images < 1 or args.size < 64 or args.sources < 1:
        return "--images must be >= 1, --size >= 64 and --sources >= 1"
    if args.sources * PIXELS_PER_SOURCE > args.size**2:
        return (f"{args.sources} sources do not fit in {args.size}x{args.size} pixels (one per "
                f"{PIXELS_PER_SOURCE} pixels at most): give fewer --sources or a larger --size")
    if args.workers and min(args.workers) < 1:
        return "--workers takes counts >= 1"
    if args.report:  # found out now, not after the runs
        report = Path(args.report)
        try:
            existed = report.exists()
            with open(report, "a"):
                pass
            if not existed:
                report.unlink()
        except OSError as exc:
            return f"--report {args.report}: cannot write a file there ({exc.strerror or exc})"
    return None


def run_bench(args: argparse.Namespace, environ=None, out=None) -> int:
    """Simulate, run once per worker count, print the table; 0, 1 when a run failed, 2 for wrong flags."""
    environ = os.environ if environ is None else environ
    out = sys.stdout if out is None else out
    from trap_dask.config import PARAMETERS, build_config, resolve_config_file
    from trap_dask.pipeline import PipelineError, Terminated

    wrong = _wrong_flags(args)
    if wrong:
        print(f"trap-dask bench: {wrong}", file=sys.stderr)
        return 2
    config_file = resolve_config_file(args.config_file, Path.cwd())
    cli_values = {name: getattr(args, name, None) for name in PARAMETERS if name not in OWN_PARAMETERS}
    work = Path(tempfile.mkdtemp(prefix="trap-dask-bench-"))
    try:
        survey = Path(args.survey_dir) if args.survey_dir else work / "survey"
        started = time.perf_counter()
        try:
            simulated = _simulate(survey, survey_spec(args))
        except FileExistsError as exc:
            print(f"trap-dask bench: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            where = f"--survey_dir {survey}" if args.survey_dir else f"the survey's folder {survey}"
            print(f"trap-dask bench: {where}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        except ValueError as exc:  # a survey the simulator cannot make (one image with transients)
            print(f"trap-dask bench: {exc}", file=sys.stderr)
            return 2
        print(f"survey: {args.images} images of {args.size}x{args.size} pixels, {args.sources} sources "
              f"({survey}{', reused' if not simulated else f', simulated in {time.perf_counter() - started:.1f} s'})",
              file=out, flush=True)
        base = build_config({**cli_values, "input_images": [str(survey)], "db_name": "bench"}, environ, config_file)
        if base.scheduler_address and args.workers:
            print("trap-dask bench: --workers needs a cluster that trap-dask starts (local or --cluster "
                  "slurm|pbs); on a running scheduler, start it with each number of workers", file=sys.stderr)
            return 2
        columns = []
        for count in args.workers or [None]:
            config = _for_count(base, count)
            config = dataclasses.replace(config, db_name=_database_name(config, work, count), db_overwrite=True)
            report = _report_path(args.report, count, len(args.workers or [None]))
            try:
                summary, cpu = _run_once(config, config_file, report)
            except PipelineError as exc:
                print(f"trap-dask bench: error: {exc}", file=sys.stderr)
                return 1
            except (KeyboardInterrupt, Terminated) as exc:
                print(f"trap-dask bench: {'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}",
                      file=sys.stderr)
                return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
            columns.append((_column_title(config, count), numbers(summary, cpu)))
            if report:
                print(f"performance report: {report}", file=out)
        print(format_table(columns), file=out)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _simulate(survey: Path, spec) -> bool:
    """Write the survey unless ``survey`` holds it already (same spec); whether it was written.

    Only an empty directory or an earlier bench survey (one with ``bench-spec.json``) is replaced:
    anything else raises FileExistsError, so a mistyped path never costs anybody their images.
    """
    import json

    from trap_dask.simulate import simulate_survey

    stamp = survey / "bench-spec.json"
    wanted = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    if stamp.exists() and stamp.read_text() == wanted:
        return False
    if survey.exists() and not stamp.exists() and (not survey.is_dir() or any(survey.iterdir())):
        raise FileExistsError(f"--survey_dir {survey} holds files that are not a bench survey: give a new or "
                              "empty directory (or one an earlier trap-dask bench wrote)")
    if survey.exists():
        shutil.rmtree(survey)
    simulate_survey(survey, spec)
    stamp.write_text(wanted)
    return True


def _for_count(config, count: int | None):
    if count is None:
        return config
    if config.cluster != "local":
        return dataclasses.replace(config, n_workers=count)
    return dataclasses.replace(config, nr_threads=count)


def _database_name(config, work: Path, count: int | None) -> str:
    from trap_dask.db.backends import backend_class

    stem = f"trapdask_bench_{os.getpid()}_{int(time.time())}{'' if count is None else f'_w{count}'}"
    return backend_class(config.db_backend).scratch_name(work, stem)


def _report_path(report: str | None, count: int | None, n_runs: int) -> str | None:
    if not report or n_runs == 1 or count is None:
        return report
    path = Path(report)
    return str(path.with_name(f"{path.stem}-w{count}{path.suffix or '.html'}"))


def _column_title(config, count: int | None) -> str:
    if count is None:
        return "this run"
    return f"{count} {'workers' if config.cluster != 'local' else 'threads'}"


def _run_once(config, config_file, report: str | None):
    """One run into a fresh database, dropped afterwards (PostgreSQL) or left to the temp dir;
    (RunSummary, CPU seconds of the cluster's processes while the images were processed, NaN if
    they could not all be asked)."""
    import dask

    from trap_dask.cluster import PROFILE_KEY
    from trap_dask.pipeline import database_settings, run_pipeline

    cpu = {"seconds": math.nan}

    @contextmanager
    def observe(client):
        before = cluster_cpu(client)
        if report:
            from distributed import performance_report

            watching = performance_report(filename=report)
        else:
            watching = nullcontext()
        with watching:
            yield
        after = cluster_cpu(client)
        if before and after:  # a process new since is counted from its start (a batch job that joined)
            cpu["seconds"] = sum(seconds - before.get(process, 0.0) for process, seconds in after.items())

    try:
        with dask.config.set({PROFILE_KEY: bool(report)}):
            return run_pipeline(config, config_file, observe=observe), cpu["seconds"]
    finally:
        if config.db_backend != "sqlite":
            _drop(database_settings(config))


def process_cpu() -> tuple[str, int, float]:
    """(host, pid, CPU seconds so far) of the process it runs in, user and system, its ended
    children (the writer's committer process) included."""
    times = os.times()
    return socket.gethostname(), os.getpid(), times.user + times.system + times.children_user + times.children_system


def cluster_cpu(client) -> dict[tuple[str, int], float]:
    """CPU seconds so far of each process of the cluster, by (host, pid): the workers, the scheduler
    and this one, each once however many workers it holds (a local cluster's threads share this
    process). Empty when a process could not be asked (a worker lost meanwhile). A local worker
    process that ended meanwhile is in this process's children's time (its nanny runs here)."""
    try:
        samples = [*client.run(process_cpu).values(), client.run_on_scheduler(process_cpu)]
    except Exception as exc:  # noqa: BLE001 - the CPU rows are then left empty; the run goes on
        print(f"trap-dask bench: the CPU of the cluster's processes could not be read ({exc})", file=sys.stderr)
        return {}
    return {(host, pid): seconds for host, pid, seconds in [*samples, process_cpu()]}


def _drop(settings) -> None:
    from trap_dask.db.backends import DatabaseError, drop_database

    try:
        drop_database(settings)
    except DatabaseError as exc:
        print(f"trap-dask bench: could not drop {settings.describe()}: {exc}", file=sys.stderr)


#: The stages of an image that hold an extraction thread (worker_seconds keys).
EXTRACTION_STAGES = ("read", "quality", "background", "extract")


def numbers(summary, cpu: float = math.nan) -> dict[str, float]:
    """The table's numbers of one run (RunSummary; ``cpu``: the cluster's CPU seconds, NaN if unknown)."""
    n = max(summary.n_images, 1)
    stage_share = 100 * summary.stage_cpu_seconds / cpu if cpu > 0 else math.nan
    w, ws = summary.writer_seconds, summary.worker_seconds
    startup = summary.startup_seconds or 0.0
    steady = max(summary.wall_seconds - startup, 1e-9)
    extracting = sum(ws.get(stage, 0.0) for stage in EXTRACTION_STAGES)  # forced fits have a thread of their own
    return {
        "images": summary.n_images,
        "images_per_s": summary.n_images / max(summary.wall_seconds, 1e-9),
        "steady_images_per_s": summary.n_images / steady,
        "startup_s": startup,
        "wall_s": summary.wall_seconds,
        **{stage: 1e3 * ws.get(stage, 0.0) / n for stage in EXTRACTION_STAGES},
        "forced": 1e3 * (ws.get("forced fits", 0.0) + ws.get("backfill", 0.0)) / n,
        **{stage: 1e3 * w.get(stage, 0.0) / n for stage in ("associate", "update", "commit", "wait")},
        "cpu": 1e3 * cpu / n,
        "stage_cpu_pct": stage_share,
        "overhead_pct": 100 - stage_share,
        "writer_busy": 100 * summary.writer_busy_fraction,
        "utilisation": 100 * extracting / (steady * max(summary.n_threads, 1)),
        "threads": summary.n_threads,
        "batches": summary.n_batches,
        "process_batches": summary.n_process_batches,
    }


def format_table(columns: list[tuple[str, dict[str, float]]]) -> str:
    """A Markdown table: one row per ROWS entry, one column per run."""
    header = ["", *(title for title, _ in columns)]
    rows = [[label, *("-" if math.isnan(values[key]) else fmt.format(values[key]) for _, values in columns)]
            for label, key, fmt in ROWS]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(wd) if i == 0 else str(c).rjust(wd)
                                 for i, (c, wd) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (wd + 1) + (":" if i else "-") for i, wd in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def main(args: argparse.Namespace) -> int:
    import logging

    logger = logging.getLogger("trap_dask")
    level = logger.level
    if getattr(args, "log_level", None) is None:  # the table is the output; warnings still show
        logger.setLevel(logging.WARNING)
    try:
        return run_bench(args)
    finally:
        logger.setLevel(level)
