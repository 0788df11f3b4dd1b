"""Real Dask clusters: a `dask scheduler` and `dask worker` processes on loopback, worker loss,
writer placement, and the batch job scripts dask-jobqueue writes from cluster/jobqueue.yaml."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from _runs import same_tables, spawn

from trap_dask.cli import main
from trap_dask.cluster import (
    WRITER_RESOURCE,
    ClusterError,
    check_inputs_readable,
    check_readable_on_workers,
    jobqueue_class,
    jobqueue_options,
    jobqueue_scale,
    local_shape,
    probe_paths,
    scheduler_address,
    start_client,
    writer_placement,
)
from trap_dask.config import ConfigError, build_config, read_toml
from trap_dask.pipeline import PipelineError, run_pipeline
from trap_dask.simulate import SurveySpec, simulate_survey
from trap_dask.writer import MAX_BATCH

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
SPEC = SurveySpec(n_epochs=12, shape=(256, 256), n_steady=10, n_variable=2, n_transient=1, n_resolved=0,
                  n_pairs=0, min_separation=4.0, seed=5)
LONG_SPEC = replace(SPEC, n_epochs=MAX_BATCH + 4)
THRESHOLDS = {"detection_threshold": 5.0, "analysis_threshold": 3.0}
#: Tables whose content must not depend on where the work ran (runs and config hold times and flags).
COMPARED = ("images", "extracted_sources", "variability", "newsource", "runningcatalog", "frequencybands")
#: Columns that differ between two runs of the same images by design: the run, and the files' stamps
#: (a file read within 2 s of being written gets none: trap_dask.tasks.FRESH_NS).
UNCOMPARED = ("run", "file_size", "file_mtime")


# -- a real cluster: separate OS processes on 127.0.0.1 ---------------------------------------
class DaskProcesses:
    """`dask scheduler` and `dask worker` processes, each in its own process group."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None):
        self.folder = folder
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = ""

    def _spawn(self, name: str, module: str, *args: str) -> None:
        with open(self.folder / f"{name}.log", "w") as log:
            self.procs[name] = spawn([sys.executable, "-m", module, *args], stdout=log, stderr=log, env=self.env)

    def start(self, workers: dict[str, str]) -> DaskProcesses:
        """A scheduler on a free port, then one single-threaded worker per name (value: its resources)."""
        info = self.folder / "scheduler.json"
        self._spawn("scheduler", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                    "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(info))
        self.address = self._wait(lambda: info.is_file() and json.loads(info.read_text())["address"])
        for name, resources in workers.items():
            self._spawn(name, "distributed.cli.dask_worker", self.address, "--name", name, "--nthreads", "1",
                        "--host", "127.0.0.1", "--no-dashboard", *(["--resources", resources] if resources else []))
        if workers:
            with self.client() as client:
                client.wait_for_workers(len(workers), timeout=60)
        return self

    def _wait(self, ready, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if value := ready():
                    return value
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise RuntimeError("the dask scheduler did not start: " + (self.folder / "scheduler.log").read_text())

    @contextmanager
    def client(self):
        from distributed import Client

        client = Client(self.address, timeout="20s")
        try:
            yield client
        finally:
            client.close()

    def kill(self, name: str) -> None:
        """SIGKILL a worker and its nanny: the worker dies without saying goodbye."""
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def dask_cluster(folder: Path, env: dict[str, str] | None = None, **workers: str):
    """A scheduler and the named workers (value: their resources), their environment ``os.environ``
    with ``env``."""
    cluster = DaskProcesses(folder, env)
    try:
        yield cluster.start(workers)
    finally:
        cluster.stop()


def worker_address(client, name: str) -> str:
    return next(a for a, w in client.scheduler_info(n_workers=-1)["workers"].items() if w["name"] == name)


def stored_data(client) -> dict[str, int]:
    """Number of results each worker holds, by worker name."""
    def count(dask_scheduler):
        return {w.name: len(w.has_what) for w in dask_scheduler.workers.values()}
    return client.run_on_scheduler(count)


# -- surveys and databases ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> Path:
    return simulate_survey(tmp_path_factory.mktemp("survey"), SPEC).parent


def _local_run(survey: Path, db: Path) -> Path:
    """The database of a run of ``survey`` on a LocalCluster (threads)."""
    run_pipeline(build_config(flags(survey, db, scheduler="threads", nr_threads=2), {}, None))
    return db


@pytest.fixture(scope="module")
def reference_db(survey, tmp_path_factory) -> Path:
    return _local_run(survey, tmp_path_factory.mktemp("reference") / "local.db")


@pytest.fixture(scope="module")
def reference(reference_db) -> dict[str, list[tuple]]:
    return content(reference_db)


@pytest.fixture(scope="module")
def long_survey(tmp_path_factory) -> Path:
    """For the tests that stop a run's writer or worker mid-way: more images than one transaction
    holds (a writer writes at most MAX_BATCH images at once)."""
    return simulate_survey(tmp_path_factory.mktemp("long_survey"), LONG_SPEC).parent


@pytest.fixture(scope="module")
def long_reference(long_survey, tmp_path_factory) -> tuple[Path, dict[str, list[tuple]]]:
    """(database, its compared tables) of a run of the long survey on a LocalCluster."""
    db = _local_run(long_survey, tmp_path_factory.mktemp("long_reference") / "local.db")
    return db, content(db)


def flags(survey: Path, db: Path, **extra) -> dict:
    return {"input_images": (str(survey),), "db_name": str(db), **THRESHOLDS, **extra}


def query(db: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(sql, args).fetchall()


def content(db: Path) -> dict[str, list[tuple]]:
    """Every row of the compared tables, without the ``run`` that wrote it or the files' stamps."""
    tables = {}
    for name in COMPARED:
        columns = [row[1] for row in query(db, f"PRAGMA table_info({name})") if row[1] not in UNCOMPARED]
        tables[name] = query(db, f"SELECT {', '.join(columns)} FROM {name} ORDER BY 1")
    return tables


def committed_images(db: Path) -> int:
    try:
        return query(db, "SELECT count(*) FROM images")[0][0]
    except sqlite3.Error:
        return 0


def _a_prefix_of(db: Path, reference_db: Path, reference: dict[str, list[tuple]]) -> int:
    """Assert that ``db`` holds what the first n transactions of the reference run wrote; returns n.
    Measurement ids are handed out in commit order, and the next image's transaction only adds its
    new sources' forced fits to image n."""
    prefix = content(db)
    n = len(prefix["images"])
    last = max(row[0] for row in prefix["extracted_sources"])
    assert prefix["extracted_sources"] == query(reference_db, "SELECT * FROM extracted_sources WHERE id <= ? "
                                                              "ORDER BY 1", last)
    images = query(reference_db, "SELECT i.id, i.n_forced - (SELECT count(*) FROM extracted_sources x "
                                  "WHERE x.im_id = i.id AND x.id > ?) FROM images i ORDER BY 1", last)[:n]
    # n_forced apart, checked next: a later transaction adds the forced fits backfilled into image n
    skip = [row[1] for row in query(db, "PRAGMA table_info(images)") if row[1] not in UNCOMPARED].index("n_forced")
    assert ([row[:skip] + row[skip + 1:] for row in prefix["images"]]
            == [row[:skip] + row[skip + 1:] for row in reference["images"][:n]])
    assert query(db, "SELECT id, n_forced FROM images ORDER BY 1") == images
    return n


def cli_run(survey: Path, db: Path, address: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    args = [f"--{k}={v}" for k, v in flags(survey, db, scheduler_address=address).items() if k != "input_images"]
    with open(log, "w") as err:
        return spawn([sys.executable, "-m", "trap_dask.cli", "run", "-i", str(survey), *args],
                     stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **(env or {})})


def wait_until(condition, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the worker could be killed: " + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


# -- end to end on a running scheduler ------------------------------------------------------------
@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """A scheduler and two plain workers, shared by the tests that kill nothing."""
    with dask_cluster(tmp_path_factory.mktemp("dask"), a="", b="") as cluster:
        yield cluster


@pytest.mark.slow
def test_scheduler_address_gives_the_local_result(running, survey, reference, tmp_path, capsys):
    with running.client() as client:
        before = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
        db = tmp_path / "remote.db"
        run_pipeline(build_config(flags(survey, db, scheduler_address=running.address), {}, None))
        after = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
    assert after - before > 4 * SPEC.n_epochs, "the run did not use the running scheduler"
    assert same_tables(content(db), reference)
    assert "dashboard: http://127.0.0.1:" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_worker_has_its_work_redone(long_survey, long_reference, tmp_path):
    with dask_cluster(tmp_path, keeper=f"{WRITER_RESOURCE}=1", victim="") as cluster, cluster.client() as client:
        db, log = tmp_path / "killed.db", tmp_path / "run.log"
        proc = cli_run(long_survey, db, cluster.address, log)
        wait_until(lambda: committed_images(db) >= 2 and stored_data(client).get("victim", 0) > 0, proc, log)
        cluster.kill("victim")
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert same_tables(content(db), long_reference[1])


@pytest.mark.slow
def test_lost_writer_is_started_again_on_another_worker(long_survey, long_reference, tmp_path):
    # A task that calls the writer after it died holds its worker's one thread, which the new writer's
    # tasks need, for as long as Dask retries the connection: the run ends its call at once instead
    # (route.abandon_writer). Where that happens here, a retry of ten minutes would not let the run
    # end within two (test_route has the call itself).
    ten_minutes = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "600s"}
    with dask_cluster(tmp_path, env=ten_minutes, writer=f"{WRITER_RESOURCE}=1", other="") as cluster:
        db, log = tmp_path / "lost.db", tmp_path / "run.log"
        proc = cli_run(long_survey, db, cluster.address, log)
        wait_until(lambda: committed_images(db) >= 2, proc, log)
        cluster.kill("writer")   # for good: its nanny too
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert "starting a new writer from the committed state" in log.read_text()
    assert same_tables(content(db), long_reference[1])


@pytest.mark.slow
def test_lost_writer_stops_the_run_with_a_consistent_prefix_after_the_last_restart(
        long_survey, long_reference, tmp_path, monkeypatch, capsys):
    import threading

    import trap_dask.pipeline

    reference_db, reference = long_reference

    monkeypatch.setattr(trap_dask.pipeline, "MAX_WRITER_RESTARTS", 0)   # the bound, reached at the first loss
    with dask_cluster(tmp_path, writer=f"{WRITER_RESOURCE}=1", other="") as cluster:
        db = tmp_path / "lost.db"

        def kill_the_writer() -> None:
            deadline = time.monotonic() + 120
            while committed_images(db) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            cluster.kill("writer")

        killer = threading.Thread(target=kill_the_writer)
        killer.start()
        try:
            with pytest.raises(PipelineError) as stopped:
                run_pipeline(build_config(flags(long_survey, db, scheduler_address=cluster.address), {}, None))
        finally:
            killer.join()
    message = str(stopped.value)
    assert "writer" in message and "--db_append" in message, message
    assert 2 <= _a_prefix_of(db, reference_db, reference) < LONG_SPEC.n_epochs
    run_pipeline(build_config(flags(long_survey, db, scheduler="threads", nr_threads=2, db_append=True), {}, None))
    assert content(db) == reference, "resuming with --db_append did not complete the run"


@pytest.mark.slow
def test_lost_scheduler_stops_the_run_with_a_consistent_prefix_and_says_so(long_survey, long_reference, tmp_path):
    """The scheduler dies (its node fails): once the client's reconnection fails (here after 5 s;
    Dask's default is 30), the run stops in one line naming the scheduler, without trying to start
    a new writer, and the same command with --db_append on a new cluster completes it."""
    reference_db, reference = long_reference
    db, log = tmp_path / "lost.db", tmp_path / "run.log"
    with dask_cluster(tmp_path, a="", b="") as cluster:
        proc = cli_run(long_survey, db, cluster.address, log, env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "5s"})
        wait_until(lambda: committed_images(db) >= 2, proc, log)
        cluster.kill("scheduler")
        assert proc.wait(timeout=120) == 1
        said = log.read_text()
    assert f"error: the connection to the Dask scheduler ({cluster.address}) was lost" in said, said[-3000:]
    assert "--db_append to resume" in said and "Traceback" not in said and "new writer" not in said
    assert 2 <= _a_prefix_of(db, reference_db, reference) < LONG_SPEC.n_epochs
    run_pipeline(build_config(flags(long_survey, db, scheduler="threads", nr_threads=2, db_append=True), {}, None))
    assert content(db) == reference


@pytest.mark.slow
def test_unreadable_input_names_the_worker_and_the_file(running, survey, tmp_path):
    missing = str(tmp_path / "elsewhere" / "image.fits")   # as if not mounted on the workers
    with running.client() as client:
        check_inputs_readable(client, sorted(str(p) for p in survey.glob("*.fits")))
        with pytest.raises(ClusterError, match=rf"worker {worker_address(client, 'b')} cannot read {missing}"):
            check_readable_on_workers(client, [missing])


def test_a_worker_lost_while_checking_the_inputs_is_no_sign_of_a_missing_mount_or_package():
    """A worker restarted for memory (or whose node went) while it was asked answers with a
    connection error and is gone: that says nothing of its files or its Python (it was reported as
    'install trap-dask in the workers' Python environment'). A worker still there is reported."""
    from distributed.comm import CommClosedError

    class Answers:
        def __init__(self, results, present):
            self.results, self.present = results, present

        def run(self, function, *args, on_error):
            assert on_error == "return"
            return self.results

        def scheduler_info(self, n_workers):
            return {"workers": dict.fromkeys(self.present, {})}

    gone = CommClosedError("in <TCP (closed)>: Stream is closed")
    check_readable_on_workers(Answers({"tcp://a:1": gone, "tcp://b:2": []}, ["tcp://b:2", "tcp://c:3"]),
                              ["/data/x.fits"])
    # a worker still there whose answer is an OSError (importing trap_dask from a stale NFS mount)
    with pytest.raises(ClusterError, match=r"worker tcp://a:1: cannot run trap-dask \(OSError: \[Errno 116\]"):
        check_readable_on_workers(Answers({"tcp://a:1": OSError(116, "Stale file handle")}, ["tcp://a:1"]),
                                  ["/data/x.fits"])
    with pytest.raises(ClusterError, match=r"worker tcp://a:1: cannot run trap-dask \(ModuleNotFoundError"):
        check_readable_on_workers(Answers({"tcp://a:1": ModuleNotFoundError("No module named 'trap_dask'")},
                                          ["tcp://a:1"]), ["/data/x.fits"])


class _Scheduler:
    """What MemoryWatch asks a client for: the memory restarts the nannies recorded (stamped by
    the scheduler's clock) and the workers' state."""

    def __init__(self):
        self.events: list[tuple[float, dict]] = []
        self.paused = True
        self.others: dict[str, dict] = {}  #: more workers: address -> task_counts

    def get_events(self, topic):
        assert topic == "worker-restart-memory"
        return tuple(self.events)

    def scheduler_info(self, n_workers):
        metrics = {"task_counts": {}, "memory": 240 << 20}
        workers = {"tcp://a:1": {"status": "paused" if self.paused else "running", "metrics": metrics,
                                 "memory_limit": 256 << 20}}
        for address, counts in self.others.items():
            workers[address] = {"status": "running", "metrics": {"task_counts": counts, "memory": 100 << 20},
                                "memory_limit": 256 << 20}
        return {"workers": workers}


def test_memory_restarts_count_from_the_run_on_the_schedulers_clock(monkeypatch):
    """Restarts before the run are not its own, whatever the scheduler's clock says against ours; a
    writer's loss is put down to memory only where its own worker was restarted."""
    from trap_dask.cluster import MemoryWatch

    scheduler = _Scheduler()
    scheduler.events = [(50.0, {"worker": "tcp://a:1", "rss": 300 << 20})]  # the scheduler's clock is far behind
    watch = MemoryWatch(scheduler, "local")
    assert watch.restarts() == [] and watch.sentence() is None
    scheduler.events.append((51.0, {"worker": "tcp://b:2", "rss": 280 << 20}))
    assert len(watch.restarts()) == 1 and "Dask restarted workers 1 time(s)" in watch.sentence()
    assert watch.sentence("tcp://a:1") is None
    assert "restarted the writer's worker 1 time(s)" in watch.sentence("tcp://b:2")
    monkeypatch.setattr(MemoryWatch, "LOOK_EVERY_S", 0.0)
    watch.progressed()
    watch.check()  # counts from here
    scheduler.events += [(60.0 + i, {"worker": "tcp://b:2", "rss": 280 << 20}) for i in range(9)]
    scheduler.paused = False
    watch.check()
    scheduler.events.append((70.0, {"worker": "tcp://b:2", "rss": 280 << 20}))
    with pytest.raises(ClusterError, match="^Dask restarted workers 10 times in a row for exceeding their memory"):
        watch.check()


def test_only_workers_paused_at_every_look_without_progress_stop_the_run(monkeypatch):
    """A pause seen once, then images committed for longer than PAUSED_S, then a pause again: the
    run goes on (the first look's time once counted); paused at every look for PAUSED_S: it stops."""
    from trap_dask import cluster

    clock = [1000.0]
    monkeypatch.setattr(cluster.time, "monotonic", lambda: clock[0])
    scheduler = _Scheduler()
    watch = cluster.MemoryWatch(scheduler, "local")
    watch.check()  # paused
    clock[0] += 40.0
    watch.progressed()  # images came in meanwhile, each within a second: nothing was looked at
    watch.check()  # paused again: the pause counts from here
    paused_from = clock[0]
    while clock[0] + watch.LOOK_EVERY_S - paused_from < watch.PAUSED_S:
        clock[0] += watch.LOOK_EVERY_S
        watch.check()
    clock[0] += watch.LOOK_EVERY_S
    with pytest.raises(ClusterError, match="^1 of 1 Dask workers have been paused at their memory limit for 30 s, "
                                           "with nothing running anywhere"):
        watch.check()


def test_a_paused_worker_holds_the_run_while_the_others_idle(monkeypatch):
    """An image's tasks are bound to the worker holding its pixels: a paused worker's work waits for
    it while the others, running, have nothing to do (seen in a run: one worker paused at 82%, one
    idle, for minutes). That stops the run; a worker still running something does not."""
    from trap_dask import cluster

    clock = [0.0]
    monkeypatch.setattr(cluster.time, "monotonic", lambda: clock[0])
    scheduler = _Scheduler()
    scheduler.others = {"tcp://b:2": {"executing": 1}}
    watch = cluster.MemoryWatch(scheduler, "local")
    for _ in range(int(2 * watch.PAUSED_S / watch.LOOK_EVERY_S)):
        clock[0] += watch.LOOK_EVERY_S
        watch.check()
    scheduler.others = {"tcp://b:2": {}}
    with pytest.raises(ClusterError, match="^1 of 2 Dask workers have been paused at their memory limit for 30 s"):
        for _ in range(int(2 * watch.PAUSED_S / watch.LOOK_EVERY_S)):
            clock[0] += watch.LOOK_EVERY_S
            watch.check()


def test_workers_are_asked_for_one_file_per_directory_that_is_readable_here(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0broken.fits").symlink_to(tmp_path / "gone.fits")
    for name in ("a/x.fits", "a/y.fits", "b.fits"):
        (tmp_path / name).write_bytes(b"SIMPLE")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "only_broken.fits").symlink_to(tmp_path / "gone.fits")
    paths = [str(tmp_path / n) for n in ("a/0broken.fits", "a/y.fits", "a/x.fits", "b.fits", "c/only_broken.fits")]
    assert probe_paths(paths) == [str(tmp_path / "a" / "x.fits"), str(tmp_path / "b.fits")]


# -- writer placement -----------------------------------------------------------------------------
LOCAL = {"127.0.0.1", "localhost", "10.0.0.1"}


def test_sqlite_writer_is_pinned_to_a_worker_on_this_host():
    workers = {"tcp://10.0.0.9:4000": {}, "tcp://10.0.0.1:4001": {}, "tcp://10.0.0.1:4002": {WRITER_RESOURCE: 1}}
    assert writer_placement(workers, LOCAL, "sqlite") == {"workers": ["tcp://10.0.0.1:4002"],
                                                          "allow_other_workers": False}
    del workers["tcp://10.0.0.1:4002"]
    assert writer_placement(workers, LOCAL, "sqlite")["workers"] == ["tcp://10.0.0.1:4001"]


def test_sqlite_without_a_worker_on_this_host_is_refused():
    with pytest.raises(ClusterError, match="no Dask worker runs here.*--db_backend postgres"):
        writer_placement({"tcp://10.0.0.9:4000": {}}, LOCAL, "sqlite")


def test_postgres_writer_goes_anywhere_or_to_the_marked_worker():
    assert writer_placement({"tcp://10.0.0.9:4000": {}}, LOCAL, "postgres") == {}
    marked = {"tcp://10.0.0.9:4000": {}, "tcp://10.0.0.8:4000": {WRITER_RESOURCE: 1}}
    assert writer_placement(marked, LOCAL, "postgres") == {"resources": {WRITER_RESOURCE: 1}}


class _Rpc:
    """A stand-in for a client's rpc to its scheduler: it answers, or cannot be reached."""

    address = "tcp://10.0.0.1:8786"

    def __init__(self, answers: bool) -> None:
        self.answers = answers

    async def identity(self) -> dict:
        if not self.answers:
            raise OSError("Timed out trying to connect to tcp://10.0.0.1:8786")
        return {"type": "Scheduler"}


class _Client:
    """A stand-in for a distributed.Client as ClusterSession uses it after a failed call."""

    def __init__(self, status: str, answers: bool) -> None:
        self.status, self.scheduler = status, _Rpc(answers)
        self.timeouts: list[float] = []

    def get_events(self, topic: str) -> tuple:
        return ()

    def sync(self, func, callback_timeout: float | None = None):
        import asyncio

        self.timeouts.append(callback_timeout)
        return asyncio.run(func())


def test_a_scheduler_that_does_not_answer_is_lost_though_the_client_still_counts_it_connected():
    """A lost scheduler can fail the writer's calls before the client notices (its status still
    "running"): the run then took the writer for lost and started a new one. It now asks the
    scheduler once, and one that cannot answer is lost (and not asked again, for up to 5 s each
    time, as the run ends); a client that knows is not asked."""
    from trap_dask.cluster import SCHEDULER_ANSWER_S, ClusterSession

    answering = _Client("running", answers=True)
    assert ClusterSession(answering, "remote", 2, "").scheduler_lost() is None
    assert answering.timeouts == [SCHEDULER_ANSWER_S]
    silent = _Client("running", answers=False)
    session = ClusterSession(silent, "remote", 2, "")
    said = session.scheduler_lost()
    assert said.startswith("the connection to the Dask scheduler (tcp://10.0.0.1:8786) was lost: the run stops here")
    assert session.scheduler_lost() == said and silent.timeouts == [SCHEDULER_ANSWER_S]  # asked once, not at each look
    closed = _Client("closed", answers=True)
    assert ClusterSession(closed, "remote", 2, "").scheduler_lost() == said and closed.timeouts == []


def test_a_worker_imports_no_database_library_and_no_association():
    """What a worker process unpickles its tasks, checks and the writer's answers with (tasks, route,
    cluster, a CommitSummary with its astrometry) leaves out the writer's side: SQLAlchemy, the
    schema and the association's scipy.spatial, ~0.15 s and ~20 MB a worker."""
    import pickle

    from trap_dask.messages import Astrometry, CommitSummary

    answer = pickle.dumps(CommitSummary(0, False, 10, 2, 1, band=0, astrometry=Astrometry(12, 0.1, -0.2, 0.5, 0.4)))
    code = ("import pickle, sys, trap_dask.tasks, trap_dask.route, trap_dask.cluster; "
            "assert pickle.loads(sys.stdin.buffer.read()).astrometry.measured; "
            "print(sorted(m for m in ('sqlalchemy', 'trap_dask.db.schema', 'trap_dask.association', "
            "'trap_dask.astrometry', 'trap_dask.writer', 'scipy.spatial') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], input=answer, capture_output=True, check=True).stdout
    assert out.decode().strip() == "[]"



def test_the_pipeline_module_imports_no_extraction_and_no_association():
    """The layering of the modules: the run's settings, the export schema and the store name no
    extraction, association or merging module (those are imported where they are used: on the
    workers, by the writer, and by the header scan), so none of their scipy modules comes with them."""
    code = ("import sys, trap_dask.pipeline, trap_dask.cluster; "
            "print(sorted(m for m in ('trap_dask.extraction.extract', 'trap_dask.association', 'trap_dask.writer', "
            "'scipy.spatial', 'scipy.sparse', 'scipy.ndimage', 'scipy.fft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

# -- local cluster shape, addresses, configuration ------------------------------------------------
@pytest.mark.parametrize("values, expected", [
    ({}, (2, 4, True)),
    ({"nr_threads": 4}, (1, 4, False)),
    ({"nr_threads": 2}, (1, 2, False)),
    ({"nr_threads": 6}, (2, 3, True)),
    ({"nr_threads": 4, "n_workers": 4}, (4, 1, True)),
    ({"n_workers": 2}, (2, 4, True)),
    ({"nr_threads": 6, "threads_per_worker": 2}, (3, 2, True)),
    ({"n_workers": 3, "threads_per_worker": 2}, (3, 2, True)),
    ({"scheduler": "threads"}, (1, 8, False)),
    ({"scheduler": "threads", "nr_threads": 3}, (1, 3, False)),
])
def test_local_cluster_shape(values, expected):
    shape = local_shape(build_config(values, {}, None), cpu_count=8)
    assert (shape.n_workers, shape.threads_per_worker, shape.processes) == expected


@pytest.mark.parametrize("values", [{"nr_threads": 2}, {"n_workers": 1, "threads_per_worker": 1}],
                         ids=["threads", "processes"])
def test_a_local_clusters_loops_tick_and_check_memory_once_a_second(values):
    """The event loops of a local cluster, in this process or in worker processes, wake for Dask's
    own checks once a second, not every 20 ms (QUIET_LOOPS)."""
    import dask

    from trap_dask.cluster import start_client

    session = start_client(build_config(values, {}, None))
    try:
        assert session.cluster.scheduler.periodic_callbacks["tick"].callback_time == 1000

        def intervals(dask_worker):
            return {name: dask_worker.periodic_callbacks[name].callback_time for name in ("tick", "memory_monitor")}

        assert list(session.client.run(intervals).values()) == [{"tick": 1000, "memory_monitor": 1000}]
    finally:
        session.close()
    assert dask.config.get("distributed.admin.tick.interval") == "20ms"  # this process's own settings are back


def test_a_local_worker_process_starts_with_the_per_image_modules_frozen_out_of_garbage_collection():
    """A local worker process imports the per-image work as it starts (worker_start, Dask's preload)
    and freezes what it then holds, so its garbage collections no longer walk the imports."""
    import gc

    from trap_dask.cluster import start_client

    session = start_client(build_config({"n_workers": 1, "threads_per_worker": 1}, {}, None))
    try:
        def state():
            import sys

            return {"frozen": gc.get_freeze_count(), "collecting": gc.isenabled(),
                    "imported": all(m in sys.modules for m in ("trap_dask.tasks", "trap_dask.route"))}

        [seen] = session.client.run(state).values()
    finally:
        session.close()
    assert seen["imported"] and seen["collecting"]
    assert seen["frozen"] > 100_000  # distributed, astropy, scipy, trap_dask...


@pytest.mark.parametrize("collecting", [True, False])
def test_import_frozen_imports_without_collecting_then_freezes_and_restores_the_collector(collecting):
    code = f"""
import gc, sys
from trap_dask.worker_start import import_frozen
passes = []
gc.callbacks.append(lambda phase, info: passes.append(info["generation"]) if phase == "start" else None)
{"gc.enable()" if collecting else "gc.disable()"}
import_frozen(["astropy.io.fits", "trap_dask.tasks"])
print(len(passes), gc.get_freeze_count(), gc.isenabled(), "astropy.io.fits" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", out[1], str(collecting), "True"]
    assert int(out[1]) > 50_000


def test_scheduler_address_from_dask_config():
    import dask

    with dask.config.set({"scheduler-address": "tcp://10.1.2.3:8786"}):
        assert scheduler_address(build_config({}, {}, None)) == "tcp://10.1.2.3:8786"
        assert scheduler_address(build_config({"scheduler_address": "tcp://h:1"}, {}, None)) == "tcp://h:1"
        assert scheduler_address(build_config({"scheduler": "threads"}, {}, None)) is None
    assert scheduler_address(build_config({}, {"TRAP_SCHEDULER_ADDRESS": "tcp://h:2"}, None)) == "tcp://h:2"


def test_unreachable_scheduler_is_a_clear_error():
    import socket

    import dask

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(ClusterError, match=f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}"):
        start_client(build_config({"scheduler_address": f"tcp://127.0.0.1:{port}"}, {}, None))


@pytest.mark.parametrize("values, key", [
    ({"cluster": "lsf"}, "cluster"),
    ({"scheduler": "threads", "scheduler_address": "tcp://h:1"}, "scheduler"),
    ({"scheduler_address": "tcp://h:1", "cluster": "slurm"}, "cluster"),
    ({"scheduler_address": "tcp://h:1", "threads_per_worker": 2}, "threads_per_worker"),
    ({"cluster": "pbs", "memory_limit": "4GB"}, "memory_limit"),
    ({"memory_limit": "lots"}, "memory_limit"),
    ({"nr_threads": 4, "n_workers": 2, "threads_per_worker": 3}, "nr_threads"),
    ({"cluster_config": "jobqueue.yaml"}, "cluster_config"),
    ({"scheduler_address": "somewhere"}, "scheduler_address"),
    ({"scheduler_address": "tcp://127.0.0.1:99999"}, "scheduler_address"),  # no such port
    ({"worker_timeout": "0"}, "worker_timeout"),
    ({"worker_timeout": "inf"}, "worker_timeout"),
])
def test_impossible_cluster_settings_are_named(values, key):
    with pytest.raises(ConfigError, match=key):
        build_config(values, {}, None)


@pytest.mark.parametrize("path", sorted(CLUSTER_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    build_config({}, {}, path)
    assert read_toml(path)


# -- batch systems: the job scripts dask-jobqueue writes ------------------------------------------
@pytest.mark.parametrize("kind, expected", [
    ("slurm", ["#SBATCH -p", "#SBATCH -A", "#SBATCH --cpus-per-task=", "#SBATCH --mem=", "#SBATCH -t "]),
    ("pbs", ["#PBS -q", "#PBS -A", "#PBS -l select=1:ncpus=", "#PBS -l walltime="]),
])
def test_job_script_has_the_configured_options(kind, expected, tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)  # dask-jobqueue creates the log directory
    path = CLUSTER_DIR / "jobqueue.yaml"
    settings = yaml.safe_load(path.read_text())["jobqueue"][kind]
    with jobqueue_class(kind)(**jobqueue_options(kind, str(path))) as cluster:
        script = cluster.job_script()
    lines = script.splitlines()
    for prefix in expected:
        assert any(line.startswith(prefix) for line in lines), f"no {prefix!r} line in\n{script}"
    for value in (settings["name"], settings["queue"], settings["account"], settings["walltime"],
                  *settings["job-extra-directives"],
                  *settings["job-script-prologue"]):
        assert str(value) in script, f"{value!r} missing from\n{script}"
    threads = settings["cores"] // settings["processes"]
    assert f"--nthreads {threads}" in script and f"--nworkers {settings['processes']}" in script


def test_jobqueue_scale_follows_the_config():
    assert jobqueue_scale(build_config({"cluster": "slurm", "n_workers": 12}, {}, None)) == {"n": 12}
    assert jobqueue_scale(build_config({"cluster": "slurm", "nr_threads": 64}, {}, None)) == {"cores": 64}
    assert jobqueue_scale(build_config({"cluster": "pbs"}, {}, None)) == {"jobs": 1}


def test_jobqueue_file_without_the_section_is_refused(tmp_path):
    path = tmp_path / "jq.yaml"
    path.write_text("jobqueue:\n  slurm:\n    cores: 4\n")
    with pytest.raises(ClusterError, match="no 'jobqueue: pbs:' section"):
        jobqueue_options("pbs", str(path))
    path.write_bytes(b"\x00\xff")  # a binary file was a UnicodeDecodeError traceback
    with pytest.raises(ClusterError, match="is not a text \\(UTF-8\\) file"):
        jobqueue_options("pbs", str(path))


def test_a_scheduler_address_that_cannot_be_parsed_is_one_line():
    from trap_dask.cluster import start_client

    config = build_config({"scheduler_address": "tcp://[::1:8786"}, {}, None)
    with pytest.raises(ClusterError, match=r"cannot reach the Dask scheduler at tcp://\[::1:8786: invalid address"):
        start_client(config)


def test_unknown_jobqueue_setting_is_one_line_naming_it_before_anything_starts(tmp_path, capsys):
    path = tmp_path / "jq.yaml"
    path.write_text("jobqueue:\n  slurm:\n    cores: 4\n    memory: 8GB\n    proccesses: 2\n")
    (tmp_path / "image.fits").touch()
    db = tmp_path / "x.db"
    code = main(["run", "-i", str(tmp_path / "image.fits"), "--db-name", str(db), "--cluster", "slurm",
                 "--cluster_config", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"trap-dask: error: cluster_config {path}: unknown dask-jobqueue setting "
                                    "'proccesses' in 'jobqueue: slurm:' (did you mean 'processes'?)")
    assert not db.exists()


def test_no_worker_within_worker_timeout_is_a_clear_error(tmp_path):
    with dask_cluster(tmp_path) as bare, bare.client() as client:   # a scheduler without workers
        started = time.monotonic()
        with pytest.raises(ClusterError, match=rf"no Dask worker of the scheduler at {bare.address} joined within "
                                               r"worker_timeout = 1\.5 s.*--worker_timeout"):
            start_client(build_config({"scheduler_address": bare.address, "worker_timeout": 1.5}, {}, None))
        assert 1.5 <= time.monotonic() - started < 30
        clients = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.clients))
    assert clients == sorted([client.id, "fire-and-forget"]), "the run's client was left connected"


def test_a_run_whose_workers_never_come_leaves_no_new_database(survey, tmp_path):
    db = tmp_path / "never.db"
    with dask_cluster(tmp_path) as bare:   # a scheduler without workers
        with pytest.raises(PipelineError, match="worker_timeout"):
            run_pipeline(build_config(flags(survey, db, scheduler_address=bare.address, worker_timeout=1.0),
                                      {}, None))
    assert not db.exists()


def fake_slurm(tmp_path: Path, monkeypatch) -> None:
    """sbatch and scancel on PATH: a batch system that queues jobs which never start."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'Submitted batch job 4242'\n")
    (bin_dir / "scancel").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'cancelled'}\n")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_batch_jobs_are_cancelled_when_no_worker_joins_in_time(tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch)
    path = tmp_path / "jq.yaml"
    path.write_text("jobqueue:\n  slurm:\n    cores: 1\n    memory: 1GB\n    scheduler-options:\n"
                    "      dashboard_address: ':0'\n")
    with pytest.raises(ClusterError, match=r"no Dask worker of the slurm batch jobs joined within worker_timeout"):
        start_client(build_config({"cluster": "slurm", "cluster_config": str(path), "worker_timeout": 2}, {}, None))
    assert (tmp_path / "cancelled").read_text().split() == ["4242"], "the cluster was not closed"


@pytest.mark.parametrize("setting", ["memory: lots", "cores: many"])
def test_a_jobqueue_setting_of_the_wrong_kind_is_one_line(tmp_path, monkeypatch, setting):
    fake_slurm(tmp_path, monkeypatch)
    path = tmp_path / "jq.yaml"
    values = {"cores": "1", "memory": "1GB"} | dict([setting.split(": ")])
    path.write_text("jobqueue:\n  slurm:\n" + "".join(f"    {k}: {v}\n" for k, v in values.items()))
    with pytest.raises(ClusterError, match=rf"cluster_config {path}: dask-jobqueue cannot use these slurm settings"):
        start_client(build_config({"cluster": "slurm", "cluster_config": str(path)}, {}, None))
    assert not (tmp_path / "cancelled").exists()


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="a real SLURM is installed here")
def test_batch_cluster_without_its_submit_command_is_a_clear_error():
    with pytest.raises(ClusterError, match="sbatch.*not on PATH"):
        start_client(build_config({"cluster": "slurm"}, {}, None))


def test_a_local_cluster_of_far_more_threads_than_cores_is_warned_about(monkeypatch, caplog):
    """--nr_threads 500 on two cores took 92 s for 4 images (0.4 s with 2), without a word."""
    import logging

    from trap_dask import cluster

    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 2)
    logger = logging.getLogger("trap_dask")  # (a run before may have kept its messages from the root)
    logger.addHandler(caplog.handler)
    try:
        session = cluster.start_client(build_config({"scheduler": "threads", "nr_threads": 8}, {}, None))
        session.close()
    finally:
        logger.removeHandler(caplog.handler)
    assert any(r.levelno == logging.WARNING and "1 worker processes of 8 threads on 2 cores" in r.getMessage()
               for r in caplog.records)
