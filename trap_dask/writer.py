"""The writer: the one Dask actor that owns the export database and the running catalogue.

It is fed images strictly in time order (``route.py``). For each image, :meth:`Writer.associate`
links the blind detections to the running catalogue and returns the positions to force-fit;
:meth:`Writer.commit` adds those forced fits and writes the image, its measurements, the
association links and the catalogue/variability updates in ONE transaction.

Batching: an image can be staged instead of written: its update is applied to the in-memory
catalogue, so the next image can be associated, and its rows wait; the staged images are written
together in ONE transaction (``store.batch()``: one statement per table, each changed catalogue
row once) after MAX_BATCH images (MAX_STAGED_KEEPING_UP while the writer keeps up), once the
oldest has waited MAX_BATCH_SECONDS, by :meth:`flush` (which the client calls when it waits for
the next image) and by :meth:`finish`. A writer stages an image when it falls behind (the next
image was ready before it had finished the one before) and, made with ``stage_every_image`` (what
a run does), every image: a transaction per image costs twice the writer's time of a batch
(benchmarks/RESULTS.md, issue 15 round 4), so those wait for their batch even while the client
waits (at most MAX_BATCH_SECONDS). Without ``stage_every_image``, when the writer keeps up, every
image is its own transaction, committed before its commit() returns.

A full batch is written by the writer's committer thread while the writer associates the next
images, one transaction in flight at a time, in order. Once a writer has staged a whole batch
(MAX_BATCH images) while behind, the thread hands the batches on to a committer process of the
writer's own (``trap_dask.committer``), from when it is up: a commit holds the GIL for most of
its time, so beside association a thread gains little, a process the whole of it. A merge reads
its sources' measurements from the database, the batch in flight and the staged images, in the
writer's reader thread from when the image is associated (the read overlaps its forced fits). So the
database always ends at an image boundary, at most MAX_BATCH_SECONDS (plus one batch) behind the
writer; a failed batch raises at the writer's next image or flush and rolls the in-memory
catalogue back to the last image written, and each CommitSummary says which images the database
holds (``written_through``), where a writer started after a lost one carries on.

Messages in and out are those of ``trap_dask.messages``; the writer imports nothing of the workers.
Its entry points run one at a time: through the actor (its one thread), or called in place by a
task on the writer's own worker (``route.WriterRef.call``), which spares the round trip through
the worker's event loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np

from trap_dask.astrometry import (
    AUTO_UNMEASURED,
    REACH,
    Astrometry,
    ScatterHistory,
    automatic_sys_err,
    measurable,
    measure,
    nothing_measured,
    widened_sys_err,
)
from trap_dask.bands import Band, assign_band, fixed_bands
from trap_dask.catalogue import (
    LIGHTCURVE_COLUMNS,
    SOURCE_COLUMNS,
    AssociationPlan,
    EarlierImages,
    ImageContext,
    RunningCatalogue,
    columns_from_lists,
)
from trap_dask.columns import take
from trap_dask.committer import CommitterProcess, write_batch
from trap_dask.config import RESUME, RESUME_AFTER_FAILURE, Config
from trap_dask.db.backends import DatabaseError, DatabaseGone, DatabaseSettings
from trap_dask.db.store import ExportStore, RunTakenOver
from trap_dask.image import one_line
from trap_dask.messages import (
    CommitSummary,
    ForcedMeasurements,
    ForcedRequest,
    ImageResult,
    ScanFailure,
)
from trap_dask.newsource import outline_text
from trap_dask.shapes import beam_cov
from trap_dask.sky import farthest
from trap_dask.sources import HISTORY_DTYPE, add_uncertainties, empty_sources

log = logging.getLogger(__name__)

#: Most images staged for one transaction, and most seconds the oldest of them waits: how far the
#: database may trail the writer (and a run killed with kill -9 lose work it had done). A batch
#: writes each table once and each changed catalogue row once, so its cost per image falls with its
#: size (benchmarks/RESULTS.md, issue 15 round 2). A staged image holds its own rows and the
#: catalogue rows it changed (~0.5 MB per 1000 sources), not the catalogue.
MAX_BATCH = 16
MAX_BATCH_SECONDS = 1.0
#: Most images a writer made with ``stage_every_image`` stages while it keeps up (a transaction of
#: four images costs the writer about half as much per image as one of one, and a run killed with
#: kill -9 redoes few images).
MAX_STAGED_KEEPING_UP = 4
#: Writer state that a batch moves on before it is committed, restored if the batch fails.
_BATCH_STATE = ("catalogue", "scatter", "bands", "_unsaved_bands", "_unsaved_monitors", "next_im_id",
                "n_committed", "seen", "_recent")
#: Summaries of the latest images kept, to answer a task retried after its worker was lost.
RECENT_SUMMARIES = 64


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _one_at_a_time(method: _Method) -> _Method:
    """An entry point of the writer, run while it holds its lock (see the module's text)."""
    @functools.wraps(method)
    def locked(self: Writer, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._entered is not None:  # called by another entry point, whose CPU time counts it
                return method(self, *args, **kwargs)
            self._entered = time.thread_time()
            try:
                return method(self, *args, **kwargs)
            finally:
                self.stage_cpu += time.thread_time() - self._entered
                self._entered = None
    return locked  # type: ignore[return-value]


class Writer:
    """Dask actor: association in time order, and a transaction per image or batch of images."""

    def __init__(self, settings: DatabaseSettings, config: Config, config_file: str | None, append: bool = False,
                 resume: bool = False, stage_every_image: bool = False, commit_process: bool = True):
        """``resume``: a writer started after losing one; inputs already in the database are skipped.
        ``stage_every_image``: stage images even while keeping up; ``commit_process``: a writer that
        falls behind commits in a process of its own, else always in its thread (see the module's
        text)."""
        self._lock = threading.RLock()  # held by each entry point (they call one another)
        self._entered: float | None = None  # thread_time when the outermost entry point running began
        #: CPU seconds of the run's stages: the workers' (from the messages), the writer's entry points
        #: and its commits (committer thread and process); what ``trap-dask bench`` sets against the
        #: CPU of the whole cluster
        self.stage_cpu = 0.0
        self.store = ExportStore(settings)
        self.run_id = -1
        try:
            self.run_id = self.store.start_run(config.exportable(), config_file)
            state = self.store.load_state() if append else None
            known = self.store.known_images() if resume else None
        except DatabaseError as exc:  # the database holds what it held: the same command goes on with it
            with contextlib.suppress(DatabaseError):
                if self.run_id >= 0:
                    self.store.finish_run(self.run_id, "failed")
                self.store.close()
            raise DatabaseError(f"{exc}; {RESUME}") from None
        self.catalogue = RunningCatalogue(
            de_ruiter_r_max=config.de_ruiter_r_max,
            max_nr_consecutive_force_fits=config.max_nr_consecutive_force_fits,
            detection_threshold=config.detection_threshold,
            optimal_association=config.association_method == "optimal",
            fit_blends=config.fit_blends,
            backfill=config.backfill_new_sources,
            link_radius=config.link_radius,
            duplicate_reach=config.duplicate_reach,
            merge_duplicates=config.merge_duplicates,
            fit_source_shape=config.fit_source_shape,
        )
        #: the user's systematic errors (arcsec); None: 'auto', measured image by image
        self.sys_err = (config.ew_sys_err, config.ns_sys_err)
        self.widen_sys_err = config.widen_sys_err
        self.remove_shift = config.remove_image_shift
        self.scatter = ScatterHistory()
        stored_bands = ([Band(**dict(zip(state.bands, row))) for row in zip(*state.bands.values())]
                        if state and state.bands else [])
        self.fixed = bool(config.frequency_bands())
        self.bands = fixed_bands(config.frequency_bands(), stored_bands) if self.fixed else stored_bands
        self._unsaved_bands = [b for b in self.bands if b not in stored_bands]
        self.next_im_id = 0  #: the id of the next image recorded
        if state is not None:
            self.catalogue = replace(
                self.catalogue,
                sources=columns_from_lists(SOURCE_COLUMNS, state.sources),
                lightcurves=columns_from_lists(LIGHTCURVE_COLUMNS, state.lightcurves),
                earlier=EarlierImages.from_images_table(state.images, config.remove_image_shift),
                next_xtrsrc=state.next_xtrsrc,
                next_src_id=state.next_src_id,
            )
            self.next_im_id = state.next_image
            if state.images:
                self.scatter = ScatterHistory.from_images(*(state.images[f"astrometry_{c}"] for c in
                                                            ("n", "scatter_ra", "scatter_dec")))
        self.written_through = self.next_im_id - 1  #: the id of the latest image the database holds
        self._unsaved_monitors = self._add_monitors(config.monitor_positions(), state.monitors if state else {})
        self.n_committed = 0
        #: seconds spent associating, updating light curves and committing; rows committed
        self.seconds = {"associate": 0.0, "update": 0.0, "commit": 0.0, "wait": 0.0}
        self.rows_committed = 0
        #: worker seconds per stage, from the messages (ImageResult.seconds, ForcedMeasurements.seconds)
        self.worker_seconds: dict[str, float] = {}
        self.n_batches = 0  #: transactions that wrote more than one image
        #: the image associated and not yet committed: its plan, result, band, astrometry, systematic
        #: errors, whether it came behind, and the read of its merges' history (None: no merge)
        self._pending: tuple[AssociationPlan, ImageResult, Band, Astrometry, tuple[float, float], bool,
                             Future | None] | None = None
        self._reader: ThreadPoolExecutor | None = None  #: reads merges' histories (see _read_history)
        #: checksum -> url of every input recorded in this run (a later input with the same bytes is a copy)
        self.seen: dict[str, str] = {}
        #: url -> CommitSummary of the latest images recorded (RECENT_SUMMARIES)
        self._recent: dict[str, CommitSummary] = {}
        self._stored = (known.checksums, known.unreadable) if known else (frozenset(), frozenset())
        self._staged: list[tuple[dict, dict, int]] = []  #: (image row, commit_image keywords, rows) not yet written
        self._snapshot: dict | None = None  #: the state before the first staged image
        self._staged_since = 0.0
        self._staged_behind = False  #: an image was staged because the writer was behind
        #: the batch being written by the committer thread: (its future, the state before it, its images)
        self._committing: tuple[Future, dict, list] | None = None
        self._committer: ThreadPoolExecutor | None = None
        self.commit_process = commit_process
        self._process: CommitterProcess | None = None  #: the committer process, once started
        self._idle_since = 0.0  #: time.time() when the last image was committed or staged
        self.finished = False  #: finish() was called: the run has stopped
        #: why a transaction failed: the writer then records nothing more (see _refuse_if_failed)
        self._failure: str | None = None
        self._taken_over = False  # the failure was a takeover (store.RunTakenOver)
        self._gone = False  # the failure was the database's going (backends.DatabaseGone)
        self.stage_every_image = stage_every_image

    def _add_monitors(self, positions: list[tuple[float, float]], stored: dict[str, list]) -> dict:
        """Register the monitor positions not yet in the database; returns their monitor rows."""
        old = np.array(list(zip(stored.get("ra", []), stored.get("dec", []))), dtype=float).reshape(-1, 2)
        new = np.array(positions, dtype=float).reshape(-1, 2)
        if len(old):
            known = np.isclose(new[:, None, :], old[None, :, :], rtol=0, atol=1e-9).all(axis=2).any(axis=1)
            new = new[~known]
        self.catalogue, src_ids = self.catalogue.add_monitor_sources(new[:, 0], new[:, 1])
        first = max(stored.get("id", [0]), default=0) + 1
        return {"id": first + np.arange(len(new)), "ra": new[:, 0], "dec": new[:, 1], "src_id": src_ids}

    @property
    def process_batches(self) -> int:
        """Transactions its committer process has written (none until the writer fell behind)."""
        return self._process.batches if self._process is not None else 0

    # -- per image --------------------------------------------------------------------------
    @_one_at_a_time
    def reject_unreadable(self, failure: ScanFailure) -> CommitSummary:
        """Record a file whose header could not be used as a rejected image."""
        self._refuse_if_failed()
        skipped = self._skip(failure.url, failure.checksum, unreadable=True)
        if skipped is not None:
            return skipped
        row = {"url": failure.url, "checksum": failure.checksum, "rejected": True,
               "rejection_reason": failure.reason}
        summary = self._commit_rejected(row, behind=False)
        self.flush()
        return summary

    def _skip(self, url: str, checksum: str | None, unreadable: bool = False) -> CommitSummary | None:
        """The summary of an input that is not recorded: a copy of an earlier input of this run, or one
        a lost writer committed; None for an input to record (then remembered by its checksum)."""
        if (checksum in self._stored[0]) if checksum else (unreadable and url in self._stored[1]):
            return self._summary(-1, False, 0, 0, 0, stored=True)
        if checksum is None:
            return None
        first = self.seen.setdefault(checksum, url)
        return None if first == url else self._summary(-1, False, 0, 0, 0, copy_of=first)

    @_one_at_a_time
    def associate(self, result: ImageResult) -> ForcedRequest | CommitSummary:
        """Associate one image's detections; returns what to force-fit next.

        A rejected image is committed at once and its CommitSummary returned instead.
        """
        if self.finished:  # a task still running when the run stopped: its image is not recorded
            return self._summary(-1, False, 0, 0, 0, dropped=True)
        self._refuse_if_failed()
        self._settle(block=False)  # a failed transaction stops the run at the next image
        started = time.perf_counter()
        if result.meta.url in self._recent:  # recorded already: its task was retried after its worker was lost
            return self._recent[result.meta.url]
        if self._pending is not None:
            if self._pending[1].meta.url != result.meta.url:
                raise RuntimeError("associate() called twice without commit(): images must be fed in order")
            log.info("%s: associated again (the worker holding it was lost before its commit)", result.meta.url)
            self._pending = None
        skipped = self._skip(result.meta.url, result.checksum)
        if skipped is not None:
            return skipped
        behind = bool(result.done_at) and result.done_at < self._idle_since
        self._count_worker(result)
        meta = result.meta
        band, is_new_band = assign_band(meta.freq_eff, meta.freq_bw, self.bands, self.fixed)
        rejection = result.rejection
        if band is None and rejection is None:
            rejection = f"frequency {meta.freq_eff:.6g} Hz is outside every band in frequency_band"
        if rejection is not None:
            row = self._image_row(result) | {"rejected": True, "rejection_reason": rejection}
            if band is not None and not is_new_band:
                row["freq_band"] = band.band_id
            return self._remember(meta.url, self._commit_rejected(row, behind))
        if is_new_band:
            self.bands.append(band)
            self._unsaved_bands.append(band)
        beam_fwhm = 2.0 * meta.beam.smaj
        result = _measurable(result)
        astrometry, sys_err = self._astrometry(result.sources, beam_fwhm, (meta.centre_ra, meta.centre_dec),
                                               result.xtr_radius)
        shift = (astrometry.offset_ra / 3600.0, astrometry.offset_dec / 3600.0) \
            if self.remove_shift and astrometry.measured else (0.0, 0.0)
        image = ImageContext(
            im_id=self.next_im_id, band=band.band_id, taustart_ts=meta.taustart_ts,
            centre_ra=meta.centre_ra, centre_dec=meta.centre_dec, xtr_radius=result.xtr_radius,
            rms_min=result.stats.rms_min, rms_max=result.stats.rms_max, beam_fwhm=beam_fwhm,
            url=meta.url, shift_ra=shift[0], shift_dec=shift[1],
            # the scatter about the image's shift: what the data show once that shift is taken out
            data_sys_err=automatic_sys_err(self.scatter, astrometry, beam_fwhm)
            if self.sys_err[0] is not None and shift != (0.0, 0.0) else None,
            outline=np.full((1, 2), np.nan) if result.outline is None else result.outline,
            beam_cov=beam_cov(meta.beam.smaj, meta.beam.smin, meta.beam.pa),
        )
        detections = add_uncertainties(result.sources.copy(), *sys_err)
        plan = self.catalogue.plan(image, detections)
        self._pending = (plan, result, band, astrometry, sys_err, behind, self._read_history(plan))
        self.seconds["associate"] += time.perf_counter() - started
        return replace(plan.forced_request(self.catalogue), url=meta.url)

    @_one_at_a_time
    def commit(self, forced: ForcedMeasurements | None = None, url: str = "") -> CommitSummary:
        """Add the forced fits (answering the request from associate for the image ``url``) and commit
        the image; when the writer is behind, stage it for the next transaction instead (see the
        module's text). A commit asked again (its task retried after its worker was lost) gets the
        image's summary back."""
        if self.finished:
            return self._summary(-1, False, 0, 0, 0, dropped=True)
        self._refuse_if_failed()
        started = time.perf_counter()
        if url and (self._pending is None or self._pending[1].meta.url != url):
            if url not in self._recent:
                raise RuntimeError(f"commit() of {url} without its associate()")
            return self._recent[url]
        plan, result, band, astrometry, sys_err, behind, reading = self._pending
        self._pending = None
        measured = _with_sys_err(forced if forced is not None else ForcedMeasurements(empty_sources()), sys_err)
        self._count_worker(measured)
        update = self.catalogue.update(plan, measured, reading.result() if reading is not None else None)
        row = self._image_row(result) | {
            "rejected": False, "freq_band": band.band_id,
            "n_sources": int(np.sum(~update.measurements["is_force_fit"])),
            "n_forced": int(np.sum((update.ids["im_id"] == self.next_im_id) & update.measurements["is_force_fit"])),
            "ew_sys_err": sys_err[0], "ns_sys_err": sys_err[1], "astrometry_n": astrometry.n,
            **{f"astrometry_{name}": _finite_or_none(getattr(astrometry, name))
               for name in ("offset_ra", "offset_dec", "scatter_ra", "scatter_dec")},
        }
        rows = (len(update.measurements) + len(update.changed_sources) + len(update.changed_lightcurves)
                + len(update.new_sources["src_id"]) + 1)
        self._stage(row, dict(  # only the changed catalogue rows: a staged image holds no whole catalogue
            sources=update.measurements, source_ids=update.ids,
            catalogue=take(update.sources, update.changed_sources),
            lightcurves=take(update.lightcurves, update.changed_lightcurves),
            new_sources=update.new_sources,
            merges=update.merges, relabelled=update.relabelled,
            **self._unsaved(),
        ), rows)
        self.catalogue = self.catalogue.apply(update, plan.image)
        self.scatter = self.scatter.add(astrometry)
        self._saved()
        self.next_im_id += 1
        self.n_committed += 1
        self.seconds["update"] += time.perf_counter() - started  # association's update and apply, not the commit
        self._done(behind)
        summary = self._summary(row["id"], False, row["n_sources"], len(update.measurements) - row["n_sources"],
                                len(update.new_sources["src_id"]), band.band_id, astrometry, sys_err,
                                n_artefacts=result.n_artefacts)
        return self._remember(result.meta.url, summary)

    def _read_history(self, plan: AssociationPlan) -> Future | None:
        """Start reading the earlier measurements of the sources ``plan`` merges (:func:`_history`)
        in the writer's reader thread, so that the read overlaps the image's forced fits on a
        worker; None when it merges none. The images in flight and staged now are the ones to
        read with: none is staged before this image's commit."""
        if not len(plan.merge_keep):
            return None
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="trap-dask-history")
        unwritten = [(row, keywords) for row, keywords, _ in
                     (self._committing[2] if self._committing else []) + self._staged]
        return self._reader.submit(_history, self.store, plan.merging_src_ids(self.catalogue), unwritten,
                                   self.catalogue.earlier)

    def _summary(self, *fields: Any, **named: Any) -> CommitSummary:
        """A CommitSummary of ``fields``, saying how much of the run the database holds now."""
        return CommitSummary(*fields, **named, staged=bool(self._staged or self._committing),
                             written_through=self.written_through)

    def _remember(self, url: str, summary: CommitSummary) -> CommitSummary:
        """Keep the summary of a recorded image for a retry of its task; returns it."""
        self._recent[url] = summary
        if len(self._recent) > RECENT_SUMMARIES:
            del self._recent[next(iter(self._recent))]
        return summary

    # -- transactions ---------------------------------------------------------------------------
    def _stage(self, row: dict, keywords: dict, rows: int) -> None:
        if not self._staged:
            self._snapshot = {name: getattr(self, name) for name in _BATCH_STATE}
            for name in ("bands", "_unsaved_bands", "seen", "_recent"):  # changed in place
                self._snapshot[name] = type(self._snapshot[name])(self._snapshot[name])
            self._staged_since = time.monotonic()
        self._staged.append((row, keywords, rows))

    def _done(self, behind: bool) -> None:
        """After an image was staged: write the staged images now unless the writer is behind or
        stages every image, or once the batch is full (MAX_BATCH images when behind, else
        MAX_STAGED_KEEPING_UP; the oldest staged MAX_BATCH_SECONDS ago)."""
        self._staged_behind |= behind
        most = MAX_BATCH if behind else MAX_STAGED_KEEPING_UP
        if not (behind or self.stage_every_image):
            self.flush()
        elif len(self._staged) >= most or self._waited():
            if behind and len(self._staged) >= MAX_BATCH and self.commit_process and self._process is None:
                self._start_committer_process()
            self._write_staged(wait=False)
        self._idle_since = time.time()

    def _start_committer_process(self) -> None:
        """Start the committer process (see the module's text); one that cannot be started is logged
        once and the writer goes on committing in its thread."""
        log.info("the writer is behind by %d images: its commits move to a process of their own",
                 len(self._staged))
        try:
            self._process = CommitterProcess(self.store.settings)
        except OSError as exc:
            log.warning("could not start the writer's committer process (%s); the writer commits in its "
                        "own process", exc)
            self.commit_process = False

    def _waited(self) -> bool:
        """Whether the oldest staged image has waited MAX_BATCH_SECONDS."""
        return time.monotonic() - self._staged_since >= MAX_BATCH_SECONDS

    @_one_at_a_time
    def flush(self, idle: bool = False) -> int:
        """Write the staged images in one transaction (the store's batch()) and wait until the
        database holds every image recorded so far; returns how many it wrote. If a transaction
        fails, nothing of its images is written, the writer returns to the state after the last
        written image and the error is raised. ``idle``: the client waits for the next image;
        images staged while the writer kept up then wait on for their batch
        (MAX_STAGED_KEEPING_UP) unless one was staged behind or the oldest has waited
        MAX_BATCH_SECONDS."""
        if idle and self._staged and not (self._staged_behind or self._waited()):
            return 0
        return self._write_staged(wait=True)

    def _write_staged(self, wait: bool) -> int:
        """Hand the staged images to the committer thread as one transaction, once the one before
        is written (one in flight at most; see the module's text); ``wait``: until it is written
        too. Returns how many images it holds."""
        self._settle()
        staged, self._staged = self._staged, []
        if staged:
            snapshot, self._snapshot = self._snapshot, None
            self._staged_behind = False
            if self._committer is None:
                self._committer = ThreadPoolExecutor(1, thread_name_prefix="trap-dask-commit")
            self._committing = (self._committer.submit(self._write, staged), snapshot, staged)
        if wait:
            self._settle()
        return len(staged)

    def _write(self, staged: list[tuple[dict, dict, int]]) -> tuple[float, float]:
        """Write ``staged`` in one transaction (in the committer thread, through the committer process
        once it is up); returns the seconds it took and the CPU seconds spent (thread and process)."""
        images = [(row, keywords) for row, keywords, _ in staged]
        cpu = time.thread_time()
        if self._process is not None and self._process.ready():
            seconds, spent = self._process.write(images)
        else:
            seconds, spent = write_batch(self.store, images), 0.0
        return seconds, spent + time.thread_time() - cpu

    def _settle(self, block: bool = True) -> None:
        """Wait for the transaction in flight (``block`` False: only if it has ended). If it failed,
        return to the state before its first image, dropping what was staged since, and raise."""
        if self._committing is None or not (block or self._committing[0].done()):
            return
        (future, snapshot, staged), self._committing = self._committing, None
        started = time.perf_counter()
        try:
            seconds, cpu = future.result()
        except BaseException as exc:
            self._staged, self._snapshot, self._pending = [], None, None
            for name, value in snapshot.items():
                setattr(self, name, value)
            self._failure = _failure_text(exc)
            self._taken_over = isinstance(exc, RunTakenOver)
            self._gone = isinstance(exc, DatabaseGone)
            if isinstance(exc, DatabaseError):  # the same words wherever the run learns of it
                raise DatabaseError(self._failure_message()) from exc
            raise  # a fault of the code, with its traceback
        finally:
            self.seconds["wait"] += time.perf_counter() - started
        self.written_through = staged[-1][0]["id"]
        self.n_batches += len(staged) > 1
        self.rows_committed += sum(rows for _, _, rows in staged)
        self.seconds["commit"] += seconds
        self.stage_cpu += cpu

    def _refuse_if_failed(self) -> None:
        """DatabaseError once a transaction has failed: the writer went back to the last image the
        database holds, so an image recorded now would follow a gap (its task fails, and the run
        stops with it)."""
        if self._failure is not None:
            raise DatabaseError(self._failure_message())

    def _failure_message(self) -> str:
        if self._taken_over:  # the run goes on under the writer that took over: nothing to resume here
            return f"this writer was taken over ({self._failure}): it writes nothing more"
        if self._gone:  # nothing left to resume: the message says what to do
            return f"the export database could not be written: {self._failure}"
        return f"the export database could not be written ({self._failure}); {RESUME_AFTER_FAILURE}"

    @_one_at_a_time
    def finish(self, status: str) -> dict:
        """Write what is staged and record the run's end; returns totals for the summary. Later
        calls of :meth:`associate` and :meth:`commit` (tasks of images in flight when the run
        stopped) record nothing and answer a ``dropped`` summary. If a transaction failed, the
        run is recorded as failed and the totals' ``failure`` says why (else None)."""
        self.finished = True
        self._pending = None
        staged = len(self._staged) + (len(self._committing[2]) if self._committing else 0)
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - the run's end is recorded whatever happened
            log.warning("could not commit the last %d staged images: %s", staged, exc)
            if self._failure is None:  # not a transaction's (those set it): the images are lost all the same
                self._failure = _failure_text(exc)
        if self._failure is not None:
            status = "failed"
        for executor in (self._committer, self._reader):
            if executor is not None:
                executor.shutdown()
        if self._process is not None:
            self._process.close()
        try:
            self.store.finish_run(self.run_id, status)
        except DatabaseError as exc:
            if self._failure is None:
                raise
            # the transaction's failure is the run's error: the same cause (a database gone) often
            # refuses the run's end too
            log.warning("could not record the end of the run: %s", exc)
        finally:  # a database gone by now: its engine's connections are let go all the same
            self.store.close()
        return {
            "failure": self._failure_message() if self._failure is not None else None,
            "run_id": self.run_id,
            "n_images": self.n_committed,
            "n_light_curves": int((~self.catalogue.sources["is_monitor"]).sum()),
            "writer_seconds": dict(self.seconds),
            "rows_committed": self.rows_committed,
            "worker_seconds": dict(self.worker_seconds),
            "stage_cpu_seconds": self.stage_cpu + time.thread_time() - self._entered,  # this call's too
            "n_batches": self.n_batches,
            "n_process_batches": self.process_batches,
        }

    # -- helpers --------------------------------------------------------------------------
    def _count_worker(self, message: ImageResult | ForcedMeasurements) -> None:
        """Add a worker's seconds per stage and CPU seconds to the run's."""
        for stage, seconds in message.seconds.items():
            self.worker_seconds[stage] = self.worker_seconds.get(stage, 0.0) + seconds
        self.stage_cpu += message.cpu

    def _astrometry(self, detections: np.ndarray, beam_fwhm: float, centre: tuple[float, float],
                    xtr_radius: float) -> tuple[Astrometry, tuple[float, float]]:
        """The image's offsets from the catalogue (east and north at its ``centre``, deg, from the
        known sources within ``xtr_radius`` deg of it, or of its farthest detection, and
        astrometry.REACH beams more), and the systematic errors (arcsec) to associate it with:
        under 'auto' those measured so far and on this image; else the user's, widened to those
        measured unless ``widen_sys_err`` is off."""
        s = self.catalogue.sources
        extent = max(xtr_radius, farthest(detections["ra"], detections["dec"], centre))
        near = self.catalogue.neighbourhood(centre, extent + REACH * beam_fwhm)
        blind = near.rows
        astrometry = measure(s["wm_ra"][blind], s["wm_dec"][blind], s["acc_n_pos"][blind],
                             detections["ra"], detections["dec"],
                             detections["significance_detection_level"], detections["ra_fit_err"],
                             detections["dec_fit_err"], beam_fwhm, centre, near.tree)
        if self.sys_err[0] is None:
            return astrometry, automatic_sys_err(self.scatter, astrometry, beam_fwhm)
        given = (float(self.sys_err[0]), float(self.sys_err[1]))
        if not self.widen_sys_err:
            return astrometry, given
        unmeasured = 0.0
        if nothing_measured(self.scatter, astrometry) and measurable(
                detections["ra"], detections["dec"], detections["significance_detection_level"], beam_fwhm, centre):
            # the first image of a field that the next images will measure: AUTO_UNMEASURED beams at
            # least, as under 'auto', so that it does not outweigh their widened errors in the catalogue
            unmeasured = AUTO_UNMEASURED * beam_fwhm * 3600.0
        return astrometry, widened_sys_err(given, self.scatter, astrometry, unmeasured)

    def _image_row(self, result: ImageResult) -> dict:
        meta, stats = result.meta, result.stats
        return {
            "id": self.next_im_id, "run": self.run_id, "url": meta.url, "checksum": result.checksum,
            # an image rejected before its noise was measured: NULL on both backends (PostgreSQL keeps NaN)
            "rms": _finite_or_none(stats.rms) if stats else None,
            "rms_min": _finite_or_none(stats.rms_min) if stats else None,
            "rms_max": _finite_or_none(stats.rms_max) if stats else None,
            "freq_eff": meta.freq_eff, "freq_bw": meta.freq_bw,
            "taustart_ts": meta.taustart_ts, "tau_time": meta.tau_time,
            "rb_smaj": meta.beam.smaj, "rb_smin": meta.beam.smin, "rb_pa": meta.beam.pa,
            "centre_ra": meta.centre_ra, "centre_dec": meta.centre_dec,
            "xtr_radius": result.xtr_radius,
            "file_size": result.stamp.size if result.stamp else None,
            "file_mtime": result.stamp.mtime_ns if result.stamp else None,
            "xtr_outline": outline_text(result.outline),
        }

    def _commit_rejected(self, row: dict, behind: bool) -> CommitSummary:
        row = {"id": self.next_im_id, "run": self.run_id, "n_sources": 0, "n_forced": 0, "rejected": True} | row
        self._stage(row, self._unsaved(), 1)
        self._saved()
        self.next_im_id += 1
        self.n_committed += 1
        self._done(behind)
        return self._summary(row["id"], True, 0, 0, 0, rejection=row["rejection_reason"])

    def _unsaved(self) -> dict:
        """Bands and monitor sources not yet in the database, to go with the next commit."""
        extra: dict = {}
        if self._unsaved_bands:
            extra["band_rows"] = [b.__dict__ for b in self._unsaved_bands]
        if len(self._unsaved_monitors["id"]):
            extra["monitors"] = self._unsaved_monitors
            rows = np.flatnonzero(np.isin(self.catalogue.sources["src_id"], self._unsaved_monitors["src_id"]))
            extra["monitor_catalogue"] = take(self.catalogue.sources, rows)
        return extra

    def _saved(self) -> None:
        self._unsaved_bands = []
        self._unsaved_monitors = {k: v[:0] for k, v in self._unsaved_monitors.items()}


#: Columns a detection needs finite to enter the catalogue: its position (deg) and fit errors (deg).
_POSITION_COLUMNS = ("ra", "dec", "ra_fit_err", "dec_fit_err")


def _measurable(result: ImageResult) -> ImageResult:
    """``result`` without the detections whose position or position error is not finite (logged): one
    such detection would make its source's catalogue position NaN, and the association of every
    later image fail. The extraction gives none; this keeps a run going if it ever did."""
    sources = result.sources
    finite = np.logical_and.reduce([np.isfinite(sources[name]) for name in _POSITION_COLUMNS])
    if finite.all():
        return result
    log.warning("%s: %d detection(s) without a finite position or position error left out",
                result.meta.url, int((~finite).sum()))
    return replace(result, sources=sources[finite])


def _with_sys_err(measured: ForcedMeasurements, sys_err: tuple[float, float]) -> ForcedMeasurements:
    """The worker's measurements with the image's systematic errors (arcsec) in their uncertainties."""
    return replace(measured, **{name: add_uncertainties(getattr(measured, name).copy(), *sys_err)
                                for name in ("single", "pairs", "backfill")})


def _history(store: ExportStore, src_ids: np.ndarray, unwritten: list[tuple[dict, dict]],
             earlier: EarlierImages) -> np.ndarray:
    """Every measurement of ``src_ids`` (HISTORY_DTYPE, in id order), those of the ``unwritten``
    images (in flight or staged: image row and ``commit_image`` keywords each, in order) included:
    the database's rows and theirs (a row read from both, as its batch committed meanwhile, counts
    once), with their merges' relabelling applied in order (a staged image is not in the database
    yet, so a merge does not end the batch)."""
    staged = [keywords for _, keywords in unwritten]
    relabels = [keywords["relabelled"] for keywords in staged
                if keywords.get("merges") is not None and len(keywords["merges"]["src_id"])]
    moved = _moved_into(relabels, src_ids)
    measured = [(row["id"], keywords) for row, keywords in unwritten if keywords.get("sources") is not None]
    rows = np.concatenate([store.history(src_ids, moved), _staged_history_rows(measured, earlier, src_ids, moved)])
    rows = rows[np.unique(rows["id"], return_index=True)[1]]
    for relabel in relabels:
        at = np.searchsorted(rows["id"], relabel["id"])
        found = at < len(rows)
        found[found] = rows["id"][at[found]] == relabel["id"][found]
        rows["src_id"][at[found]], rows["parent"][at[found]] = relabel["src_id"][found], relabel["parent"][found]
    return rows[np.isin(rows["src_id"], src_ids)]


def _moved_into(relabels: list[dict[str, np.ndarray]], src_ids: np.ndarray) -> np.ndarray:
    """The ids of the measurements that the ``relabels`` (in order; each id, src_id, parent) leave
    under one of ``src_ids``: the last relabelling of a measurement is the one that counts."""
    if not relabels:
        return np.zeros(0, np.int64)
    ids = np.concatenate([r["id"] for r in relabels])[::-1]
    to = np.concatenate([r["src_id"] for r in relabels])[::-1]
    last = np.unique(ids, return_index=True)[1]
    return ids[last][np.isin(to[last], src_ids)]


def _staged_history_rows(images: list[tuple[int, dict]], earlier: EarlierImages, src_ids: np.ndarray,
                         ids: np.ndarray) -> np.ndarray:
    """The measurements of staged ``images`` ((image id, ``commit_image`` keywords) each) of the
    sources ``src_ids`` or with the given ``ids``, as the database gives them (ExportStore.history):
    HISTORY_DTYPE rows, each with the band of the image it was measured in. One search over every
    image's rows; then only the images holding some are visited."""
    if not images:
        return np.zeros(0, HISTORY_DTYPE)
    numbers = [keywords["source_ids"] for _, keywords in images]
    wanted = np.isin(np.concatenate([n["src_id"] for n in numbers]), src_ids)
    if len(ids):
        wanted |= np.isin(np.concatenate([n["id"] for n in numbers]), ids)
    starts = np.cumsum([0] + [len(n["src_id"]) for n in numbers])
    hits = np.flatnonzero(wanted)
    image_of = np.searchsorted(starts, hits, side="right") - 1
    holding, begins = np.unique(image_of, return_index=True)  # hits are in image order
    rows = np.zeros(len(hits), HISTORY_DTYPE)
    for k, lo, hi in zip(holding.tolist(), begins.tolist(), [*begins[1:].tolist(), len(hits)]):
        (im_id, keywords), at = images[k], hits[lo:hi] - starts[k]
        out = rows[lo:hi]
        for name in HISTORY_DTYPE.names:
            if name in keywords["source_ids"]:
                out[name] = keywords["source_ids"][name][at]
            elif name in keywords["sources"].dtype.names:
                out[name] = keywords["sources"][name][at]
        if "im_id" not in keywords["source_ids"]:
            out["im_id"] = im_id
    rows["freq_band"] = earlier.band[np.searchsorted(earlier.im_id, rows["im_id"])]
    return rows


def _failure_text(exc: BaseException) -> str:
    """One line for a failed transaction: the database's own words, or a fault's type and words."""
    return one_line(exc) if isinstance(exc, DatabaseError) else f"{type(exc).__name__}: {one_line(exc)}"


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
