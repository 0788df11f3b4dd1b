"""Orchestration of a run: find images, start Dask, stream images through workers and the writer.

Workers read, quality-check and extract images in parallel (a bounded window of images in
flight); each image then goes to the writer actor strictly in time order, to the worker holding
it for the forced fits the writer asks for, and back to the writer to be committed: the route of
one image is ``route.py``, and what travels is ``messages.py``. The client only submits and
counts. Memory stays flat: at most ``max_concurrent_images`` images are held, plus the latest
image of each frequency (new sources are force-fitted in it too).
"""

from __future__ import annotations

import gc
import glob
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trap_dask.bands import fixed_bands
from trap_dask.config import RESUME, RESUME_AFTER_FAILURE, Config
from trap_dask.db.backends import DatabaseError, DatabaseSettings, backend_class, database_exists
from trap_dask.db.store import KnownImages
from trap_dask.extraction.params import ExtractionParams
from trap_dask.image import ImageMeta
from trap_dask.quality import QualityParams

if TYPE_CHECKING:
    from trap_dask.messages import CommitSummary, ScanFailure, ScannedImage

log = logging.getLogger("trap_dask")

#: Suffixes of the FITS files found in a directory: plain, or compressed as astropy reads them.
FITS_SUFFIXES = tuple(f"{base}{packed}" for base in (".fits", ".fit", ".fts")
                      for packed in ("", ".gz", ".bz2", ".xz", ".zip", ".fz"))
#: Rough bytes of worker memory per image pixel while it is held (data, maps, temporaries).
BYTES_PER_PIXEL = 32
#: New writers a run starts after losing the worker that held one, before it stops.
MAX_WRITER_RESTARTS = 3


class PipelineError(RuntimeError):
    """A run that cannot start or cannot go on; the message is user-facing."""


class Terminated(BaseException):
    """SIGTERM (a batch system ending the job, ``kill``): the run stops as for Ctrl-C, at once.

    Not a KeyboardInterrupt: Dask's client answers one raised while it waits on its event loop by
    cancelling what it waited for, which fails (and prints a traceback) when the signal came before
    that had started (distributed 2026.8)."""


@dataclass(frozen=True)
class RunSummary:
    db: str
    n_images: int
    n_skipped: int
    n_rejected: int
    n_sources: int
    n_forced: int
    n_new_sources: int
    n_light_curves: int
    wall_seconds: float
    #: associate / update / wait (for the committer), and commit (in the committer thread or process)
    writer_seconds: dict[str, float]
    rows_committed: int
    n_duplicates: int = 0  #: inputs with the same contents (SHA-256) as an earlier input of this run
    startup_seconds: float | None = None  #: from the start of the run until the first image was submitted
    worker_seconds: dict[str, float] = field(default_factory=dict)  #: worker time per stage (messages.WORKER_STAGES)
    n_threads: int = 0  #: extraction threads of the cluster
    n_batches: int = 0  #: writer transactions of more than one image
    n_process_batches: int = 0  #: transactions written by the writer's committer process (it fell behind)
    #: CPU seconds of the stages (workers' tasks, the writer's entry points and commits; Writer.stage_cpu)
    stage_cpu_seconds: float = 0.0
    n_artefacts: int = 0  #: islands left out as pixel artefacts (hot pixels, glitches), in every image

    @property
    def writer_busy_fraction(self) -> float:
        """The writer's share of the wall time: associating, updating and waiting for its commits
        (those run beside it, in its committer thread or process)."""
        w = self.writer_seconds
        busy = w["associate"] + w["update"] + w.get("wait", 0.0)
        return busy / self.wall_seconds if self.wall_seconds else 0.0

    def describe(self) -> str:
        w = self.writer_seconds
        rate = self.rows_committed / w["commit"] if w["commit"] else 0.0
        where = (f" and process ({self.n_process_batches} of its transactions)" if self.n_process_batches
                 else "")
        copies = (f", {self.n_duplicates} {'copy' if self.n_duplicates == 1 else 'copies'} of another input"
                  if self.n_duplicates else "")
        artefacts = (f" ({self.n_artefacts} pixel artefacts left out: hot pixels or glitches, see the log)"
                     if self.n_artefacts else "")
        return (
            f"trap-dask: {self.n_images} images ({self.n_rejected} rejected, {self.n_skipped} already "
            f"in the database{copies}) -> {self.db}\n"
            f"  {self.n_sources} detections{artefacts}, {self.n_forced} forced fits, "
            f"{self.n_light_curves} light curves, {self.n_new_sources} new sources\n"
            f"  {self.wall_seconds:.1f} s ({self.n_images / max(self.wall_seconds, 1e-9):.1f} images/s), "
            f"writer busy {100 * self.writer_busy_fraction:.0f}% (associate {w['associate']:.1f} s, "
            f"light curves {w['update']:.1f} s, waiting {w.get('wait', 0.0):.1f} s; commit {w['commit']:.1f} s "
            f"in its own thread{where}: {rate:.0f} rows/s)"
        )


def find_images(patterns: tuple[str, ...]) -> list[str]:
    """Absolute paths of the FITS files named by files, directories (recursive) or globs.

    A file named explicitly is taken whatever its suffix; directories, also those a glob
    matches, are searched for files with a FITS suffix. A broken symbolic link is kept (under
    its own path), so that it is recorded as an unreadable file rather than silently dropped.
    """
    found: set[str] = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            found.add(str(path.resolve()))
            continue
        matches = [path] if path.is_dir() else [Path(p) for p in glob.glob(pattern, recursive=True)]
        if not matches:
            raise PipelineError(f"input {pattern!r} matches no file or directory")
        for match in matches:
            for p in _below(match) if match.is_dir() else [match]:
                if p.is_file() and p.name.lower().endswith(FITS_SUFFIXES):
                    found.add(str(p.resolve()))
                elif p.is_symlink() and not p.exists() and (p == path or p.name.lower().endswith(FITS_SUFFIXES)):
                    found.add(os.path.join(os.path.realpath(p.parent), p.name))  # one path whatever the route
    return sorted(found)


def _below(directory: Path) -> Iterator[Path]:
    """Every entry under ``directory``, following links to directories (a data directory linked in),
    each real directory once (a link back up is no loop)."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        if os.path.islink(root):
            log.info("searching %s, a link to %s", root, real)
        yield from (Path(root, name) for name in (*files, *dirs))


def extraction_params(config: Config) -> ExtractionParams:
    return ExtractionParams(
        detection_threshold=config.detection_threshold,
        analysis_threshold=config.analysis_threshold,
        deblend_nthresh=config.deblend_nthresh,
        force_beam=config.force_beam,
        drop_pixel_artefacts=config.drop_pixel_artefacts,
        margin=config.im_margin,
        radius=config.im_radius,
        back_size_x=config.im_back_size_x,
        back_size_y=config.im_back_size_y,
        # 'auto' (None): the writer sets each image's systematic error once it has measured it
        ew_sys_err=config.ew_sys_err or 0.0,
        ns_sys_err=config.ns_sys_err or 0.0,
    )


def quality_params(config: Config) -> QualityParams:
    return QualityParams(
        rms_min=config.rms_min, rms_max=config.rms_max,
        reduction_factor_for_rms=config.reduction_factor_for_rms,
    )


def database_settings(config: Config) -> DatabaseSettings:
    if not config.db_name:
        raise PipelineError("no export database given: use --db_name (a file path for sqlite)")
    # a SQLite path is resolved here: a remote writer's worker has another working directory
    try:
        name = backend_class(config.db_backend).resolve_name(config.db_name)
    except DatabaseError as exc:
        raise PipelineError(str(exc)) from None
    return DatabaseSettings(
        backend=config.db_backend, name=name, host=config.db_host,
        port=config.db_port, user=config.db_user, password=config.db_password,
    )


def default_window(metas: list[ImageMeta], n_threads: int, available: float | None = None) -> int:
    """Images in flight: enough to keep every thread busy, few enough for half the free memory
    (``available`` bytes, default: now) once the latest image of each frequency is held too."""
    import psutil

    if available is None:
        available = psutil.virtual_memory().available
    largest = max((m.shape[0] * m.shape[1] for m in metas), default=1)
    held = len({m.freq_eff for m in metas})  # one per band, kept for the new sources' backfill
    by_memory = int(0.5 * available / (BYTES_PER_PIXEL * largest)) - held
    # each thread extracting one, one being associated and committed, one ready for the writer
    return max(2, min(n_threads + 2, by_memory))


def run_pipeline(config: Config, config_file: Path | None = None, observe=None) -> RunSummary:
    """Process every input image into the export database; returns totals for the summary.

    ``observe``: called with the Dask client once the cluster is up, returns a context manager
    held while the images are processed and exited with the run's exception if it failed
    (``trap-dask bench``: Dask's performance report, the cluster's CPU time).
    """
    from trap_dask.cluster import ClusterError, check_cluster

    started = time.perf_counter()
    _configure_logging(config)
    log.info("config file: %s", config_file or "none (defaults, environment and flags only)")
    paths = find_images(config.input_images)
    if not paths:
        raise PipelineError("no FITS images found in the inputs (use -i/--input_images)")
    settings = database_settings(config)
    try:
        check_cluster(config)  # wrong batch-system settings stop the run before the database is touched
    except ClusterError as exc:
        raise PipelineError(str(exc)) from None
    with _terminate_as_interrupt() as terminated, _gil_switch_interval(GIL_SWITCH_S), _imports_frozen():
        return _run_locked(config, config_file, settings, paths, started, observe, terminated)


def _run_locked(config, config_file, settings, paths, started, observe=None,
                terminated: threading.Event | None = None) -> RunSummary:
    """Under the run lock: prepare the database and scan the headers (in a thread) while the Dask
    cluster starts (here: signal handling belongs to the main thread), then process."""
    from concurrent.futures import ThreadPoolExecutor

    from trap_dask.cluster import ClusterError, start_client
    from trap_dask.db.lock import LockLost, RunLock

    try:
        if config.db_append and not database_exists(settings):  # a typo must not start a new catalogue
            raise PipelineError(f"{settings.describe()} does not exist, so there is nothing to append to; "
                                "a run without --db_append creates it")
        with RunLock(settings) as lock:
            with ThreadPoolExecutor(1, thread_name_prefix="trap-dask-prepare") as pool:
                prepared = pool.submit(_prepare_and_scan, settings, config, paths)
                try:
                    session = start_client(config)
                except ClusterError as exc:
                    append, _, _ = prepared.result()  # an error of the database first
                    if not append:  # the database this run just made holds nothing yet: leave none behind
                        _drop_quietly(settings)
                    raise PipelineError(str(exc)) from None
                except BaseException:
                    prepared.result()
                    raise
                try:
                    append, known, scans = prepared.result()
                except BaseException:
                    session.close()
                    raise
            try:
                return _process(config, config_file, settings, session, append, known, scans, started, observe,
                                lock, terminated)
            except Exception as exc:  # an interrupted run keeps its database: --db_append goes on with it
                if isinstance(exc, (PipelineError, DatabaseError)) and RESUME in str(exc) and _gone(settings):
                    again = f"{settings.describe()} no longer exists: run the same command without --db_append"
                    raise PipelineError(str(exc).replace(RESUME_AFTER_FAILURE, again).replace(RESUME, again)) from None
                if append or isinstance(exc, LockLost) or not _drop_if_imageless(settings):
                    raise  # (a run that lost its lock leaves the database to the run that holds it)
                if isinstance(exc, (PipelineError, DatabaseError)):
                    removed = "nothing was recorded, so the new database was removed: run the same command again"
                    message = str(exc)
                    raise PipelineError(message.replace(RESUME, removed) if RESUME in message
                                        else f"{message}; {removed}") from None
                raise
    except DatabaseError as exc:
        raise PipelineError(str(exc)) from None


def _gone(settings: DatabaseSettings) -> bool:
    """Whether the run's database is known to be gone (dropped or deleted while the run wrote to
    it); False where that cannot be told (its server does not answer)."""
    try:
        return not database_exists(settings)
    except Exception:  # noqa: BLE001 - a question asked while reporting another error
        return False


def _drop_if_imageless(settings: DatabaseSettings) -> bool:
    """Drop the database a run created if it holds no image (the run failed before its first), so
    that the same command can simply be run again; whether it did."""
    from trap_dask.db.store import ExportStore

    try:
        store = ExportStore.open(settings)
        try:
            known = store.known_images()
        finally:
            store.close()
    except DatabaseError:
        return False
    if known.checksums or known.unreadable:
        return False
    _drop_quietly(settings)
    return True


def _drop_quietly(settings: DatabaseSettings) -> None:
    from trap_dask.db.backends import drop_database

    try:
        drop_database(settings)
    except DatabaseError as drop_error:
        log.warning("could not remove the empty %s: %s", settings.describe(), drop_error)


def _prepare_and_scan(settings: DatabaseSettings, config: Config, paths: list[str]):
    """The database ready (see prepare_database), and every input's header read; (append, known, scans).
    PipelineError for an append of images older than the database's latest."""
    append, known = prepare_database(settings, config)
    scans = scan_inputs(paths, checksum=known.checksum_kind if known.checksums else None, stored=known.stored)
    _check_time_order(scans, known, settings)
    return append, known, scans


def _check_time_order(scans: list, known: KnownImages, settings: DatabaseSettings) -> None:
    """PipelineError if an image to append starts before the latest one the database holds: the
    light curves, their parents and the new sources follow the images in time order, so an
    earlier image cannot join them afterwards."""
    from trap_dask.messages import ScannedImage

    if known.latest is None:
        return
    earlier = sorted((s.meta.taustart_ts, s.meta.url) for s in scans
                     if isinstance(s, ScannedImage) and not _already_stored(s, known)
                     and s.meta.taustart_ts < known.latest)
    if earlier:
        start, url = earlier[0]
        raise PipelineError(
            f"{len(earlier)} of the images to append start before the latest image in {settings.describe()} "
            f"({known.latest:%Y-%m-%d %H:%M:%S} UTC), e.g. {url} ({start:%Y-%m-%d %H:%M:%S}): an append adds "
            "images after those the database holds, because light curves and new sources follow the images "
            "in time order. Process all the images into a new database (without --db_append), or leave "
            "the earlier ones out")


def scan_inputs(paths: list[str], checksum: str | None = None,
                stored: Mapping[str, tuple[int, int, str]] | None = None) -> list:
    """ScannedImage or ScanFailure of each path, headers read in threads here (checksums only to
    recognise images already in the database, whose files are read only where their path, size or
    modification time differ from those ``stored``, see tasks.scan; else they are computed when
    the image is loaded)."""
    from concurrent.futures import ThreadPoolExecutor

    from trap_dask.tasks import scan

    if len(paths) < 4:
        return [scan(p, checksum=checksum, stored=stored) for p in paths]
    with ThreadPoolExecutor(min(8, len(paths)), thread_name_prefix="trap-dask-scan") as pool:
        return list(pool.map(lambda p: scan(p, checksum=checksum, stored=stored), paths))


def prepare_database(settings: DatabaseSettings, config: Config) -> tuple[bool, KnownImages]:
    """Create the export database, or open it to append: see ExportStore.prepare."""
    from trap_dask.db.store import ExportStore

    return ExportStore.prepare(settings, config)


def _process(config, config_file, settings, session, append, known, scans, started, observe=None,
             lock=None, terminated: threading.Event | None = None) -> RunSummary:
    """Stream the scanned images through the workers and the writer actor (route.py), checking as it
    goes that the run still holds its ``lock`` (a RunLock) and that no SIGTERM went unheard
    (``terminated``, see :func:`_terminate_as_interrupt`)."""
    from contextlib import ExitStack

    from distributed import KilledWorker

    from trap_dask.cluster import STOPPED_FOR_MEMORY, ClusterError, check_inputs_readable
    from trap_dask.db.lock import LockLost
    from trap_dask.messages import ScanFailure, ScannedImage
    from trap_dask.writer import Writer

    log.info("export database: %s%s", settings.describe(), " (appending)" if append else "")
    client = session.client
    status, writer, finished = "failed", None, None
    totals = {"rejected": 0, "sources": 0, "forced": 0, "new": 0, "duplicates": 0, "artefacts": 0}
    fresh = [s for s in scans if not _already_stored(s, known)]
    progress = _Progress()
    observing = ExitStack()
    try:
        if observe is not None:
            observing.enter_context(observe(client))
        log.info(session.dashboard)
        session.submit_writer(Writer, settings, config, str(config_file) if config_file else None,
                              backend=settings.backend, append=append, stage_every_image=True)
        check_inputs_readable(client, [s.url for s in scans])
        if len(fresh) < len(scans):
            log.info("%d images already in the database: skipped", len(scans) - len(fresh))
            _say_renamed_copies(scans, fresh, known)
        failures = [s for s in fresh if isinstance(s, ScanFailure)]
        images = sorted(
            (s for s in fresh if isinstance(s, ScannedImage)),
            key=lambda s: (s.meta.taustart_ts, s.meta.freq_eff, s.meta.url),
        )
        params, quality = extraction_params(config), quality_params(config)
        _say_shared_start_times(images)
        _say_empty_regions(images, params)
        _say_small_background_boxes(images, config)
        _say_large_position_errors(images, config)
        _say_uncovered_monitors(images, config.monitor_positions(), params)
        window = config.max_concurrent_images or default_window([s.meta for s in images], session.n_threads)
        log.info("%d images to process (%d rejected on reading: an unreadable file or header), up to %d in flight",
                 len(fresh), len(failures), window)
        progress.started = time.perf_counter()
        watch = _AstrometryWatch(config)
        with _progress(len(fresh)) as bar:
            while True:
                try:
                    writer = session.writer_actor()
                    for failure in failures[progress.failure:]:
                        summary = writer.reject_unreadable(failure).result()
                        _count(totals, summary, failure.url, bar)
                        progress.failure += 1
                    with _stop_on_interrupt() as stop:
                        for index, url, summary in _stream(session, writer, images, window, params, quality,
                                                           progress, fixed_bands(config.frequency_bands())):
                            if index < progress.counted:  # staged by a writer that was lost, redone
                                continue
                            progress.counted = index + 1
                            _count(totals, summary, url, bar)
                            watch(summary)
                            if lock is not None:
                                lock.check()
                            if stop.is_set():
                                raise KeyboardInterrupt
                            if terminated is not None and terminated.is_set():
                                raise Terminated
                    break
                except (KeyboardInterrupt, ClusterError, LockLost):
                    raise
                except Exception:
                    if (session.scheduler_lost() or session.writer_lost() is None
                            or progress.restarts == MAX_WRITER_RESTARTS):
                        raise
                    writer = None
                    _restart_writer(session, settings, config, config_file, progress)
        status = "completed"
    except (KeyboardInterrupt, Terminated):
        status = "interrupted"
        raise
    except PipelineError:  # already says what happened (a writer that could not be replaced)
        raise
    except ClusterError as exc:
        raise PipelineError(str(exc)) from None
    except Exception as exc:
        if lost := session.scheduler_lost():
            writer = None
            raise PipelineError(lost) from exc
        lost = session.writer_lost()
        if lost is None:
            if isinstance(exc, KilledWorker) and (memory := session.memory.sentence()):
                raise PipelineError(f"{exc}. {memory}. {STOPPED_FOR_MEMORY}") from exc
            raise
        session.abandon_writer()  # the run's end waits for its callers (_drain)
        writer = None
        raise PipelineError(lost) from exc
    finally:
        writer = writer if writer is not None else session.ready_writer()
        try:
            if writer is not None:
                finished = writer.finish(status).result()
        except Exception as exc:  # noqa: BLE001 - the run's own error, if any, is the one to show
            if status == "completed":
                raise PipelineError(f"could not record the end of the run: {exc}") from None
            log.warning("could not record the end of the run: %s", exc)
        finally:
            try:
                observing.__exit__(*sys.exc_info())  # the observer sees how the run ended
            finally:
                if status != "completed" and not session.scheduler_lost():  # (a completed run has no task left)
                    _drain(session.client, DRAIN_S)
                session.close()
    if finished["failure"]:  # the last images could not be written: the run failed
        raise PipelineError(finished["failure"])
    return RunSummary(
        db=settings.describe(), n_images=progress.lost_writers_images + finished["n_images"],
        n_skipped=len(scans) - len(fresh),
        n_rejected=totals["rejected"], n_sources=totals["sources"], n_forced=totals["forced"],
        n_new_sources=totals["new"], n_light_curves=finished["n_light_curves"], n_duplicates=totals["duplicates"],
        wall_seconds=time.perf_counter() - started, writer_seconds=finished["writer_seconds"],
        rows_committed=finished["rows_committed"],
        startup_seconds=progress.first_submitted - started if progress.first_submitted else None,
        worker_seconds=finished.get("worker_seconds", {}), n_threads=session.n_threads,
        n_batches=finished.get("n_batches", 0),
        n_process_batches=finished.get("n_process_batches", 0),
        stage_cpu_seconds=finished.get("stage_cpu_seconds", 0.0),
        n_artefacts=totals["artefacts"],
    )


def _say_empty_regions(images: list, params: ExtractionParams) -> None:
    """Warn when ``im_margin`` or ``im_radius`` leave an image (ScannedImage) no pixel to find
    sources in: its run would record images without a source and say nothing."""
    empty = [s.meta for s in images if params.region_radius(s.meta.shape) == 0 or 0 < params.radius < 1]
    if empty:
        log.warning("im_margin = %d and im_radius = %g pixels leave no pixel to find sources in for %d of %d "
                    "images, e.g. %s (%d x %d pixels)", params.margin, params.radius, len(empty), len(images),
                    empty[0].url, *empty[0].shape)


#: Background boxes narrower than this many beam FWHM (major axis) take in the sources they hold:
#: the background follows them and the noise map drops, so the residual loses its sources.
MIN_BOX_BEAMS = 2.0


def _say_small_background_boxes(images: list, config: Config) -> None:
    """Warn when ``im_back_size_x/_y`` are under MIN_BOX_BEAMS beam widths for images (ScannedImage)
    of the run: their background and noise maps would follow the sources."""
    box = min(config.im_back_size_x, config.im_back_size_y)
    beams = ((s.meta.url, 2 * s.meta.beam.smaj / s.meta.pixel_scale) for s in images)  # FWHM, pixels
    small = [(url, fwhm) for url, fwhm in beams if box < MIN_BOX_BEAMS * fwhm]
    if small:
        log.warning("im_back_size_x = %d and im_back_size_y = %d pixels are under %g beam widths for %d of %d images, "
                    "e.g. %s (beam FWHM %.1f pixels): the background and noise maps follow the sources there; "
                    "use boxes of several beams", config.im_back_size_x, config.im_back_size_y, MIN_BOX_BEAMS,
                    len(small), len(images), *small[0])


def _say_large_position_errors(images: list, config: Config) -> None:
    """Warn when ``ew_sys_err``/``ns_sys_err`` (arcsec, not 'auto') are a beam FWHM or more for
    images (ScannedImage) of the run: every known source within several beams becomes a candidate
    of every detection, and a new source can pass its light curve on to its neighbours."""
    if config.ew_sys_err is None or not images:  # 'auto' (both are, or neither: config.validate)
        return
    given = max(config.ew_sys_err, config.ns_sys_err)
    sharpest = min(images, key=lambda s: s.meta.beam.smaj)
    fwhm = 7200.0 * sharpest.meta.beam.smaj  # arcsec
    if given >= fwhm:
        said = f"--ew_sys_err {config.ew_sys_err:g} / --ns_sys_err {config.ns_sys_err:g}"
        log.warning("%s arcsec: %.1f times the beam (FWHM %.1f\" of %s); every known source within %.0f beams "
                    "becomes a candidate of each detection, and light curves may pass from one source to another. "
                    "Set them near the measured position scatter (the images' astrometry_scatter_ra/dec) or to "
                    "'auto'", said, given / fwhm, fwhm, sharpest.meta.url,
                    config.de_ruiter_r_max * math.sqrt(2.0) * given / fwhm)


def _say_uncovered_monitors(images: list, positions: list[tuple[float, float]], params: ExtractionParams) -> None:
    """Warn about monitor positions (``monitor_loc``, deg) that lie outside every image's extraction
    region (the image inside its margins, and within ``radius`` when set): their light curves would
    stay empty without a word; and about positions given twice."""
    import numpy as np

    from trap_dask.extraction.extract import in_extraction_region
    from trap_dask.image import celestial_wcs, field_header

    if not positions or not images:
        return
    ra, dec = np.array(positions, dtype=float).T
    measured = np.zeros(len(positions), dtype=bool)
    for meta in {(field_header(s.meta), s.meta.shape): s.meta for s in images}.values():  # each pointing once
        with np.errstate(invalid="ignore"):  # NaN: behind the projection
            measured |= in_extraction_region(meta.shape, params, *celestial_wcs(meta).world_to_pixel_values(ra, dec))
    near = np.round(np.column_stack([ra % 360.0, dec]), 5)  # to 0.04"
    _, first, counts = np.unique(near, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        twice = first[np.argmax(counts > 1)]
        log.warning("%d monitor positions are given more than once (within 0.04\"), e.g. (%.6f, %.6f) deg: each "
                    "is measured as a source of its own, with the same light curve", int((counts > 1).sum()),
                    ra[twice], dec[twice])
    outside = np.flatnonzero(~measured)
    if len(outside):
        log.warning("%d of the %d monitor positions lie outside every image's extraction region (the image "
                    "inside its margins and radius), e.g. (%.6f, %.6f) deg: their light curves stay empty",
                    len(outside), len(positions), ra[outside[0]], dec[outside[0]])


def _say_shared_start_times(images: list) -> None:
    """Warn when images (ScannedImage, in time order) of one frequency share a start time: they
    are taken in the order of their names, which is seldom what their light curves need (a
    header whose DATE-OBS holds the date alone, or a copy of one image's header into another)."""
    same = [(a.meta.url, b.meta.url) for a, b in zip(images, images[1:])
            if (a.meta.taustart_ts, a.meta.freq_eff) == (b.meta.taustart_ts, b.meta.freq_eff)]
    if same:
        log.warning("%d images have the start time and frequency of the image before them, e.g. %s and %s: "
                    "they are processed in the order of their names; check their DATE-OBS", len(same), *same[0])


def _say_renamed_copies(scans: list, fresh: list, known: KnownImages) -> None:
    """Warn about skipped inputs recorded under another name: the same bytes as an image the
    database holds (a copy, a renamed file), which a user may have meant as a new observation."""
    kept = {id(s) for s in fresh}
    copies = [s for s in scans if id(s) not in kept and s.checksum is not None and s.url not in known.paths]
    if copies:
        log.warning("skipped %d images holding the same bytes as an image in the database under another name, "
                    "e.g. %s: a copy is not a new observation", len(copies), copies[0].url)


def _already_stored(scan: ScannedImage | ScanFailure, known: KnownImages) -> bool:
    """Whether a scanned input (ScannedImage or ScanFailure) is in the database already: a file
    with a stored checksum, or one still unreadable at a path recorded as unreadable."""
    from trap_dask.messages import ScanFailure

    if scan.checksum is not None:
        return scan.checksum in known.checksums
    return isinstance(scan, ScanFailure) and scan.url in known.unreadable


@dataclass
class _Progress:
    """How far a run has recorded its inputs, so that a new writer carries on where a lost one stopped."""

    failure: int = 0  #: the next unreadable file to record
    image: int = 0  #: the first image not known to be committed (a new writer starts there)
    #: (index, im_id) of the images recorded by the writer and not yet known to be in the database
    unwritten: deque = field(default_factory=deque)
    counted: int = 0  #: the next image whose summary is to be counted
    lost_writers_images: int = 0  #: images committed by writers that were lost
    restarts: int = 0
    started: float = 0.0  #: perf_counter when the images began to be submitted
    first_submitted: float | None = None  #: perf_counter when the first image was submitted

    def answered(self, index: int, summary: CommitSummary) -> None:
        """Move ``image`` on past what the summary of image ``index`` shows in the database: every
        image before the first recorded one that is not there yet."""
        if summary.recorded:
            self.unwritten.append((index, summary.im_id))
        while self.unwritten and self.unwritten[0][1] <= summary.written_through:
            self.unwritten.popleft()
        self.image = self.unwritten[0][0] if self.unwritten else index + 1


def _restart_writer(session, settings, config, config_file, progress: _Progress) -> None:
    """Start a new writer from the committed state (as --db_append does) after the worker holding
    the writer was lost; the images whose summaries did not come back are handed to it again, and
    it skips those the lost writer had committed."""
    from trap_dask.db.store import ExportStore
    from trap_dask.writer import Writer

    progress.restarts += 1
    session.abandon_writer()  # its callers' threads are the new writer's
    progress.unwritten.clear()  # handed to the new writer again, from progress.image on
    memory = session.memory.sentence(session.writer_address)
    log.warning("the Dask worker holding the writer (%s) was lost: starting a new writer from the committed "
                "state (restart %d of at most %d)%s", session.writer_address or "address unknown",
                progress.restarts, MAX_WRITER_RESTARTS, f". {memory}" if memory else "")
    try:
        store = ExportStore.open(settings)
        try:
            committed = store.close_stale_runs()  # the lost writer's run, which counted its images in each transaction
        finally:
            store.close()
    except DatabaseError as exc:
        raise PipelineError(f"the worker holding the writer was lost, and a new writer cannot open the "
                            f"database: {exc}; {RESUME}") from None
    progress.lost_writers_images += committed
    try:
        session.client.wait_for_workers(1, timeout=config.worker_timeout)
    except TimeoutError:
        raise PipelineError(f"no Dask worker left to hold the writer within worker_timeout = "
                            f"{config.worker_timeout:g} s; {RESUME}") from None
    session.submit_writer(Writer, settings, config, str(config_file) if config_file else None,
                          backend=settings.backend, append=True, resume=True, stage_every_image=True)


def _stream(session, writer, images, window, params, quality, progress: _Progress, bands: list):
    """Yield (index, url, CommitSummary) of each image in time order from ``images[progress.image]`` on,
    keeping ``window`` images in flight (route.ImageRoute submits each image's tasks; ``bands``:
    the user's frequency bands, or none)."""
    from trap_dask.route import ImageRoute, WriterRef

    ref = WriterRef(session.writer.key, session.writer_address.split(", ")[0])
    route = ImageRoute(session.client, ref, params, quality, len(images), session.extract_resources,
                       tag=f"-w{progress.restarts}" if progress.restarts else "", bands=bands)
    pending: deque = deque()
    upcoming = iter(enumerate(images[progress.image:], start=progress.image))

    def submit_next() -> None:
        for index, image in upcoming:
            pending.append((index, image.meta.url, route.submit(index, image)))
            if progress.first_submitted is None:
                progress.first_submitted = time.perf_counter()
            return

    for _ in range(min(window, len(images) - progress.image)):  # (a window of 10^9 took 48 s of nothing)
        submit_next()
    try:
        yield from _collect(session, writer, route, pending, progress, submit_next)
    finally:  # stopped (Ctrl-C, SIGTERM, an error): the tasks not started are released, not run
        pending.clear()


def _collect(session, writer, route, pending: deque, progress: _Progress, submit_next):
    """The summaries of the images in flight, in order, submitting the next image for each."""
    flushing, staged = None, False

    def flush_staged(waits: bool) -> None:
        """A failed transaction stops the run here; when the writer ``waits`` for the next image, it
        is asked to commit what it staged (see Writer.flush)."""
        nonlocal flushing
        if flushing is not None and flushing.done():
            flushing.result()
            flushing = None
        if waits and staged and flushing is None:
            flushing = writer.flush(True)

    while pending:
        index, url, summary = pending.popleft()
        outcome = _summary(summary, session, lambda: flush_staged(True))
        session.memory.progressed()
        route.done(index)
        staged = outcome.staged
        progress.answered(index, outcome)  # a new writer starts at the first image not in the database
        del summary
        submit_next()
        flush_staged(bool(pending) and not pending[0][2].done())
        yield index, url, outcome
    if flushing is not None:
        flushing.result()


def _summary(future, session, waiting: Callable[[], None] | None = None):
    """The result of an image's summary future; RuntimeError as soon as the writer's worker is gone
    (its lost results would otherwise wait for ever for tasks bound to workers that are gone too).
    ``waiting`` is called each second the result has not come."""
    while True:
        try:
            return future.result(timeout=1.0)
        except TimeoutError:
            if session.writer is not None and session.writer.status != "finished":
                raise RuntimeError("the worker holding the writer was lost") from None
            session.memory.check()
            if waiting is not None:
                waiting()


#: Seconds a thread may hold the GIL while another waits for it, during a run (Python's default is
#: 0.005). Extraction threads, the writer and Dask's event loop share this process; each numpy call
#: on a large array releases the GIL, and taking it back waited up to this long behind a thread
#: running Python code. 1 ms: 7.5% less wall time on 30 x 2048^2 images, 6% on 6 x 8192^2, the
#: same on 20 x 1024^2 and 50 x 2048^2 (9 / 4 / 4 / 3 runs of each, alternating; RESULTS.md).
GIL_SWITCH_S = 0.001


@contextmanager
def _gil_switch_interval(seconds: float) -> Iterator[None]:
    """``sys.setswitchinterval(seconds)`` while the run lasts (restored after: a run may be called
    from a longer-lived Python session)."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


#: Seconds a stopped run waits for the tasks still running on its workers before it closes the
#: cluster (an extraction of an 8192^2 image takes ~2 s).
DRAIN_S = 30.0


def _drain(client, seconds: float) -> None:
    """Wait until no image's task runs on the cluster's workers, at most ``seconds`` (other clients'
    tasks on a shared cluster are not waited for). A stopped run (Ctrl-C, SIGTERM) has dropped the
    images in flight, but a task already running goes on in its thread: one still talking to the
    writer actor when the cluster closes made Dask print tracebacks (the actor gone, a call
    cancelled mid-way). After the writer finished, such a task's calls are answered at once
    ('dropped', nothing recorded), so the wait is the rest of a running extraction at most."""
    from trap_dask.route import is_route_key

    def images_running(dask_worker) -> int:
        return sum(is_route_key(task.key) for task in dask_worker.state.executing)

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            running = client.run(images_running)
        except Exception:  # noqa: BLE001 - workers gone: nothing left to wait for
            return
        if not any(running.values()):
            return
        time.sleep(0.05)


@contextmanager
def _imports_frozen() -> Iterator[None]:
    """``gc.freeze()`` while the run lasts: the objects that exist when it starts (the modules
    imported, hundreds of thousands of them) are left out of the garbage collector's full
    collections, which walked them each time with the GIL held (on 50 x 2048^2 images: 0.28 ->
    0.11 s in full collections, 0.46 -> 0.33 s in all; RESULTS.md, issue 15 round 3). The collector
    runs during the run even if the caller had turned it off (``trap-dask run`` does, while it
    imports). Unfrozen after, unless the caller had frozen objects before (then they stay as the
    caller left them), and off again if it was off."""
    frozen_before, collecting = gc.get_freeze_count(), gc.isenabled()
    gc.freeze()
    gc.enable()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()
        if not collecting:
            gc.disable()


@contextmanager
def _terminate_as_interrupt() -> Iterator[threading.Event]:
    """SIGTERM raises Terminated wherever the run is: the image being committed is committed (the
    writer finishes its call before it records the run's end), one in flight is dropped, and the
    run is recorded as interrupted.

    The returned event is set as well: Python swallows an exception a signal handler raises while
    the main thread runs a ``__del__`` (a Dask future's, as it is collected) or a weakref callback,
    and the run then stops at its next image (``_process``) instead of completing as if it had not
    been told to stop. Such a swallowed Terminated is not printed (Python's "Exception ignored"
    and a traceback, after the run's own one-line message); other unraisable exceptions are."""
    terminated = threading.Event()

    def handler(signum, frame) -> None:
        terminated.set()
        log.warning("terminated (SIGTERM): stopping now")
        raise Terminated

    def unraisable(info) -> None:
        if not isinstance(info.exc_value, Terminated):
            previous_hook(info)

    if threading.current_thread() is not threading.main_thread():
        yield terminated
        return
    previous, previous_hook = signal.signal(signal.SIGTERM, handler), sys.unraisablehook
    sys.unraisablehook = unraisable
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook


@contextmanager
def _stop_on_interrupt() -> Iterator[threading.Event]:
    """The first Ctrl-C sets the returned event (the run stops after the image being committed);
    a second one interrupts at once. A run started with Ctrl-C ignored (a background job of a
    script, whose shell ignores it there) goes on ignoring it."""
    stop = threading.Event()

    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("interrupted: stopping after the image being committed (Ctrl-C again to stop at once)")

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield stop
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _count(totals: dict, summary, url: str, bar) -> None:
    if summary.copy_of is not None:
        log.warning("%s has the same contents as %s: recorded once, under the first name", url, summary.copy_of)
        totals["duplicates"] += 1
    if not summary.recorded:
        bar.update(1)
        return
    if summary.rejected:
        log.warning("rejected %s: %s", url, summary.rejection)
    totals["rejected"] += summary.rejected
    totals["sources"] += summary.n_sources
    totals["forced"] += summary.n_forced
    totals["new"] += summary.n_new
    totals["artefacts"] += summary.n_artefacts
    bar.update(1)
    bar.set_postfix(sources=totals["sources"], new=totals["new"], refresh=False)


class _AstrometryWatch:
    """Logs each image's measured astrometric offset and scatter, and warns once when the scatter
    exceeds the systematic error the user set (an under-set error splits light curves unless
    ``widen_sys_err`` associates with the scatter instead)."""

    def __init__(self, config: Config):
        self.given = (config.ew_sys_err, config.ns_sys_err)
        self.widen = config.widen_sys_err
        self.warned = False

    def __call__(self, summary) -> None:
        a = summary.astrometry
        if summary.rejected or a is None or not a.measured:
            return
        log.debug("image %d: offset %+.2f\" RA, %+.2f\" Dec, scatter %.2f\" RA, %.2f\" Dec (%d sources); "
                  "sys_err %.2f\" / %.2f\"", summary.im_id, a.offset_ra, a.offset_dec, a.scatter_ra,
                  a.scatter_dec, a.n, *summary.sys_err)
        if self.warned or self.given[0] is None:
            return
        if a.scatter_ra > self.given[0] or a.scatter_dec > self.given[1]:
            self.warned = True
            log.warning(
                "image %d: the measured position scatter (%.2f\" RA, %.2f\" Dec, from %d bright isolated "
                "sources) exceeds --ew_sys_err %g / --ns_sys_err %g arcsec: %s",
                summary.im_id, a.scatter_ra, a.scatter_dec, a.n, *self.given,
                "associating with the scatter where it is larger (widen_sys_err; --no-widen_sys_err "
                "keeps the set values, as TraP 1.x)" if self.widen else
                "light curves may split. Set them to at least the scatter, or to 'auto' (the default) "
                "to follow the data")


#: Seconds between progress lines when stderr is not a terminal (batch jobs, log files).
PROGRESS_LOG_SECONDS = 5.0


class _LogProgress:
    """tqdm's interface, written as a log line every PROGRESS_LOG_SECONDS and at the end."""

    def __init__(self, total: int):
        self.total, self.n, self.postfix = total, 0, {}
        self.started = self.last = time.monotonic()

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.n:
            self._log()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= PROGRESS_LOG_SECONDS:
            self._log()

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def _log(self) -> None:
        self.last = time.monotonic()
        rate = self.n / max(self.last - self.started, 1e-9)
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        log.info("%d/%d images (%.2f images/s%s)", self.n, self.total, rate, extra)


def _progress(total: int):
    """A progress bar on a terminal; a log line every few seconds otherwise (or nothing with -q)."""
    if sys.stderr.isatty() and log.isEnabledFor(logging.INFO):
        from tqdm import tqdm

        return tqdm(total=total, unit="img", desc="trap-dask", dynamic_ncols=True)
    return _LogProgress(total)


def _configure_logging(config: Config) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if config.log_dir:
        try:
            Path(config.log_dir).mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(Path(config.log_dir) / "trap-dask.log"))
        except OSError as exc:
            raise PipelineError(f"--log_dir {config.log_dir}: cannot write the log there "
                                f"({exc.strerror or exc})") from None
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = handlers
    if log.level == logging.NOTSET:  # the command line's -v/-q set it already
        log.setLevel(logging.INFO)
    log.propagate = False
