"""The commands that look at an export database after the run: candidates, lightcurve, etav,
stamps, report. Their parsers import nothing heavy; pandas/matplotlib load when one runs."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

FORMATS = ("table", "csv", "ecsv", "votable", "parquet")
SUFFIX_FORMATS = {".csv": "csv", ".ecsv": "ecsv", ".xml": "votable", ".vot": "votable", ".votable": "votable",
                  ".parquet": "parquet", ".txt": "table"}

DB_HELP = ("export database: a SQLite file, or a PostgreSQL URL such as postgresql://user@host:5432/name "
           "(postgresql:///name takes host, port, user and password from libpq's PGHOST, PGPORT, PGUSER, "
           "PGPASSWORD and ~/.pgpass)")
CUT_HELP = ("Candidates are the new sources (newsource table) and the variability outliers: a Gaussian "
            "(mean, std; iterative 3-sigma clipping) is fitted to log10(eta) and to log10(V) of the light "
            "curves with >= 2 points, and a light curve above mean + ETA_SIGMA*std in log eta AND above "
            "mean + V_SIGMA*std in log V is an outlier (as VAST does; --combine or takes either).")


def _checked(convert: Callable[[str], float], ok: Callable[[float], bool], wanted: str) -> Callable[[str], float]:
    """An argparse type: ``convert`` of the text, refused with what is ``wanted`` unless ``ok``."""
    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: give {wanted}")
        return value

    return parse


_SRC_ID = _checked(int, lambda v: 0 <= v < 2**63, "a source id (a whole number from 0)")
_AT_LEAST_ONE = _checked(int, lambda v: v >= 1, "a whole number, 1 or more")
_SIGMA = _checked(float, lambda v: 0.0 <= v < float("inf"), "a number of sigma, 0 or more")


def _add_cut_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eta-sigma", "--eta_sigma", type=_SIGMA, default=3.0, metavar="X",
                        help="sigma cut on log10 eta (default: 3)")
    parser.add_argument("--v-sigma", "--v_sigma", type=_SIGMA, default=3.0, metavar="Y",
                        help="sigma cut on log10 V (default: 3)")
    parser.add_argument("--combine", choices=("and", "or"), default="and",
                        help="an outlier is above both cuts (and, default) or either (or)")
    parser.add_argument("--forced-fits", action=argparse.BooleanOptionalAction, default=True,
                        help="count forced fits in eta and V (default, classic TraP: a fading transient "
                             "shows only in them); --no-forced-fits uses the blind detections only, "
                             "as TraP 1.4.0 does")


def add_results_commands(commands, add_verbosity: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the five subcommands to the ``trap-dask`` subparsers."""
    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        wrapped = "\n\n".join(textwrap.fill(part, 88) for part in description.split("\n\n"))
        parser = commands.add_parser(name, help=summary, description=wrapped,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("db", metavar="DB", help=DB_HELP)
        add_verbosity(parser)
        return parser

    p = command("candidates", "list transient candidates: new sources and variability outliers",
                "New sources and variability outliers, one row per source and band: position, band, "
                "first image and time, eta, V, max flux, significance.\n\n" + CUT_HELP)
    _add_cut_arguments(p)
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="table prints to the terminal (default; with -o, from the file's suffix)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of the terminal")

    p = command("lightcurve", "plot (or write) the light curve of a source",
                "Integrated flux with error bars against time, per band; forced fits as open squares.")
    p.add_argument("src_id", metavar="SRC_ID", type=_SRC_ID, help="the source (src_id of the variability table)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="FILE.png (plot) or FILE.csv (table); without it the table is printed")

    p = command("etav", "plot the eta-V diagram",
                "Eta against V on log axes, with the sigma-cut lines and the candidates highlighted.\n\n"
                + CUT_HELP)
    _add_cut_arguments(p)
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the PNG to write")

    p = command("stamps", "cut the images around a source",
                "A cutout around the source from each image that holds it, in time order, with the "
                "restoring beam and the measured position drawn. Reads the images the database names.")
    p.add_argument("src_id", metavar="SRC_ID", type=_SRC_ID, help="the source (src_id)")
    p.add_argument("-o", "--output", metavar="FILE", required=True, help="the PNG to write")
    p.add_argument("--max-stamps", "--max_stamps", type=_AT_LEAST_ONE, default=24, metavar="N",
                   help="at most N images, the earliest (default: 24)")

    p = command("report", "write a static HTML report of the run",
                "A static HTML page (no server): the run summary, the candidates table, the eta-V "
                "diagram, and for each candidate its light curve and stamps.\n\n" + CUT_HELP)
    _add_cut_arguments(p)
    p.add_argument("-o", "--output", metavar="DIR", required=True, help="directory for index.html and its files")
    p.add_argument("--max-candidates", "--max_candidates", type=int, default=50, metavar="N",
                   help="light curves and stamps for the N most significant candidates (default: 50)")


def run_results_command(args: argparse.Namespace) -> int:
    """Run one of the results subcommands; errors are one line on stderr, exit status 1."""
    from trap_dask.db.backends import DatabaseError

    try:
        return _COMMANDS[args.command](args)
    except (DatabaseError, LookupError, ValueError, OSError) as exc:
        print(f"trap-dask {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the driver's errors (server down, wrong password): one line
        from sqlalchemy.exc import DBAPIError

        if isinstance(exc, DBAPIError):
            from trap_dask.db.backends import driver_reason

            print(f"trap-dask {args.command}: error: {driver_reason(exc)}", file=sys.stderr)
            return 1
        raise


def _writable(output: str) -> Path:
    """The path of an output file, its folder made if missing (as for the plots)."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _done(path: Path | str) -> int:
    print(f"wrote {path}")
    return 0


def _candidates(args: argparse.Namespace) -> int:
    from trap_dask import results

    fmt = args.format or (SUFFIX_FORMATS.get(Path(args.output).suffix.lower(), "table") if args.output else "table")
    if args.output:
        _writable(args.output)
    frame = results.candidates(args.db, args.eta_sigma, args.v_sigma, args.combine, args.forced_fits)
    cut = frame.attrs["cut"]
    if fmt == "parquet":
        if not args.output:
            raise ValueError("--format parquet needs -o FILE")
        frame.attrs["cut"] = {k: float(v) for k, v in vars(cut).items()}  # stored as JSON
        try:
            frame.to_parquet(args.output, index=False)
        except ImportError:
            raise ValueError("--format parquet needs pyarrow: pip install 'trap-dask[parquet]'") from None
        return _done(args.output)
    table = results.to_table(frame, cut)
    if fmt == "table":
        for name in ("ra", "dec"):
            table[name].info.format = ".5f"
        for name in ("eta", "v", "max_flux_mjy", "significance", "sigma_rms_max", "freq_mhz"):
            table[name].info.format = ".4g"
        lines = table.pformat(max_lines=-1, max_width=-1)
        rule = (f"eta > {cut.eta_threshold:.3g} {args.combine} V > {cut.v_threshold:.3g}" if cut.defined
                else "fewer than two light curves of two or more points to fit a cut to")
        text = "\n".join(lines) + (f"\n{len(frame)} candidates ({int(frame.new.sum())} new sources, "
                                    f"{int(frame.variable.sum())} variability outliers: {rule})\n")
        if args.output:
            Path(args.output).write_text(text)
            return _done(args.output)
        print(text, end="")
        return 0
    if not args.output:
        table.write(sys.stdout, format={"csv": "ascii.csv", "ecsv": "ascii.ecsv", "votable": "votable"}[fmt])
        return 0
    table.write(args.output, format={"csv": "ascii.csv", "ecsv": "ascii.ecsv", "votable": "votable"}[fmt],
                overwrite=True)
    return _done(args.output)


def _source_measurements(args: argparse.Namespace):
    from trap_dask import results

    meas = results.lightcurves(args.db, args.src_id)
    if meas.empty:
        raise LookupError(f"no measurements of source {args.src_id} in {args.db} (no such src_id, or a monitor "
                          "position that no image covered)")
    return meas


def _lightcurve(args: argparse.Namespace) -> int:
    meas = _source_measurements(args)
    columns = ["id", "im_id", "taustart_ts", "freq_band", "int_flux", "int_flux_err", "peak_flux",
               "peak_flux_err", "ra", "dec", "significance_detection_level", "is_force_fit", "url"]
    if args.output is None:
        shown = meas[columns[:-1]].assign(int_flux_mjy=meas.int_flux * 1e3, int_flux_err_mjy=meas.int_flux_err * 1e3)
        print(shown[["id", "im_id", "taustart_ts", "freq_band", "int_flux_mjy", "int_flux_err_mjy",
                     "significance_detection_level", "is_force_fit"]].to_string(index=False))
        return 0
    if Path(args.output).suffix.lower() == ".csv":
        meas[columns].to_csv(_writable(args.output), index=False)
        return _done(args.output)
    from trap_dask import results
    from trap_dask.results.plots import lightcurve_figure, save

    var = results.varmetric(args.db)
    freqs = dict(zip(var.freq_band.astype(int), var.freq_central))
    return _done(save(lightcurve_figure(meas, args.src_id, freqs), args.output))


def _etav(args: argparse.Namespace) -> int:
    from trap_dask import results
    from trap_dask.results.plots import etav_figure, save

    var = results.varmetric(args.db, args.forced_fits)
    cands = results.candidates(args.db, args.eta_sigma, args.v_sigma, args.combine, args.forced_fits)
    return _done(save(etav_figure(var, cands.attrs["cut"], cands, args.combine), args.output))


def _stamps(args: argparse.Namespace) -> int:
    from trap_dask.results import image_checksums
    from trap_dask.results.plots import save
    from trap_dask.results.stamps import stamps_figure

    meas = _source_measurements(args)
    figure = stamps_figure(meas, args.src_id, max_stamps=args.max_stamps, checksums=image_checksums(args.db))
    return _done(save(figure, args.output, dpi=90))


def _report(args: argparse.Namespace) -> int:
    from trap_dask.results.report import write_report

    name = args.db.rsplit("@", 1)[-1] if "://" in args.db else args.db  # never a password
    index = write_report(args.db, args.output, args.eta_sigma, args.v_sigma, args.combine, args.forced_fits,
                         args.max_candidates, db_name=name)
    print(f"wrote {index}; open it in a browser ({index.resolve().as_uri()})")
    return 0


_COMMANDS = {"candidates": _candidates, "lightcurve": _lightcurve, "etav": _etav, "stamps": _stamps,
             "report": _report}
