"""The route of one image through the cluster, in one place.

For image ``i`` the client submits, at once and without waiting for anything, two tasks on the
worker W it chose for the image::

    loaded_i  = process(scanned_i)           read, quality, background, extract; the pixels stay on W
    summary_i = handle(writer, loaded_i, loaded_j, summary_i-1)
        -> writer.associate(ImageResult)     the actor (detections only, no pixels): a ForcedRequest
        -> force(loaded_i, request)          forced and pair fits, on W
        -> backfill(loaded_j, request)       new sources in the band's previous image j (on W too)
        -> writer.commit(ForcedMeasurements) the actor: one transaction, the CommitSummary

When image j is held on another worker, ``handle`` is split in three tasks (associate_and_force
on W, backfill_after where j is, commit_after on W). Every argument that is a future is a Dask
dependency, so data goes worker to worker without passing through the client, and the writer
sees the images strictly in time order (``summary_i-1`` is an argument of image i's first
writer call). The client only collects the summaries, in order, to count them and to keep a
bounded window of images in flight.

The functions here run on workers; they need only the messages (``trap_dask.messages``) and
call the writer through its actor handle (in place on the writer's own worker, see
:meth:`WriterRef.call`), so workers never import the writer's code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from trap_dask.bands import Band, assign_band
from trap_dask.messages import CommitSummary, ForcedMeasurements, ForcedRequest

#: The exception (its repr, as Dask logs it) of a task refused by a writer whose transaction
#: failed (Writer._failure_message), or of one whose writer was lost (:func:`abandon_writer`):
#: the run says so itself, in one line.
REPORTED_BY_THE_RUN = re.compile(r"""^(DatabaseError\(['"](the export database could not be written|this writer was """
                                 r"""taken over)|RuntimeError\(['"]the writer was lost)""")


#: What a call to a writer that has finished or was lost raises.
WRITER_LOST = "the writer was lost, or has finished"


class _ReportedByTheRun(logging.Filter):
    """Leaves out Dask's "Compute Failed" record (the task, its exception, a traceback) of a task
    that the writer refused after a failed transaction; a driver's error that reached a task
    unconverted (a fault of the code) keeps its record."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Compute Failed") and len(args) > 3
                    and REPORTED_BY_THE_RUN.match(str(args[3])) is not None)


# every worker imports this module to run an image's tasks, before the first of them runs
if not any(isinstance(f, _ReportedByTheRun) for f in logging.getLogger("distributed.worker").filters):
    logging.getLogger("distributed.worker").addFilter(_ReportedByTheRun())


@dataclass(frozen=True)
class WriterRef:
    """Where the writer actor is: tasks call it through their worker's connections (no Dask client
    on the workers), or in place on its own worker; a call to a writer that the run has found lost
    fails at once (:func:`abandon_writer`)."""

    key: str
    address: str

    def call(self, method: str, *args: Any) -> Any:
        """``Writer.<method>(*args)``: its result, or its exception raised here. On the writer's own
        worker the method runs in this thread (the writer runs its entry points one at a time);
        elsewhere on the actor's thread, through the workers' connections."""
        from distributed import get_worker
        from distributed.protocol import to_serialize
        from distributed.utils import sync

        worker = get_worker()
        if self.address == worker.address:
            writer = worker.state.actors.get(self.key)
            if writer is None:
                raise RuntimeError(WRITER_LOST)  # a run stopping, or a writer lost: nothing to ask
            return getattr(writer, method)(*args)

        async def execute():
            if self.key in _LOST_WRITERS:
                raise RuntimeError(WRITER_LOST)
            call = asyncio.ensure_future(worker.rpc(self.address).actor_execute(
                actor=self.key, function=method, args=[to_serialize(a) for a in args], kwargs={}))
            calls = _CALLS.setdefault(self.key, set())
            calls.add(call)
            try:
                return await call
            except asyncio.CancelledError:
                if call.cancelled() and self.key in _LOST_WRITERS:  # abandoned: its work is done elsewhere
                    raise RuntimeError(WRITER_LOST) from None
                # (sync() lets a CancelledError through without a result: the task would fail obscurely)
                raise RuntimeError(f"the call of the writer's {method} was cancelled") from None
            finally:
                calls.discard(call)

        answer = sync(worker.loop, execute)
        if answer["status"] != "OK":
            raise answer["exception"]
        return answer["result"]


#: In a worker's process: the actor keys of writers found lost (:func:`abandon_writer`), and the
#: calls in flight to each writer (asyncio futures on their worker's event loop).
_LOST_WRITERS: set[str] = set()
_CALLS: dict[str, set[asyncio.Future]] = {}


async def abandon_writer(key: str) -> None:
    """Run on every worker (``Client.run``, on its event loop) once the writer ``key`` is lost: the
    calls in flight to it there, and any made later, raise at once. Dask would retry their
    connection for its connect timeout (30 s), holding the worker's threads, whose tasks the lost
    writer's replacement waits for."""
    _LOST_WRITERS.add(key)
    for call in _CALLS.pop(key, ()):
        call.get_loop().call_soon_threadsafe(call.cancel)


def handle(writer: WriterRef, loaded: Any, previous: Any, after: CommitSummary | None, params: Any,
           quality: Any) -> CommitSummary:
    """All of one image's steps after extraction, in one task where the image is held (and the
    band's previous image too): associate, forced fits, backfill, commit. ``after``: the previous
    image's summary, only to keep the order."""
    outcome = writer.call("associate", loaded.result)
    if isinstance(outcome, CommitSummary):
        return outcome
    return commit(writer, outcome, force(loaded, outcome, params), backfill(previous, outcome, params, quality))


def associate_and_force(writer: WriterRef, loaded: Any, after: CommitSummary | None, params: Any):
    """:func:`handle` up to the forced fits, when the band's previous image is on another worker:
    (the writer's ForcedRequest or CommitSummary, the forced fits or None)."""
    outcome = writer.call("associate", loaded.result)
    return outcome, force(loaded, outcome, params)


def backfill_after(previous: Any, outcome_forced: tuple, params: Any, quality: Any):
    """:func:`backfill` of the request that associate_and_force got, where the previous image is held."""
    return backfill(previous, outcome_forced[0], params, quality)


def commit_after(writer: WriterRef, outcome_forced: tuple, back: tuple) -> CommitSummary:
    """:func:`commit` of what associate_and_force and backfill_after measured."""
    return commit(writer, *outcome_forced, back)


def force(loaded: Any, outcome: ForcedRequest | CommitSummary, params: Any) -> ForcedMeasurements | None:
    """The forced and pair fits of the request, where the image is held; None if none were asked."""
    from trap_dask.tasks import force as measure

    if not isinstance(outcome, ForcedRequest) or not (len(outcome.ra) or len(outcome.pair_ra)):
        return None
    return measure(loaded, outcome, params)


def backfill(previous: Any, outcome: ForcedRequest | CommitSummary, params: Any, quality: Any):
    """The new sources of the request measured in the band's previous image: (fits or None, seconds,
    CPU seconds of this thread)."""
    import time

    from trap_dask.tasks import backfill as measure

    if not isinstance(outcome, ForcedRequest) or not len(outcome.backfill_ra) or outcome.backfill_image < 0:
        return None, 0.0, 0.0
    started, cpu = time.perf_counter(), time.thread_time()
    fits = measure(previous, outcome, params, quality)
    return fits, time.perf_counter() - started, time.thread_time() - cpu


def commit(writer: WriterRef, outcome: ForcedRequest | CommitSummary, forced: ForcedMeasurements | None,
           back: tuple) -> CommitSummary:
    """Have the writer commit the image with its measurements; the summary of what it added."""
    if isinstance(outcome, CommitSummary):
        return outcome
    fits, seconds, cpu = back
    if forced is None and (fits is not None or len(outcome)):
        from trap_dask.sources import empty_sources

        forced = ForcedMeasurements(empty_sources())
    if forced is not None:
        forced = replace(forced, seconds=forced.seconds | {"backfill": seconds}, cpu=forced.cpu + cpu,
                         **({"backfill": fits} if fits is not None else {}))
    return writer.call("commit", forced, outcome.url)


#: The tasks :meth:`ImageRoute.submit` makes for an image; each key is "<task>-<index>-<file name>",
#: with "-w<n>" after a writer restart.
TASKS = ("process", "handle", "associate", "backfill", "commit")


def is_route_key(key: Any) -> bool:
    """Whether a Dask key is that of an image's task (not another client's on a shared cluster)."""
    return isinstance(key, str) and key.split("-", 1)[0] in TASKS


class ImageRoute:
    """Submits each image's tasks (above) in time order; :meth:`submit` returns its summary's future.

    Each image is placed on a worker here, the one with the fewest images in flight per extraction
    slot, and every task that takes its pixels is bound to that worker (loosely: another one only if
    it is gone): Dask would otherwise move a held image to a less busy worker to force-fit it there,
    which costs more than it saves and makes the fits depend on where they ran (to ~1e-12).
    """

    #: Seconds between looks at the workers the scheduler has (batch jobs join while a run goes on).
    REFRESH_S = 2.0

    def __init__(self, client, writer, params, quality, n_images: int, extract_resources: dict | None = None,
                 tag: str = "", bands: list[Band] | None = None):
        self.client, self.writer, self.params, self.quality = client, writer, params, quality
        #: tag: new keys for a new writer's tasks (a task of the lost writer's time may be stuck:
        #: bound to a worker that is gone at a moment when no worker ran, Dask never places it again)
        self.n_images, self.tag = n_images, tag
        self.slot = {"resources": extract_resources} if extract_resources else {}
        self.resource = next(iter(extract_resources), None) if extract_resources else None
        self.previous_summary = None  #: the future of the last image's summary (keeps the order)
        self.latest: dict[int | None, tuple[Any, str]] = {}  #: band -> (future, worker) of its last image
        #: the frequency bands as the writer makes them (trap_dask.bands): the user's, else grown
        #: from the images (a band's images may differ in frequency within it)
        self.bands, self.fixed_bands = list(bands or ()), bool(bands)
        self.slots: dict[str, int] = {}  #: worker -> extraction slots
        self.in_flight: dict[str, int] = {}  #: worker -> images submitted whose summary is not back
        self.placed: dict[int, str] = {}  #: image index -> worker
        self.refreshed = -1e9

    def _workers(self) -> dict[str, int]:
        import time

        if time.monotonic() - self.refreshed > self.REFRESH_S or not self.slots:
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            self.slots = {address: int(w.get("resources", {}).get(self.resource, 0)) if self.resource
                          else w.get("nthreads", 1) for address, w in info.items()}
            # a worker without extraction slots (one that holds only the writer) never gets an image
            self.slots = {address: n for address, n in self.slots.items() if n > 0}
            self.refreshed = time.monotonic()
        return self.slots

    def _place(self) -> str | None:
        slots = self._workers()
        if not slots:
            return None
        return min(sorted(slots), key=lambda w: self.in_flight.get(w, 0) / slots[w])

    def submit(self, index: int, image) -> Any:
        from trap_dask import tasks

        client, name = self.client, f"{index}-{os.path.basename(image.meta.url)}{self.tag}"
        first, urgent = self.n_images - index, self.n_images + 1  # earlier images first; the writer's chain first
        worker = self._place()
        here = {"workers": [worker], "allow_other_workers": True} if worker else {}
        loaded = client.submit(tasks.process, image, self.quality, self.params, priority=first,
                               key=f"process-{name}", **self.slot, **here)
        # the band's previous image is, as a rule, the previous one of the band; the backfill
        # checks that it is the one the writer names, else reads that one again
        band = self._band(image.meta.freq_eff, image.meta.freq_bw)
        previous, there = self.latest.get(band, (None, None))
        if previous is None or there == worker:  # one task where both images are
            summary = client.submit(handle, self.writer, loaded, previous, self.previous_summary, self.params,
                                    self.quality, priority=urgent, key=f"handle-{name}", **here)
        else:
            measured = client.submit(associate_and_force, self.writer, loaded, self.previous_summary, self.params,
                                     priority=urgent, key=f"associate-{name}", **here)
            back = client.submit(backfill_after, previous, measured, self.params, self.quality, priority=urgent,
                                 key=f"backfill-{name}", workers=[there], allow_other_workers=True)
            summary = client.submit(commit_after, self.writer, measured, back, priority=urgent,
                                    key=f"commit-{name}", **here)
        self.latest[band] = (loaded, worker)
        self.previous_summary = summary
        if worker:
            self.in_flight[worker] = self.in_flight.get(worker, 0) + 1
            self.placed[index] = worker
        return summary

    def _band(self, freq_eff: float, freq_bw: float) -> int | None:
        """The id of the band of an image at ``freq_eff`` of bandwidth ``freq_bw`` (Hz), as the
        writer assigns it (None: outside the user's bands)."""
        band, new = assign_band(freq_eff, freq_bw, self.bands, self.fixed_bands)
        if new:
            self.bands.append(band)
        return None if band is None else band.band_id

    def done(self, index: int) -> None:
        """The summary of image ``index`` came back: its worker has one image fewer in flight."""
        worker = self.placed.pop(index, None)
        if worker:
            self.in_flight[worker] -= 1
