"""Where ImageRoute places images: only on workers that have extraction slots."""

from __future__ import annotations

import pytest

from trap_dask.cluster import EXTRACT_RESOURCE
from trap_dask.route import WRITER_LOST, ImageRoute, WriterRef, abandon_writer, is_route_key


class _Scheduler:
    """A client stand-in that answers scheduler_info as Dask does."""

    def __init__(self, workers: dict):
        self.workers = workers

    def scheduler_info(self, n_workers: int = 5) -> dict:
        return {"workers": self.workers}


def test_images_go_only_to_workers_with_extraction_slots():
    """A worker that holds only the writer (no extraction resource) would leave every image bound
    to it waiting for ever (the process task needs a slot it lacks)."""
    client = _Scheduler({
        "tcp://writer:1": {"nthreads": 1, "resources": {}},
        "tcp://big:2": {"nthreads": 5, "resources": {EXTRACT_RESOURCE: 4}},
        "tcp://small:3": {"nthreads": 2, "resources": {EXTRACT_RESOURCE: 1}},
    })
    route = ImageRoute(client, WriterRef("w", "tcp://writer:1"), None, None, 10, {EXTRACT_RESOURCE: 1})
    placed = []
    for _ in range(10):
        worker = route._place()
        placed.append(worker)
        route.in_flight[worker] = route.in_flight.get(worker, 0) + 1
    assert "tcp://writer:1" not in placed
    assert placed.count("tcp://big:2") == 8 and placed.count("tcp://small:3") == 2  # by slots, 4:1


def test_without_resources_every_worker_counts_its_threads():
    """A running scheduler's workers may carry no resources: then threads are the slots."""
    client = _Scheduler({"tcp://a:1": {"nthreads": 3, "resources": {}}, "tcp://b:2": {"nthreads": 1}})
    route = ImageRoute(client, WriterRef("w", "tcp://a:1"), None, None, 8)
    assert route._workers() == {"tcp://a:1": 3, "tcp://b:2": 1}


class _Submitter(_Scheduler):
    """Also records the keys of the tasks submitted."""

    def __init__(self, workers: dict):
        super().__init__(workers)
        self.keys: list[str] = []

    def submit(self, func, *args, key: str, **kwargs) -> str:
        self.keys.append(key)
        return key


def test_every_task_of_an_image_has_a_key_the_run_knows_as_its_own():
    """A stopped run waits for its images' tasks by their keys (pipeline._drain): both routes of an
    image (one handle task, or associate/backfill/commit across two workers) and a restart's tag."""
    from types import SimpleNamespace

    client = _Submitter({"tcp://a:1": {"nthreads": 1}, "tcp://b:2": {"nthreads": 1}})
    route = ImageRoute(client, WriterRef("w", "tcp://a:1"), None, None, 3, tag="-w1")
    for index in range(3):
        route.submit(index, SimpleNamespace(meta=SimpleNamespace(url=f"/data/image-{index}.fits", freq_eff=1.5e8,
                                                                 freq_bw=2e6)))
    assert {key.split("-", 1)[0] for key in client.keys} == {"process", "handle", "associate", "backfill", "commit"}
    assert all(is_route_key(key) for key in client.keys)
    assert not is_route_key("someone-else") and not is_route_key(("tuple", 1))



class _Arguments(_Submitter):
    """Also records each task's arguments, by key."""

    def __init__(self, workers: dict):
        super().__init__(workers)
        self.args: dict[str, tuple] = {}

    def submit(self, func, *args, key: str, **kwargs) -> str:
        self.args[key] = args
        return super().submit(func, *args, key=key, **kwargs)


@pytest.mark.parametrize("bands", [None, [(149e6, 152e6), (159e6, 161e6)]], ids=["grown", "the user's"])
def test_an_images_backfill_is_given_the_previous_image_of_its_band(bands):
    """The band's previous image, which the backfill measures new sources in, is the last one of
    the band (as the writer groups them: 150.0 and 150.2 MHz in one), not of the same frequency
    (which had it read and extracted again from its file)."""
    from types import SimpleNamespace

    from trap_dask.bands import fixed_bands

    client = _Arguments({"tcp://a:1": {"nthreads": 1}})
    route = ImageRoute(client, WriterRef("w", "tcp://a:1"), None, None, 5,
                       bands=fixed_bands(bands) if bands else None)
    for index, freq in enumerate((150.0e6, 150.2e6, 160.0e6, 150.0e6, 160.0e6)):
        meta = SimpleNamespace(url=f"/data/{index}.fits", freq_eff=freq, freq_bw=2e6)
        route.submit(index, SimpleNamespace(meta=meta))
    previous = {key.split("-")[1]: args[2] for key, args in client.args.items() if key.startswith("handle")}
    assert previous == {"0": None, "1": "process-0-0.fits", "2": None, "3": "process-1-1.fits",
                        "4": "process-2-2.fits"}


class _Where:
    """An actor standing in for the writer: the thread each call ran in."""

    def where(self) -> int:
        import threading
        return threading.get_ident()


def _call_where(ref: WriterRef) -> tuple[int, int]:
    import threading
    return threading.get_ident(), ref.call("where")


def test_a_task_on_the_writers_worker_calls_it_in_its_own_thread():
    """On the writer's own worker a task runs the writer's method in place (no round trip through
    the event loop to the actor's thread); a writer that is gone fails the call at once."""
    import pytest
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        actor = client.submit(_Where, actor=True)
        actor.result()
        address = next(iter(client.who_has(actor)[actor.key]))
        task_thread, writer_thread = client.submit(_call_where, WriterRef(actor.key, address)).result()
        assert task_thread == writer_thread
        with pytest.raises(RuntimeError, match=WRITER_LOST):
            client.submit(_call_where, WriterRef("no-such-writer", address)).result()


def test_a_call_to_a_lost_writer_ends_as_soon_as_the_run_abandons_it():
    """A task calling a writer whose worker is gone waits while Dask retries the connection (for its
    connect timeout, here ten minutes), holding a thread that the new writer's tasks need. The run
    sends every worker abandon_writer once it finds the writer lost: the call ends at once, and a
    later call to that writer fails at once."""
    import socket
    import time
    import uuid

    import dask
    import pytest
    from distributed import Client, LocalCluster

    import trap_dask.route

    with socket.socket() as probe:  # a port nothing listens on: a worker that is gone
        probe.bind(("127.0.0.1", 0))
        gone = WriterRef(f"writer-{uuid.uuid4()}", f"tcp://127.0.0.1:{probe.getsockname()[1]}")
    with dask.config.set({"distributed.comm.timeouts.connect": "600s"}), \
            LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        call = client.submit(_call_where, gone, pure=False)
        deadline = time.monotonic() + 30
        while not trap_dask.route._CALLS.get(gone.key) and time.monotonic() < deadline:  # in flight
            time.sleep(0.01)
        time.sleep(0.5)  # still retrying
        assert not call.done()
        client.run(abandon_writer, gone.key)
        with pytest.raises(RuntimeError, match=WRITER_LOST):
            call.result(timeout=10)
        with pytest.raises(RuntimeError, match=WRITER_LOST):
            client.submit(_call_where, gone, pure=False).result(timeout=10)


def _fails_with(exc: BaseException):
    raise exc


def test_a_task_failing_with_the_writers_database_error_is_not_logged_by_dask_as_well():
    """The run stops with the words of a writer that refuses images after a failed transaction, and
    says when it lost its writer; Dask's "Compute Failed" record (the task, a traceback) of that
    refusal, or of a call to the lost writer, is left out. Any other
    error (a driver's that reached a task unconverted, a fault of the code) keeps its record."""
    import logging

    from distributed import Client, LocalCluster

    from trap_dask.db.backends import DatabaseError, DatabaseGone

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("distributed.worker")
    logger.addHandler(handler)
    try:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            for exc in (DatabaseError("the export database could not be written (disk full); ..."),
                        DatabaseError("this writer was taken over (...): it writes nothing more"),
                        RuntimeError(WRITER_LOST), DatabaseGone("SQLite file x.db was deleted"),
                        ValueError("a fault")):
                future = client.submit(_fails_with, exc, pure=False)
                assert future.exception() is not None
    finally:
        logger.removeHandler(handler)
    failed = [r for r in records if r.startswith("Compute Failed")]
    assert len(failed) == 2 and "DatabaseGone('SQLite" in failed[0] and "ValueError('a fault')" in failed[1]
