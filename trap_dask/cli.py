"""The ``trap-dask`` command line. Heavy modules are imported only by the subcommand that runs."""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from trap_dask import __version__
from trap_dask.config import CHOICES, PARAMETERS, RESUME, SECTIONS, ConfigError, parameter_type
from trap_dask.cpu import numpy_environ

SECTION_TITLES = {
    "general": "input and execution",
    "database": "export database [database]",
    "image_quality": "image quality control [image_quality]",
    "extraction": "source extraction [extraction]",
    "extraction.image": "extraction region and background [extraction.image]",
    "association": "association [association]",
}


def _flag_names(name: str) -> list[str]:
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    if name == "input_images":
        names.insert(0, "-i")
    if name == "nr_threads":
        names.append("-n")
    return names


def _describe_default(name: str) -> str:
    default = PARAMETERS[name].default
    if default is None or default == ():
        return ""
    if isinstance(default, float) and math.isinf(default):
        return " (default: no limit)"
    return f" (default: {default})"


def add_run_arguments(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """One flag per Config parameter (but those in ``exclude``), grouped by TOML section, each with
    its unit and default."""
    parser.add_argument(
        "--config_file", "--config-file", metavar="TOML",
        help="TOML file of parameters in TraP 1.x sections (default: ./trap_config.toml if it "
             "exists). Precedence: command line > TRAP_<NAME> environment variables > file > defaults",
    )
    groups = {s: parser.add_argument_group(SECTION_TITLES.get(s, s)) for s in SECTIONS}
    for name, f in PARAMETERS.items():
        if name in exclude:
            continue
        unit = f.metadata["unit"]
        # argparse formats help texts with %: a "20%" of ours is printed as it is written
        text = (f.metadata["help"] + (f" [{unit}]" if unit else "") + _describe_default(name)).replace("%", "%%")
        group = groups[f.metadata["section"]]
        kind = parameter_type(name)
        if name == "input_images":
            group.add_argument(*_flag_names(name), dest=name, action="append", metavar="PATH", help=text)
        elif kind is bool:
            group.add_argument(*_flag_names(name), dest=name, action=argparse.BooleanOptionalAction, help=text)
        elif name in CHOICES:
            group.add_argument(*_flag_names(name), dest=name, choices=CHOICES[name], help=text)
        else:
            group.add_argument(*_flag_names(name), dest=name, metavar=name.upper(), help=text)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; the ``simulate`` flags (which need numpy/astropy) only for that command."""
    parser = argparse.ArgumentParser(
        prog="trap-dask",
        description="Radio transients pipeline on Dask: finds the sources in FITS images, links "
                    "them into light curves, scores variability, flags new sources and writes a "
                    "TraP-compatible export database.",
    )
    parser.add_argument("--version", action="version", version=f"trap-dask {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run", help="process FITS images into an export database",
        description="Process FITS images into an export database (SQLite file by default).",
    )
    add_run_arguments(run)
    _add_verbosity(run)
    _add_dashboard(run)
    bench = commands.add_parser(
        "bench", help="simulate a survey, run it on the cluster and print where the time goes",
        description="Simulate a survey (trap_dask.simulate) into a temporary directory, process it into a "
                    "throw-away database with the cluster flags of `run`, and print images/s, start-up, "
                    "per-stage time per image, the CPU time of the cluster's processes per image and the "
                    "share of it in the stages (the rest is what distributing the work costs), writer busy "
                    "and worker utilisation. The default survey finishes within about a minute on a laptop.",
    )
    if command == "bench":
        from trap_dask.bench import add_bench_arguments

        add_bench_arguments(bench)
        _add_verbosity(bench)
        _add_dashboard(bench)
    simulate = commands.add_parser(
        "simulate", help="write a simulated survey (FITS images + truth file)",
        description="Write N epochs of a simulated field as FITS images, plus truth.json.",
    )
    if command == "simulate":
        from trap_dask.simulate import add_simulate_arguments

        add_simulate_arguments(simulate)
    from trap_dask.cli_results import add_results_commands

    add_results_commands(commands, _add_verbosity)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_const", const=logging.DEBUG, dest="log_level",
                       help="log debugging detail too")
    group.add_argument("-q", "--quiet", action="store_const", const=logging.WARNING, dest="log_level",
                       help="log warnings and errors only (no progress)")


def _add_dashboard(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dashboard", action="store_true",
                        help="start Dask's dashboard on the local cluster (needs bokeh: pip install "
                             "'trap-dask[dashboard]'; about 0.8 s more start-up); a running scheduler "
                             "or a batch cluster has its own")


#: What Dask's nanny sets in its worker processes (``distributed.nanny.pre-spawn-environ``): one
#: BLAS/OpenMP thread per extraction thread. A local cluster runs its threads in this process, so
#: the run sets them too (unless given) before numpy loads: no oversubscribed cores, and the same
#: numbers as in worker processes (a multi-threaded BLAS sums in another order, ~1e-9 relative).
SINGLE_THREADED_LIBRARIES = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _import_numpy_with(environ: dict[str, str]) -> None:
    """Import numpy with ``environ`` set (trap_dask.cpu), then unset again: a batch job's workers run
    on CPUs of their own (local worker processes get it from trap_dask.cluster)."""
    os.environ.update(environ)
    try:
        import numpy  # noqa: F401
    finally:
        for name in environ:
            del os.environ[name]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    collecting = gc.isenabled()
    if any(a in ("run", "bench") for a in argv[:1]):
        from trap_dask.allocator import reuse_freed_memory

        reuse_freed_memory()  # before the run's threads start (each would take an arena of its own)
        if "numpy" not in sys.modules:
            for name, value in SINGLE_THREADED_LIBRARIES.items():
                os.environ.setdefault(name, value)
            _import_numpy_with(numpy_environ())
        # no garbage collection while the run's modules are imported (~1e6 objects, none of them
        # garbage: its passes were 0.15-0.2 s of a 1 s import); the run turns it on again
        gc.disable()
    try:
        return _main(argv)
    finally:
        if collecting:
            gc.enable()


def _main(argv: list[str]) -> int:
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", None)
    logging.getLogger("trap_dask").setLevel(level or logging.INFO)
    if getattr(args, "dashboard", False):
        import dask

        from trap_dask.cluster import DASHBOARD_KEY

        dask.config.set({DASHBOARD_KEY: True})
    try:
        if args.command in ("run", "bench"):
            _import_run_modules()
        if args.command == "run":
            return _run(args)
        if args.command == "bench":
            from trap_dask.bench import main as bench

            return bench(args)
        if args.command == "simulate":
            from trap_dask.simulate import simulate_from_args

            simulate_from_args(args)
            return 0
        from trap_dask.cli_results import run_results_command

        return run_results_command(args)
    except ConfigError as exc:
        print(f"trap-dask: configuration error: {exc}", file=sys.stderr)
        return 2


def _import_run_modules() -> None:
    """Every module a run uses (the header scan's and the writer's too, which the run's own process
    needs whatever the cluster), imported now, while the garbage collector is off (see main) and
    before the run freezes what exists (pipeline._imports_frozen)."""
    import trap_dask.pipeline
    import trap_dask.tasks
    import trap_dask.writer  # noqa: F401


def _run(args: argparse.Namespace) -> int:
    from trap_dask.config import build_config, resolve_config_file
    from trap_dask.pipeline import PipelineError, Terminated, run_pipeline

    config_file = resolve_config_file(args.config_file, Path.cwd())
    cli_values = {name: getattr(args, name) for name in PARAMETERS}
    config = build_config(cli_values, os.environ, config_file)
    try:
        summary = run_pipeline(config, config_file=config_file)
    except PipelineError as exc:
        print(f"trap-dask: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as exc:
        print(
            f"trap-dask: {'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}. The database "
            f"holds every image committed so far; {RESUME}.",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    print(summary.describe())
    if summary.n_images:
        print(f"  look at the results: trap-dask report {_db_argument(config)} -o report "
              f"(then open report/index.html), or trap-dask candidates|lightcurve|etav|stamps --help")
    return 0


def _db_argument(config) -> str:
    """The DB argument of the results commands for this run's database, shell-quoted."""
    import shlex

    from trap_dask.pipeline import database_settings

    return shlex.quote(database_settings(config).impl.address())


def entry() -> None:
    """The ``trap-dask`` program: :func:`main`, then exit without the garbage collector's passes
    over every object while the interpreter shuts down (0.25 s after a run, 8% of a 20-image
    one; a run has closed its database and cluster by then). Ctrl-C before a run has started (while
    it imports) is one line too."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("trap-dask: interrupted", file=sys.stderr)
        code = 128 + signal.SIGINT
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
