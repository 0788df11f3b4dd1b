"""Run configuration: one definition of every parameter, read from flags, environment and TOML.

Every parameter is a field of :class:`Config` whose metadata gives its TOML section, unit and help
text; the command line, the TOML reader, the environment reader, the ``config`` export table and
``--help`` are all derived from that one list. Parameter names and sections follow TraP 1.x.

Precedence, highest first: command line, environment (``TRAP_<NAME>``, e.g.
``TRAP_DETECTION_THRESHOLD=6``; the PostgreSQL password also from ``PGPASSWORD``), the TOML file,
the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_FILE = "trap_config.toml"
ENV_PREFIX = "TRAP_"
#: A Dask memory limit: bytes with an optional unit, a fraction of system memory, or 'auto'.
_MEMORY_LIMIT = r"(?i)auto|\d+(\.\d+)?\s*([kmgtp]i?b?|b)?"
#: The smallest memory limit of a worker (bytes): a worker and one image need more than this.
MIN_MEMORY_LIMIT = 256 << 20
#: The longest PostgreSQL identifier, a database's name included (NAMEDATALEN - 1).
PG_NAME_BYTES = 63
#: Parameters that change what association means; appending with other values needs consent.
ASSOCIATION_PARAMETERS = (
    "de_ruiter_r_max", "association_method", "ew_sys_err", "ns_sys_err", "max_nr_consecutive_force_fits",
    "frequency_band", "link_radius", "remove_image_shift", "widen_sys_err", "duplicate_reach",
)

#: Association parameters added after runs began storing theirs: how the runs before behaved.
BEFORE_STORED = {"widen_sys_err": False, "duplicate_reach": 0.0}


#: Parameters whose value may be 'auto' (held as None: measured from the data during the run).
AUTO_PARAMETERS = ("ew_sys_err", "ns_sys_err", "duplicate_reach")
AUTO = "auto"


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type or has an impossible value."""


def _param(default: Any, section: str, unit: str, help: str, secret: bool = False) -> Any:
    """A Config field; a ``secret`` one is left out of reprs, the export database and messages."""
    return field(default=default, repr=not secret,
                 metadata={"section": section, "unit": unit, "help": help, "secret": secret})


@dataclass(frozen=True)
class Config:
    """All parameters of a ``trap-dask run``."""

    # -- general (input and execution) --------------------------------------------------------
    input_images: tuple[str, ...] = _param(
        (), "general", "",
        "FITS images: a file, a directory (searched recursively for *.fits, *.fit, *.fts, also compressed) "
        "or a glob pattern; "
        "repeatable",
    )
    monitor_loc: str | None = _param(
        None, "general", "deg",
        'positions force-fitted in every image, each its own source: a JSON list '
        '"[[ra, dec], ...]" or the path of a file holding one',
    )
    frequency_band: str | None = _param(
        None, "general", "Hz",
        'fixed frequency bands as a JSON list "[[low, high], ...]"; images outside every band '
        "are rejected. Default: bands are formed from the images' own frequencies and bandwidths",
    )
    nr_threads: int | None = _param(
        None, "general", "threads",
        "total worker threads for extraction (default: one per CPU core)",
    )
    scheduler: str = _param(
        "distributed", "general", "",
        "'distributed': a local Dask cluster (scheduler, worker and writer; dashboard with --dashboard): "
        "up to 4 extraction threads run in this process, more in worker processes of up to 4 threads "
        "each; 'threads': one process, worker threads only, however many",
    )
    n_workers: int | None = _param(
        None, "general", "workers",
        "worker processes of the local Dask cluster (default: none up to 4 threads, the threads run in "
        "this process; else nr_threads / 4, rounded up); with --cluster slurm|pbs, the worker processes "
        "to request from the batch system",
    )
    threads_per_worker: int | None = _param(
        None, "general", "threads",
        "threads in each local worker process (default: nr_threads / n_workers; nr_threads for "
        "'threads')",
    )
    memory_limit: str | None = _param(
        None, "general", "bytes",
        "memory limit of each local worker, e.g. '4GB', '0.5' (of system memory) or 'auto' "
        "(default: system memory / n_workers)",
    )
    scheduler_address: str | None = _param(
        None, "general", "",
        "connect to a running Dask scheduler (tcp://host:port) instead of starting a local "
        "cluster (default: DASK_SCHEDULER_ADDRESS or Dask's 'scheduler-address' setting)",
    )
    cluster: str = _param(
        "local", "general", "",
        "'local': Dask cluster on this machine; 'slurm' or 'pbs': workers as batch jobs through "
        "dask-jobqueue (settings from cluster_config or ~/.config/dask/jobqueue.yaml)",
    )
    cluster_config: str | None = _param(
        None, "general", "",
        "YAML file of dask-jobqueue settings (as cluster/jobqueue.yaml) for --cluster slurm|pbs "
        "(default: Dask's own configuration)",
    )
    worker_timeout: float = _param(
        600.0, "general", "s",
        "longest wait for the first Dask worker of a running scheduler (scheduler_address) or of "
        "the batch jobs (cluster slurm|pbs); the run stops if none has joined by then",
    )
    max_concurrent_images: int | None = _param(
        None, "general", "images",
        "most images in flight at once, besides the latest image of each band that is kept for the "
        "new sources' forced fits (default: from the image size and free memory)",
    )
    log_dir: str | None = _param(
        None, "general", "", "directory for the run's log file (default: no log file, log to stderr)"
    )
    # -- database -----------------------------------------------------------------------------
    db_backend: str = _param("sqlite", "database", "", "export database backend: sqlite or postgres")
    db_name: str | None = _param(
        None, "database", "",
        "sqlite: path of the database file; postgres: name of the database (required)",
    )
    db_host: str = _param("localhost", "database", "", "PostgreSQL server host (PGHOST when not given)")
    db_port: int = _param(5432, "database", "", "PostgreSQL server port (PGPORT when not given)")
    db_user: str | None = _param(None, "database", "",
                                 "PostgreSQL user (PGUSER when not given, else the login name)")
    db_password: str | None = _param(
        None, "database", "",
        "PostgreSQL password (or PGPASSWORD, or ~/.pgpass); never stored or logged", secret=True,
    )
    db_overwrite: bool = _param(
        False, "database", "", "drop and recreate an existing export database (only a trap-dask export "
        "database or an empty one: never another file or database)"
    )
    db_append: bool = _param(
        False, "database", "",
        "add the images to an existing export database: known sources continue their light "
        "curves; images already in it are skipped (recognised by path, size and modification "
        "time without being read, else by their SHA-256). Also resumes a killed or interrupted run",
    )
    accept_config_change: bool = _param(
        False, "database", "",
        "with db_append: continue even though association parameters differ from those stored",
    )
    # -- image quality --------------------------------------------------------------------------
    rms_min: float = _param(0.0, "image_quality", "Jy/beam", "reject images whose central rms is below this")
    rms_max: float = _param(math.inf, "image_quality", "Jy/beam", "reject images whose central rms is above this")
    reduction_factor_for_rms: float = _param(
        4.0, "image_quality", "",
        "the rms for quality control is measured on the central 1/f x 1/f of the image",
    )
    # -- extraction -----------------------------------------------------------------------------
    detection_threshold: float = _param(8.0, "extraction", "sigma", "island peak must exceed this x rms")
    analysis_threshold: float = _param(3.0, "extraction", "sigma", "island pixels exceed this x rms")
    deblend_nthresh: int = _param(
        32, "extraction", "",
        "deblending sub-thresholds (0: no deblending); separates blended neighbours, e.g. pairs "
        "1-3 beams apart, and fits a faint neighbour hidden on a bright source's flank as a "
        "second point source (0: neither)",
    )
    ew_sys_err: float | None = _param(
        None, "extraction", "arcsec",
        "systematic position error east-west, added in quadrature to each fit error for "
        "association; 'auto' (default): the scatter of this run's confident associations about "
        "their median offset, measured image by image (see the images table); a number keeps "
        "TraP 1.x's meaning (TraP's usual 10), widened where the data show more (widen_sys_err)",
    )
    ns_sys_err: float | None = _param(
        None, "extraction", "arcsec", "systematic position error north-south; 'auto' (default) as ew_sys_err",
    )
    max_nr_consecutive_force_fits: int = _param(
        10, "extraction", "images",
        "stop force-fitting a source after this many null detections in a row "
        "(resumes when it is detected again)",
    )
    force_beam: bool = _param(False, "extraction", "", "fix fitted shapes to the restoring beam")
    drop_pixel_artefacts: bool = _param(
        True, "extraction", "",
        "leave out islands holding under a twentieth of the pixels that a point source of their "
        "peak covers above the analysis threshold: hot pixels, glitches and small blocks of bad "
        "pixels, which the beam never smoothed and which would become false new sources (islands on "
        "the image's edge or by blank pixels are kept, and all of an image whose median island holds "
        "under 0.3 of a point source's pixels: its header's beam is wrong; false: TraP 1.x, which "
        "takes them all for sources)",
    )
    im_margin: int = _param(0, "extraction.image", "pixels", "ignore sources this close to the edge")
    im_radius: float = _param(
        0.0, "extraction.image", "pixels", "ignore sources beyond this distance from the centre (0: no limit)"
    )
    im_back_size_x: int = _param(50, "extraction.image", "pixels", "width of the background boxes")
    im_back_size_y: int = _param(50, "extraction.image", "pixels", "height of the background boxes")
    # -- association ----------------------------------------------------------------------------
    de_ruiter_r_max: float = _param(
        5.68, "association", "", "largest de Ruiter radius at which a detection joins a known source"
    )
    association_method: str = _param(
        "optimal", "association", "",
        "how competing candidates are resolved: 'optimal' (the most links with the smallest sum of "
        "squared radii: close pairs keep their light curves) or 'greedy' (TraP 1.x: smallest de "
        "Ruiter radius first)",
    )
    remove_image_shift: bool = _param(
        True, "association", "",
        "take each image's coherent offset from the catalogue (the median over its bright isolated "
        "sources, east and north at the image's centre, stored as astrometry_offset_ra/dec) out "
        "of its positions before associating them and adding them to the catalogue, and force-fit "
        "its sources where it shows them, so a shifted image neither splits light curves nor "
        "misplaces forced fits; the catalogue's positions stay in the frame of the run's first "
        "image (false: TraP 1.x)",
    )
    widen_sys_err: bool = _param(
        True, "association", "",
        "where ew_sys_err/ns_sys_err are numbers, associate each image with the larger of them "
        "and the position scatter the data show (as 'auto' measures it, over the earlier images "
        "and this one; in the first image of a field with enough bright isolated sources to measure "
        "it, 0.1 beam), stored on "
        "the images and extracted_sources rows: errors set below the real scatter split light "
        "curves and make false variables (false: TraP 1.x, the numbers alone)",
    )
    link_radius: float = _param(
        0.5, "association", "beam FWHM",
        "a detection that is the only one this close to a known source that no other detection "
        "continues, and has no other known source this close, continues it whatever its de "
        "Ruiter radius, so mis-set position errors cannot break an obvious link (0: TraP 1.x, "
        "the de Ruiter radius alone)",
    )
    duplicate_reach: float | None = _param(
        None, "association", "beam FWHM",
        "a detection that no known source takes, with one within its de Ruiter radius, is a second "
        "detection of it (a duplicate, no transient candidate) only this close to it, or within its "
        "own fitted size where larger; farther, it is a source of its own. 'auto' (default): where "
        "ew_sys_err/ns_sys_err are numbers larger than the position scatter the data show (measured "
        "about the image's shift, which remove_image_shift takes out), the distance within which "
        "the data's scatter would make the known source a candidate, so over-set errors do not take "
        "a transient beside a known source for its duplicate; under 'auto' errors, errors no larger "
        "than the data's, --no-remove_image_shift, or an image whose shift is not measured, anywhere "
        "within the de Ruiter radius, as with 0 (TraP 1.x)",
    )
    merge_duplicates: bool = _param(
        True, "association", "",
        "when two known sources converge closer than fits can tell apart (0.7 beam) and an image "
        "detects one source there, merge the younger light curve into the older in that image's "
        "transaction (recorded in the merges table; false: TraP 1.x, both live on)",
    )
    fit_blends: bool = _param(
        True, "association", "",
        "measure a known source that no detection continues together with a point-like detection "
        "within 2 beams, as two point sources with free positions; at or above the detection "
        "threshold it counts as detected (false: TraP 1.x's separate forced fit at the catalogue "
        "position, which counts a blend's light twice)",
    )
    fit_source_shape: bool = _param(
        True, "association", "",
        "force-fit a resolved source with its own shape: the beam convolved with the mean intrinsic "
        "shape of its detections (their fitted shapes less the beam; a fit with the beam's shape counts "
        "as a point), where that widens the beam's area "
        "by 20% and 5 times its scatter or more; int_flux is then the fitted shape's integral, and "
        "one wide across the line to a detected neighbour is not fitted as a pair's second point "
        "(false: TraP 1.x, the beam's shape, which measures a source several beams across at a "
        "fraction of its flux and makes it a false variable)",
    )
    backfill_new_sources: bool = _param(
        True, "association", "",
        "force-fit each new source in the previous image of its band too, so that its light curve "
        "has the point before it appeared (false: TraP 1.x, whose light curves start at the first "
        "detection: a source new in the last image has no variability index)",
    )

    def exportable(self) -> dict[str, Any]:
        """The parameters as one row for the ``config`` table (lists joined, secrets left out)."""
        row: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in SECRET_PARAMETERS:
                continue
            value = getattr(self, f.name)
            row[f.name] = "; ".join(value) if isinstance(value, tuple) else value
        return row

    def monitor_positions(self) -> list[tuple[float, float]]:
        """The monitor list as (ra, dec) pairs in deg."""
        return _parse_positions(self.monitor_loc, "monitor_loc") if self.monitor_loc else []

    def frequency_bands(self) -> list[tuple[float, float]]:
        """The user's fixed bands as (low, high) pairs in Hz (empty: automatic banding)."""
        return _parse_positions(self.frequency_band, "frequency_band") if self.frequency_band else []


PARAMETERS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
#: Every parameter at its default: the one source of defaults (ExtractionParams, QualityParams
#: and RunningCatalogue take theirs from here).
DEFAULTS = Config()
#: What every message about a stopped run tells its user to do (the database holds a consistent prefix).
RESUME = "run the same command with --db_append to resume"
#: The same after a failed transaction, which the database does not hold.
RESUME_AFTER_FAILURE = f"it holds the images before that transaction: {RESUME}"
#: Parameters never written to the export database, logs or error messages.
SECRET_PARAMETERS = frozenset(name for name, f in PARAMETERS.items() if f.metadata["secret"])
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(f.metadata["section"] for f in PARAMETERS.values()))


def parameter_type(name: str) -> type:
    """The scalar type of a parameter: float, int, bool or str."""
    annotation = str(PARAMETERS[name].type)
    for t in (bool, int, float):
        if t.__name__ in annotation:
            return t
    return str


def coerce(name: str, value: Any, source: str) -> Any:
    """Convert ``value`` (from a TOML file, the environment or a flag) to the type of ``name``.

    Raises ConfigError naming the parameter and where the value came from.
    """
    if name not in PARAMETERS:
        raise ConfigError(f"unknown parameter {name!r} in {source}")
    kind = parameter_type(name)
    shown = "***" if name in SECRET_PARAMETERS else repr(value)
    if name == "input_images":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{name} in {source} must be a path or a list of paths, got {shown}")
    if value is None:
        return None
    try:
        if isinstance(value, str):
            text = value.strip()
            if kind is bool:
                lowered = text.lower()
                if lowered not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
                    raise ValueError
                return lowered in {"1", "true", "yes", "on"}
            if text.lower() == "none" and PARAMETERS[name].default is None and name not in AUTO_PARAMETERS:
                return None
            if text.lower() == AUTO and name in AUTO_PARAMETERS:
                return None
            return kind(text)
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is str and isinstance(value, (list, dict)) and name in ("monitor_loc", "frequency_band"):
            return json.dumps(value)
        if kind is str and isinstance(value, str):
            return value
        raise ValueError
    except ValueError:
        wanted = f"'{AUTO}' or a number" if name in AUTO_PARAMETERS else f"of type {kind.__name__}"
        raise ConfigError(f"{name} in {source} must be {wanted}, got {shown}") from None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TraP-style TOML config into flat ``{name: value}``, checking sections and names."""
    try:
        with open(path, "rb") as fh:
            document = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            section = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict) and section in SECTIONS:
                walk(value, section)
                continue
            where = f"config file {path}" + (f" [{prefix}]" if prefix else "")
            if key not in PARAMETERS:
                raise ConfigError(f"unknown parameter {key!r} in {where}")
            expected = PARAMETERS[key].metadata["section"]
            if prefix and prefix != expected:
                raise ConfigError(f"parameter {key!r} in {where} belongs in section [{expected}]")
            flat[key] = coerce(key, value, where)

    walk(document, "")
    return flat


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Parameters given as ``TRAP_<NAME>`` environment variables (and PGPASSWORD)."""
    values = {}
    for key, text in environ.items():
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in PARAMETERS:
            name = key[len(ENV_PREFIX):].lower()
            values[name] = coerce(name, text, f"environment variable {key}")
    if "db_password" not in values and environ.get("PGPASSWORD"):
        values["db_password"] = environ["PGPASSWORD"]
    return values


#: The values of the enumerated parameters (``choices=`` of their flags).
CHOICES = {
    "db_backend": ("sqlite", "postgres"),
    "scheduler": ("distributed", "threads"),
    "association_method": ("greedy", "optimal"),
    "cluster": ("local", "slurm", "pbs"),
}

#: libpq's environment variables, used for these parameters when nothing else sets them.
LIBPQ_ENVIRONMENT = {"db_host": "PGHOST", "db_port": "PGPORT", "db_user": "PGUSER"}


def _one_of(name: str) -> str:
    *first, last = (repr(c) for c in CHOICES[name])
    return f"must be {', '.join(first)} or {last}"


def validate(config: Config) -> Config:
    """Check values that are of the right type but impossible; raise ConfigError naming the key."""
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            shown = "***" if name in SECRET_PARAMETERS else repr(getattr(config, name))
            raise ConfigError(f"{name} = {shown}: {what}")

    need(config.db_backend in CHOICES["db_backend"], "db_backend", _one_of("db_backend"))
    need(config.db_backend != "postgres" or config.db_name is None or len(config.db_name.encode()) <= PG_NAME_BYTES,
         "db_name",
         f"a PostgreSQL database name has at most {PG_NAME_BYTES} bytes (the server cuts longer ones, "
         "and two names alike in their first bytes would be one database)")
    need(not (config.db_append and config.db_overwrite), "db_append", "cannot be combined with db_overwrite")
    need(config.scheduler in CHOICES["scheduler"], "scheduler", _one_of("scheduler"))
    need(0 < config.detection_threshold < math.inf, "detection_threshold", "must be a number > 0")
    need(0 < config.analysis_threshold <= config.detection_threshold, "analysis_threshold",
         "must be > 0 and <= detection_threshold")
    need(config.deblend_nthresh >= 0, "deblend_nthresh", "must be >= 0")
    for name in ("ew_sys_err", "ns_sys_err"):
        value = getattr(config, name)
        need(value is None or 0 <= value < math.inf, name, "must be 'auto' or a number >= 0 arcsec")
    if (config.ew_sys_err is None) != (config.ns_sys_err is None):
        shown = {name: AUTO if value is None else f"{value:g}" for name, value in
                 (("ew_sys_err", config.ew_sys_err), ("ns_sys_err", config.ns_sys_err))}
        raise ConfigError(f"ew_sys_err = {shown['ew_sys_err']}, ns_sys_err = {shown['ns_sys_err']}: set both to "
                          "numbers (arcsec), or both to 'auto'")
    need(config.max_nr_consecutive_force_fits >= 0, "max_nr_consecutive_force_fits", "must be >= 0")
    need(config.im_margin >= 0, "im_margin", "must be >= 0 pixels")
    need(config.im_radius >= 0, "im_radius", "must be >= 0 pixels (0: no limit)")
    need(config.im_back_size_x >= 4, "im_back_size_x", "must be >= 4 pixels")
    need(config.im_back_size_y >= 4, "im_back_size_y", "must be >= 4 pixels")
    need(0 < config.de_ruiter_r_max < math.inf, "de_ruiter_r_max", "must be a number > 0")
    need(0 <= config.link_radius <= 1, "link_radius", "must be between 0 and 1 beam FWHM")
    need(config.duplicate_reach is None or 0 <= config.duplicate_reach < math.inf, "duplicate_reach",
         "must be 'auto' or a number >= 0 beam FWHM (0: TraP 1.x)")
    need(config.association_method in CHOICES["association_method"], "association_method",
         _one_of("association_method"))
    need(config.rms_min >= 0, "rms_min", "must be >= 0 Jy/beam")
    need(config.rms_max > config.rms_min, "rms_max", "must be > rms_min")
    need(config.reduction_factor_for_rms >= 1, "reduction_factor_for_rms", "must be >= 1")
    need(config.nr_threads is None or config.nr_threads >= 1, "nr_threads", "must be >= 1")
    need(config.n_workers is None or config.n_workers >= 1, "n_workers", "must be >= 1")
    need(config.threads_per_worker is None or config.threads_per_worker >= 1, "threads_per_worker",
         "must be >= 1")
    need(None in (config.nr_threads, config.n_workers, config.threads_per_worker)
         or config.nr_threads == config.n_workers * config.threads_per_worker, "nr_threads",
         "must equal n_workers x threads_per_worker when all three are given")
    need(config.memory_limit is None or re.fullmatch(_MEMORY_LIMIT, config.memory_limit.strip()) is not None,
         "memory_limit", "must be bytes with an optional unit ('4GB', '512MiB'), a fraction "
         "of system memory ('0.5') or 'auto'")
    need(config.memory_limit is None or _memory_bytes(config.memory_limit) >= MIN_MEMORY_LIMIT, "memory_limit",
         f"must be at least {MIN_MEMORY_LIMIT >> 20} MiB a worker, or a fraction of system memory up to 1 "
         "('2.5' is 2 bytes to Dask)")
    need(config.cluster in CHOICES["cluster"], "cluster", _one_of("cluster"))
    need(config.scheduler == "distributed" or (config.cluster == "local" and not config.scheduler_address
                                                and config.n_workers in (None, 1)),
         "scheduler", "'threads' runs in this process: it takes no scheduler_address, cluster or n_workers > 1")
    port = re.fullmatch(r"(\w+://)?\S+:(\d+)", config.scheduler_address or "")
    need(config.scheduler_address is None or (port is not None and 0 < int(port.group(2)) < 65536),
         "scheduler_address", "must be an address such as tcp://host:8786 (a port of 1-65535)")
    need(not (config.scheduler_address and config.cluster != "local"), "cluster",
         "cannot be combined with scheduler_address (the scheduler is already running)")
    need(not ((config.scheduler_address or config.cluster != "local")
              and (config.threads_per_worker or config.memory_limit)),
         "threads_per_worker" if config.threads_per_worker else "memory_limit",
         "shapes a local cluster only: give it to `dask worker` (--nthreads, --memory-limit) or "
         "in the dask-jobqueue settings (cores, processes, memory)")
    need(config.cluster_config is None or config.cluster != "local", "cluster_config",
         "needs --cluster slurm or pbs")
    need(0 < config.worker_timeout < math.inf, "worker_timeout", "must be > 0 s and finite")
    need(not (config.scheduler_address and config.n_workers), "n_workers",
         "cannot be combined with scheduler_address (the running cluster has its own workers)")
    need(config.max_concurrent_images is None or config.max_concurrent_images >= 1,
         "max_concurrent_images", "must be >= 1")
    need(1 <= config.db_port <= 65535, "db_port", "must be a TCP port (1-65535)")
    config.monitor_positions()
    bands = config.frequency_bands()
    need(all(0 < lo < hi for lo, hi in bands), "frequency_band", "each band needs 0 < low < high (Hz)")
    ordered = sorted(bands)
    overlap = next(((a, b) for a, b in zip(ordered, ordered[1:]) if b[0] < a[1]), None)
    need(overlap is None, "frequency_band", "bands {} overlap: an image's frequency must fall in one band only"
         .format(" and ".join(f"[{lo:g}, {hi:g}] Hz" for lo, hi in overlap or ())))
    return config


def association_differences(config: Config, stored: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (stored, new)}`` for each association parameter that differs from a stored config row
    (one a run did not store has its value of ``BEFORE_STORED``; ``widen_sys_err`` counts only where
    the stored position errors are numbers: under 'auto' the catalogue followed the data either way,
    and there an 'auto' ``duplicate_reach`` is TraP's, 0)."""
    stored_auto = stored.get("ew_sys_err") is None

    def value(name: str, raw: Any) -> Any:  # the bands as numbers, however they were written
        if name == "frequency_band" and raw:
            return _parse_positions(raw, name)
        return 0.0 if name == "duplicate_reach" and raw is None and stored_auto else raw

    names = [name for name in ASSOCIATION_PARAMETERS
             if name != "widen_sys_err" or not stored_auto]
    old = {name: stored.get(name, BEFORE_STORED.get(name)) for name in names}
    return {name: (old[name], getattr(config, name)) for name in names
            if value(name, old[name]) != value(name, getattr(config, name))}


def _memory_bytes(text: str) -> float:
    """A memory limit as Dask reads it, in bytes: 'auto' and fractions of system memory (numbers up
    to 1) count as unbounded; other numbers are bytes, with an optional unit (k, M, G, T, P; 'i'
    for powers of 1024)."""
    text = text.strip().lower()
    number = re.match(r"\d+(\.\d+)?", text)
    if text == "auto" or number is None:
        return math.inf
    unit = text[number.end():].strip()
    if not unit and float(number.group()) <= 1:  # a bare number up to 1: a fraction ('1b' is a byte)
        return math.inf
    unit = unit.rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    return float(number.group()) * base ** (" kmgtp".index(unit[:1]) if unit else 0)


def _parse_positions(text: str, name: str) -> list[tuple[float, float]]:
    """Parse a JSON list of number pairs, given inline or as the path of a file holding it."""
    source = text
    if not text.lstrip().startswith("["):
        try:
            source = Path(text).read_text()
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read file {text!r}: {exc.strerror}") from None
    try:
        pairs = json.loads(source)
        result = [(float(a), float(b)) for a, b in pairs]
    except (ValueError, TypeError):
        raise ConfigError(f"{name} must be a JSON list of [a, b] number pairs") from None
    if any(math.isnan(a) or math.isnan(b) for a, b in result):
        raise ConfigError(f"{name}: NaN is not a number it can use")
    if name == "monitor_loc":
        if not all(math.isfinite(ra) and -90 <= dec <= 90 for ra, dec in result):
            raise ConfigError(f"{name}: RAs must be finite and declinations lie in [-90, 90] deg")
        return [(_wrapped_ra(ra), dec) for ra, dec in result]
    return result


def _wrapped_ra(ra: float) -> float:
    """RA (deg) in [0, 360): -30 is 330 (a tiny negative RA is 0, not 360)."""
    wrapped = ra % 360.0
    return 0.0 if wrapped == 360.0 else wrapped


def resolve_config_file(explicit: str | None, cwd: Path) -> Path | None:
    """The TOML file to read: the one given, else ``trap_config.toml`` in ``cwd`` if present."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file {explicit} " + ("is a directory, not a TOML file" if path.is_dir()
                                                              else "does not exist"))
        return path
    default = cwd / DEFAULT_CONFIG_FILE
    return default if default.is_file() else None


def build_config(
    cli_values: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: Path | None,
) -> Config:
    """Merge the layers (flags > environment > TOML > libpq's PGHOST/PGPORT/PGUSER > defaults)
    and validate the result; an impossible value's error names the variable or file it came from."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}

    def layer(values: Mapping[str, Any], source: str | Mapping[str, str]) -> None:
        merged.update(values)
        origin.update({k: source if isinstance(source, str) else source[k] for k in values})

    libpq = {name: var for name, var in LIBPQ_ENVIRONMENT.items() if environ.get(var)}
    layer({name: coerce(name, environ[var], f"environment variable {var}") for name, var in libpq.items()},
          {name: f"environment variable {var}" for name, var in libpq.items()})
    if config_file is not None:
        layer(read_toml(config_file), f"config file {config_file}")
    env = read_environment(environ)
    layer(env, {k: "environment variable " + ("PGPASSWORD" if k == "db_password" and ENV_PREFIX + "DB_PASSWORD"
                                                not in environ else ENV_PREFIX + k.upper()) for k in env})
    layer({k: coerce(k, v, "the command line") for k, v in cli_values.items() if v is not None}, "the command line")
    try:
        return validate(Config(**merged))
    except ConfigError as exc:
        name = str(exc).split(" ", 1)[0]
        if origin.get(name, "the command line") != "the command line":
            raise ConfigError(f"{exc} (from {origin[name]})") from None
        raise
