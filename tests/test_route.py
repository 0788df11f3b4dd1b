"""Where ImageRoute places images: only on workers that have extraction slots."""

from __future__ import annotations

from trap_dask.cluster import EXTRACT_RESOURCE
from trap_dask.route import ImageRoute, WriterRef, is_route_key


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
        route.submit(index, SimpleNamespace(meta=SimpleNamespace(url=f"/data/image-{index}.fits", freq_eff=1.5e8)))
    assert {key.split("-", 1)[0] for key in client.keys} == {"process", "handle", "associate", "backfill", "commit"}
    assert all(is_route_key(key) for key in client.keys)
    assert not is_route_key("someone-else") and not is_route_key(("tuple", 1))



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
        with pytest.raises(RuntimeError, match="finished or was lost"):
            client.submit(_call_where, WriterRef("no-such-writer", address)).result()


def _fails_with(exc: BaseException):
    raise exc


def test_a_task_failing_with_the_writers_database_error_is_not_logged_by_dask_as_well():
    """The run stops with the words of a writer that refuses images after a failed transaction;
    Dask's "Compute Failed" record (the task, a traceback) of that refusal is left out. Any other
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
                        DatabaseGone("SQLite file x.db was deleted"), ValueError("a fault")):
                future = client.submit(_fails_with, exc, pure=False)
                assert future.exception() is not None
    finally:
        logger.removeHandler(handler)
    failed = [r for r in records if r.startswith("Compute Failed")]
    assert len(failed) == 2 and "DatabaseGone('SQLite" in failed[0] and "ValueError('a fault')" in failed[1]
