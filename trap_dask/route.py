"""The route of one image through the cluster, in one place.

For image ``i`` the client submits, at once and without waiting for anything::

    loaded_i  = process(scanned_i)                      worker W (an extraction slot); pixels stay on W
    outcome_i = associate(writer, loaded_i, summary_i-1) runs on W, calls the writer actor with the
                                                        ImageResult (detections, no pixels); after image i-1
    forced_i  = force(loaded_i, outcome_i)              on W: forced and pair fits the writer asked for
    back_i    = backfill(loaded_j, outcome_i)           where the band's previous image j is held (or
                                                        read again): the new sources measured in it
    summary_i = commit(writer, outcome_i, forced_i, back_i) calls the writer actor: the CommitSummary

Every arrow is a Dask dependency, so data goes worker to worker (and to the writer's worker)
without passing through the client, and the writer sees the images strictly in time order
(``associate`` of image ``i`` waits for the summary of ``i - 1``). The client only collects
the summaries, in order, to count them and to keep a bounded window of images in flight.

The functions here run on workers; they need only the messages (``trap_dask.messages``) and
call the writer through its actor handle, so workers never import the writer's code.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from trap_dask.messages import CommitSummary, ForcedMeasurements, ForcedRequest


def associate(writer: Any, loaded: Any, after: CommitSummary | None) -> ForcedRequest | CommitSummary:
    """Hand the image's ImageResult to the writer (``after``: the previous image's summary, only to
    keep the order); its ForcedRequest, or the CommitSummary of an image it did not associate."""
    return writer.associate(loaded.result).result()


def force(loaded: Any, outcome: ForcedRequest | CommitSummary, params: Any) -> ForcedMeasurements | None:
    """The forced and pair fits of the request, where the image is held; None if none were asked."""
    from trap_dask.tasks import force as measure

    if not isinstance(outcome, ForcedRequest) or not (len(outcome.ra) or len(outcome.pair_ra)):
        return None
    return measure(loaded, outcome, params)


def backfill(previous: Any, outcome: ForcedRequest | CommitSummary, params: Any, quality: Any):
    """The new sources of the request measured in the band's previous image: (fits or None, seconds)."""
    import time

    from trap_dask.tasks import backfill as measure

    if not isinstance(outcome, ForcedRequest) or not len(outcome.backfill_ra) or outcome.backfill_image < 0:
        return None, 0.0
    started = time.perf_counter()
    return measure(previous, outcome, params, quality), time.perf_counter() - started


def commit(writer: Any, outcome: ForcedRequest | CommitSummary, forced: ForcedMeasurements | None,
           back: tuple) -> CommitSummary:
    """Have the writer commit the image with its measurements; the summary of what it added."""
    if isinstance(outcome, CommitSummary):
        return outcome
    fits, seconds = back
    if forced is None and (fits is not None or len(outcome)):
        from trap_dask.sources import empty_sources

        forced = ForcedMeasurements(empty_sources())
    if forced is not None and fits is not None:
        forced = replace(forced, backfill=fits, seconds=forced.seconds | {"backfill": seconds})
    return writer.commit(forced).result()


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
                 tag: str = ""):
        self.client, self.writer, self.params, self.quality = client, writer, params, quality
        self.n_images, self.tag = n_images, tag  #: tag: keeps the keys of a new writer's tasks new
        self.slot = {"resources": extract_resources} if extract_resources else {}
        self.resource = next(iter(extract_resources), None) if extract_resources else None
        self.previous_summary = None  #: the future of the last image's summary (keeps the order)
        self.latest: dict[float, tuple[Any, str]] = {}  #: freq_eff -> (future, worker) of the last such image
        self.slots: dict[str, int] = {}  #: worker -> extraction slots
        self.in_flight: dict[str, int] = {}  #: worker -> images submitted whose summary is not back
        self.placed: dict[int, str] = {}  #: image index -> worker
        self.refreshed = -1e9

    def _workers(self) -> dict[str, int]:
        import time

        if time.monotonic() - self.refreshed > self.REFRESH_S or not self.slots:
            info = self.client.scheduler_info(n_workers=-1)["workers"]
            self.slots = {address: max(1, int(w.get("resources", {}).get(self.resource, 0)) if self.resource
                                       else w.get("nthreads", 1))
                          for address, w in info.items()}
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
                               key=f"process-{index}-{os.path.basename(image.meta.url)}", **self.slot, **here)
        outcome = client.submit(associate, self.writer, loaded, self.previous_summary, priority=urgent,
                                key=f"associate-{name}", **here)
        forced = client.submit(force, loaded, outcome, self.params, priority=urgent, key=f"force-{name}", **here)
        # the band's previous image is, as a rule, the previous one of the same frequency; the task
        # checks that it is the one the writer names, else reads that one again
        previous, there = self.latest.get(image.meta.freq_eff, (None, None))
        back = client.submit(backfill, previous, outcome, self.params, self.quality, priority=urgent,
                             key=f"backfill-{name}", **({"workers": [there], "allow_other_workers": True}
                                                        if there else {}))
        summary = client.submit(commit, self.writer, outcome, forced, back, priority=urgent,
                                key=f"commit-{name}", **here)
        self.latest[image.meta.freq_eff] = (loaded, worker)
        self.previous_summary = summary
        if worker:
            self.in_flight[worker] = self.in_flight.get(worker, 0) + 1
            self.placed[index] = worker
        return summary

    def done(self, index: int) -> None:
        """The summary of image ``index`` came back: its worker has one image fewer in flight."""
        worker = self.placed.pop(index, None)
        if worker:
            self.in_flight[worker] -= 1
