"""Getting a Dask client: a local cluster, a running scheduler, or batch jobs through dask-jobqueue.

:func:`start_client` returns a :class:`ClusterSession` for every kind of cluster:

- ``--scheduler_address tcp://host:port`` (or ``DASK_SCHEDULER_ADDRESS``, or Dask's own
  ``scheduler-address`` setting) connects to a running ``dask scheduler`` and its workers;
- ``--cluster slurm|pbs`` starts a scheduler here and asks the batch system for workers with
  dask-jobqueue, configured by its own YAML (``--cluster_config`` or ``~/.config/dask/``);
- otherwise a LocalCluster shaped by ``--n_workers``, ``--threads_per_worker``,
  ``--memory_limit`` (worker processes for ``--scheduler distributed``, threads for ``threads``).

The writer actor owns the export database. A SQLite file must be written on this host (the
client's), so :meth:`ClusterSession.writer_options` pins the actor to a worker running here;
PostgreSQL works from any worker. A worker that advertises the resource ``trap_writer`` is
preferred. If the writer's worker dies, :meth:`ClusterSession.writer_lost` tells it from other
failures and says how to resume.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trap_dask.config import RESUME, Config
from trap_dask.cpu import numpy_environ

log = logging.getLogger("trap_dask")

#: Worker resource that marks the worker(s) allowed to hold the writer actor.
WRITER_RESOURCE = "trap_writer"
#: How many input directories are probed on every worker by :func:`check_inputs_readable`.
MAX_PROBED_DIRECTORIES = 64
#: What a run stopped by a fault of its cluster says of its database.
PREFIX_KEPT = "The database holds a consistent prefix (every committed image complete)"
WRITER_LOST_MESSAGE = (
    f"the Dask worker holding the writer ({{address}}) was lost: the run stops here.{{why}} {PREFIX_KEPT}; {RESUME}"
)
#: What a run whose workers lack memory should change, by the kind of cluster (ClusterSession.kind).
MORE_MEMORY = {
    "threads": "raise --memory_limit, or run fewer threads (--nr_threads)",
    "local": "raise --memory_limit, or run fewer threads per worker (--threads_per_worker)",
    "remote": "start the workers with a larger --memory-limit, or fewer threads each (--nthreads)",
    "slurm": "give the batch jobs more memory, or fewer cores each (cluster_config)",
    "pbs": "give the batch jobs more memory, or fewer cores each (cluster_config)",
}
STOPPED_FOR_MEMORY = f"The run stops here. {PREFIX_KEPT}; {RESUME} once the workers have more memory"
SCHEDULER_LOST_MESSAGE = (
    f"the connection to the Dask scheduler ({{address}}) was lost: the run stops here. {PREFIX_KEPT}; "
    f"once a scheduler is up again, {RESUME}"
)


#: Worker resource counting extraction slots: a local worker has one thread more than slots, so
#: the forced fits of the image at the head of the queue never wait behind an extraction.
EXTRACT_RESOURCE = "trap_extract"
#: What a local worker process runs as it starts: it imports the modules of the per-image work, so
#: that the first tasks start at once, and freezes them out of its garbage collections.
WORKER_PRELOAD = ["trap_dask.worker_start"]
#: Dask config key that keeps Dask's statistical profiler on in a local cluster's workers: off, it
#: no longer samples every worker thread every 10 ms (a few % of the CPU); ``trap-dask bench
#: --report`` turns it on for its report.
PROFILE_KEY = "trap-dask.profile"
#: Dask config key (or ``--dashboard``) that starts the dashboard of a local cluster: importing
#: bokeh and serving it costs about 0.8 CPU-s of start-up, so it is off unless asked for.
DASHBOARD_KEY = "trap-dask.dashboard"
#: Dask starts worker processes with MALLOC_TRIM_THRESHOLD_=65536, which also turns off glibc's
#: adaptive mmap threshold: every image-sized array is then a fresh mmap whose pages the kernel
#: zeroes on first touch (extraction 57% slower, a third of the CPU time in the kernel). Unset, the
#: workers reuse freed image buffers; memory stays bounded by one image's working set per thread.
KEEP_FREED_MEMORY = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
#: Dask's periodic work in a local cluster made rarer: each event loop's tick (every 20 ms; it only
#: times the loop, for "event loop unresponsive" warnings) and each worker's memory check (every
#: 100 ms) wake the loop's thread, which then takes the GIL from an extraction thread. Once a
#: second: long500 (500 images of 1024^2), four alternating runs each, 25.1 -> 23.8 s, 38.1 -> 36.1
#: CPU-s (benchmarks/RESULTS.md, issue 15 round 10). A running cluster's settings are its own.
QUIET_LOOPS = {"distributed.admin.tick.interval": "1s", "distributed.worker.memory.monitor-interval": "1s"}


#: Seconds the scheduler has to answer, once a call failed, before the run takes it for lost.
SCHEDULER_ANSWER_S = 5.0

#: Extraction threads of a local cluster beyond this many per core get a warning.
OVERSUBSCRIBED = 2


class ClusterError(RuntimeError):
    """The cluster cannot be used for this run; the message is user-facing."""


@dataclass
class MemoryWatch:
    """Whether a run's workers lack memory, from what the scheduler knows: one paused at its memory
    limit while nothing runs anywhere, or workers restarted by their nannies for exceeding it."""

    client: Any  #: distributed.Client
    kind: str  #: the cluster's kind (ClusterSession.kind), for the advice
    since: float = field(init=False)  #: the scheduler's stamp of its last memory restart before the run
    looked: float = field(default=-math.inf, init=False)  #: time.monotonic() of the last look
    paused_since: float | None = field(default=None, init=False)  #: since when a paused worker holds the run
    restarts_at_progress: int | None = field(default=None, init=False)  #: restarts when the run last went on

    #: Seconds a worker may stay paused at its memory limit with no task running anywhere before the
    #: run stops: Dask resumes a paused worker only once its memory drops, which an idle one's does not.
    PAUSED_S = 30.0
    #: Memory restarts of workers with no image committed in between before the run stops: workers
    #: that die before they finish a task (the writer's start, an image) would be restarted for ever.
    RESTARTS_WITHOUT_PROGRESS = 10
    #: Seconds between looks (two calls to the scheduler each) while the run waits for a result.
    LOOK_EVERY_S = 2.0

    TOPIC = "worker-restart-memory"  #: what a nanny records when it restarts its worker for memory

    def __post_init__(self) -> None:
        # the scheduler's own stamps, so that its clock and this machine's need not agree
        self.since = max((stamp for stamp, _ in self._events()), default=-math.inf)

    def _events(self) -> tuple:
        try:
            return self.client.get_events(self.TOPIC)
        except Exception:  # noqa: BLE001 - a scheduler that cannot be asked: nothing to add
            return ()

    def restarts(self, workers: str = "") -> list[dict]:
        """The nannies' records (worker, pid, rss in bytes) of the workers restarted for exceeding
        their memory limit during the run; of ``workers`` only (addresses, comma-separated) if given."""
        events = [event for stamp, event in self._events() if stamp > self.since]
        return [event for event in events if event.get("worker") in workers.split(", ")] if workers else events

    def sentence(self, workers: str = "") -> str | None:
        """One sentence on the memory restarts (of ``workers`` only if given: the writer's, whose
        loss is then a matter of memory), else None."""
        restarts = self.restarts(workers)
        if not restarts:
            return None
        whose = ("the writer's worker {} time(s) for exceeding its" if workers
                 else "workers {} time(s) for exceeding their")
        return (f"Dask restarted {whose.format(len(restarts))} memory limit ({self._largest(restarts)}): "
                f"{self._advice()}")

    def _advice(self) -> str:
        return f"each needs more memory for these images: {MORE_MEMORY[self.kind]}"

    @staticmethod
    def _largest(restarts: list[dict]) -> str:
        return f"{max(event.get('rss', 0) for event in restarts) / 2**20:.0f} MiB in use at most"

    def progressed(self) -> None:
        """The run committed an image: memory restarts and pauses count from here."""
        self.restarts_at_progress = None
        self.paused_since = None

    def check(self) -> None:
        """ClusterError once a worker has been paused at its memory limit with nothing running on
        any worker for PAUSED_S (seen at each look, without progress in between), or the workers
        were restarted RESTARTS_WITHOUT_PROGRESS times for memory since the last progress: the run
        would wait for ever. Call it while waiting for a result; it looks every LOOK_EVERY_S."""
        now = time.monotonic()
        if now - self.looked < self.LOOK_EVERY_S:
            return
        if now - self.looked > 3 * self.LOOK_EVERY_S:  # not looked at for a while: pauses count from now
            self.paused_since = None
        self.looked = now
        restarts = self.restarts()
        if self.restarts_at_progress is None:
            self.restarts_at_progress = len(restarts)
        if len(restarts) - self.restarts_at_progress >= self.RESTARTS_WITHOUT_PROGRESS:
            raise ClusterError(f"Dask restarted workers {self.RESTARTS_WITHOUT_PROGRESS} times in a row for exceeding "
                               f"their memory limit ({self._largest(restarts)}), and the run could not go on: "
                               f"{self._advice()}. {STOPPED_FOR_MEMORY}")
        workers = list(self.client.scheduler_info(n_workers=-1)["workers"].values())
        paused = [w for w in workers if w.get("status") == "paused"]
        # the work of a paused worker waits for it (an image's tasks are bound to where its pixels are),
        # so the others may idle: the run is held once nothing runs anywhere
        if not paused or any(w["metrics"]["task_counts"].get("executing") for w in workers):
            self.paused_since = None
            return
        self.paused_since = self.paused_since or now
        if now - self.paused_since >= self.PAUSED_S:
            in_use = max(w["metrics"]["memory"] for w in paused) / 2**20
            limit = min(w["memory_limit"] for w in paused) / 2**20
            raise ClusterError(f"{len(paused)} of {len(workers)} Dask workers have been paused at their memory limit "
                               f"for {self.PAUSED_S:g} s, with nothing running anywhere ({in_use:.0f} MiB in use of "
                               f"{limit:.0f} MiB): {self._advice()}. {STOPPED_FOR_MEMORY}")


@dataclass
class ClusterSession:
    """A connected Dask client and what the pipeline needs to know about its cluster."""

    client: Any  #: distributed.Client
    kind: str  #: 'threads', 'local', 'remote', 'slurm' or 'pbs'
    n_threads: int  #: worker threads expected, to size the window of images in flight
    dashboard: str  #: one line for the log, e.g. "dashboard: http://10.0.0.1:8787/status"
    cluster: Any = field(default=None, repr=False)  #: the cluster started here (None: remote)
    writer: Any = field(default=None, repr=False)  #: the writer actor's future, once started
    writer_address: str = ""  #: the worker holding the writer
    extract_resources: dict[str, int] | None = None  #: ``client.submit`` resources of extraction tasks
    scheduler_address: str = field(init=False)  #: the client's scheduler (the client forgets it when it loses it)
    lost_scheduler: bool = field(default=False, init=False)  #: found lost: the run stops, no need to ask again
    memory: MemoryWatch = field(init=False)  #: whether the workers lack memory

    def __post_init__(self) -> None:
        self.scheduler_address = self.client.scheduler.address
        self.memory = MemoryWatch(self.client, self.kind)

    @property
    def pin_writer(self) -> bool:
        """Whether workers may run on other hosts, so the writer's placement matters."""
        return self.kind not in ("threads", "local")

    def writer_options(self, backend: str) -> dict[str, Any]:
        """``client.submit(Writer, ..., actor=True, **options)`` keyword arguments placing the writer."""
        if not self.pin_writer:
            return {}
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        return writer_placement(
            {address: w.get("resources", {}) for address, w in workers.items()}, host_addresses(), backend,
        )

    def submit_writer(self, cls: type, *args: Any, backend: str, **kwargs: Any) -> None:
        """Start creating the writer actor ``cls(*args, **kwargs)`` where the database can be written
        (see writer_options)."""
        # pure=False: a new key each time, so that a writer started after losing one is a new actor
        self.writer = self.client.submit(cls, *args, actor=True, pure=False, **kwargs, **self.writer_options(backend))

    def writer_actor(self) -> Any:
        """The writer actor submitted by submit_writer, once it is ready (ClusterError if the workers
        lack memory, see MemoryWatch.check)."""
        while True:
            try:
                actor = self.writer.result(timeout=1.0)
                break
            except TimeoutError:
                self.memory.check()
        self.writer_address = ", ".join(self.client.who_has(self.writer).get(self.writer.key, ()))
        return actor

    def ready_writer(self) -> Any:
        """The writer actor if it was submitted and has started, else None (for cleaning up)."""
        if self.writer is None or self.writer.status != "finished":
            return None
        return self.writer.result()

    def abandon_writer(self) -> None:
        """Tell every worker that the writer is lost: the tasks calling it there end at once
        (:func:`trap_dask.route.abandon_writer`) instead of retrying the connection to its gone
        worker for Dask's connect timeout (30 s), holding threads that the run's end or a new
        writer waits for. Best effort: a cluster that cannot be asked only waits that long."""
        from trap_dask.route import abandon_writer

        try:
            self.client.run(abandon_writer, self.writer.key, on_error="ignore")
        except Exception as exc:  # noqa: BLE001 - the run goes on to report the loss itself
            log.debug("could not tell the workers that the writer is lost: %s", exc)

    def scheduler_lost(self) -> str | None:
        """After a call raised: the user-facing message if the client has lost its scheduler, else
        None. (Dask tries to reconnect for ``distributed.comm.timeouts.connect``, 30 s, before its
        futures fail; no writer can be started again then.) A scheduler the client still counts
        as connected is asked once (SCHEDULER_ANSWER_S): its loss could fail the writer's calls
        before the client noticed, and the run then started a new writer (seen once in a full
        test run). Once lost, it is not asked again (the run's end asks too)."""
        if not self.lost_scheduler and self.client.status == "running" and self._scheduler_answers():
            return None
        self.lost_scheduler = True
        return SCHEDULER_LOST_MESSAGE.format(address=self.scheduler_address)

    def _scheduler_answers(self) -> bool:
        try:
            self.client.sync(self.client.scheduler.identity, callback_timeout=SCHEDULER_ANSWER_S)
        except Exception:  # noqa: BLE001 - whatever keeps it from answering
            return False
        return True

    def writer_lost(self, timeout: float = 2.0) -> str | None:
        """After an actor call raised: the user-facing message if the writer's worker is gone, else None.

        Dask marks the actor's future as erred when its worker leaves; the scheduler may need a
        moment to notice, so this waits up to ``timeout`` s before saying the writer is fine.
        """
        if self.writer is None:
            return None
        deadline = time.monotonic() + timeout
        while self.writer.status == "finished" and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.writer.status == "finished":
            return None
        if self.writer.status == "error":  # lost, or its __init__ raised (that error is the one to show)
            error = self.writer.exception()
            if not (isinstance(error, RuntimeError) and "lost" in str(error)):
                return None
        memory = self.memory.sentence(self.writer_address)
        return WRITER_LOST_MESSAGE.format(address=self.writer_address or "address unknown",
                                          why=f" {memory}." if memory else "")

    def close(self) -> None:
        """Close the client, and the cluster if this session started it (cancels its batch jobs).
        A client that lost its scheduler tries to reconnect, then closes itself: that is waited for
        (closing it meanwhile cancelled its own closing, and Dask logged the tracebacks)."""
        import dask
        from dask.utils import parse_timedelta

        deadline = time.monotonic() + 2 * parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
        while self.client.status in ("connecting", "closing") and time.monotonic() < deadline:
            time.sleep(0.05)
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


@dataclass(frozen=True)
class LocalShape:
    """How a LocalCluster is laid out."""

    n_workers: int
    threads_per_worker: int
    processes: bool


#: Extraction threads a local cluster runs in this one process (with the writer) before it starts
#: worker processes of this many threads each. On 2 cores (benchmarks/RESULTS.md, issue 15) one
#: process of 2 threads took 0.89 CPU-s per 2048^2 image and 637 MB at its peak, against 1.08 CPU-s
#: and 1170 MB for two single-threaded worker processes (every process held ~150 MB of imports,
#: and each image crossed processes twice); the extraction releases the GIL in numpy and scipy for
#: most of its time, so a few threads share one process well.
THREADS_PER_PROCESS = 4


def local_shape(config: Config, cpu_count: int) -> LocalShape:
    """Workers and threads of the local cluster, from nr_threads (default: cpu_count) and the overrides.

    Without --n_workers or --threads_per_worker: up to THREADS_PER_PROCESS threads in this process,
    else worker processes of at most THREADS_PER_PROCESS threads each.
    """
    total = config.nr_threads or cpu_count
    if config.scheduler == "threads":
        return LocalShape(1, config.threads_per_worker or total, processes=False)
    if not config.n_workers and not config.threads_per_worker:
        if total <= THREADS_PER_PROCESS:
            return LocalShape(1, total, processes=False)
        n = -(-total // THREADS_PER_PROCESS)
        return LocalShape(n, -(-total // n), processes=True)
    if config.n_workers and not config.threads_per_worker:
        per = max(1, total // config.n_workers)
    else:
        per = config.threads_per_worker or 1
    return LocalShape(config.n_workers or max(1, total // per), per, processes=True)


def scheduler_address(config: Config) -> str | None:
    """The running scheduler to use: the parameter, else Dask's ``scheduler-address`` setting."""
    if config.scheduler_address:
        return config.scheduler_address
    if config.scheduler != "distributed" or config.cluster != "local":
        return None
    import dask

    return dask.config.get("scheduler-address", None) or None


def start_client(config: Config) -> ClusterSession:
    """Connect to or start the Dask cluster the config asks for; the caller closes the session."""
    address = scheduler_address(config)
    if address:
        return _connect(address, config.worker_timeout)
    if config.cluster != "local":
        return _start_jobqueue(config)
    return _start_local(config)


def _start_local(config: Config) -> ClusterSession:
    import dask
    from distributed import Client, LocalCluster

    cores = os.cpu_count() or 1
    shape = local_shape(config, cores)
    if shape.n_workers * shape.threads_per_worker > OVERSUBSCRIBED * cores:
        log.warning("%d worker processes of %d threads on %d cores: threads beyond the cores only take turns "
                    "(and memory); --nr_threads %d is about the fastest", shape.n_workers, shape.threads_per_worker,
                    cores, cores)
    slots = {EXTRACT_RESOURCE: shape.threads_per_worker}
    dashboard = dask.config.get(DASHBOARD_KEY, False)
    # Ctrl-C reaches the whole process group: only this process may act on it
    profile = {"distributed.worker.profile.enabled": bool(dask.config.get(PROFILE_KEY, False))}
    # worker processes load numpy as this process did (trap_dask.cpu)
    numpy_dispatch = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in numpy_environ().items()}
    with _stop_signals_ignored(), dask.config.set({**KEEP_FREED_MEMORY, **QUIET_LOOPS, **profile, **numpy_dispatch}):
        cluster = LocalCluster(
            n_workers=shape.n_workers, threads_per_worker=shape.threads_per_worker + 1, processes=shape.processes,
            resources=slots, preload=WORKER_PRELOAD if shape.processes else None,
            memory_limit=config.memory_limit or "auto", dashboard_address=":0", silence_logs=logging.WARNING,
            scheduler_kwargs={"dashboard": bool(dashboard)},  # its HTTP server (health, metrics) on a free port
        )
    with ExitStack() as on_failure:
        on_failure.callback(cluster.close)
        client = Client(cluster)
        kind = "local" if shape.processes else "threads"
        line = dashboard_line(client) if dashboard else "dashboard: off (--dashboard starts it)"
        session = ClusterSession(client, kind, shape.n_workers * shape.threads_per_worker, line,
                                 cluster, extract_resources={EXTRACT_RESOURCE: 1})
        on_failure.pop_all()
    return session


#: Signals that stop a run: Ctrl-C, and what SLURM and PBS send a job before they kill it.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """Worker processes started inside ignore SIGINT and SIGTERM (they inherit it), so Ctrl-C or a
    batch system's SIGTERM to the whole process group stops the client alone, which then closes the
    writer and the workers in order."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _connect(address: str, worker_timeout: float) -> ClusterSession:
    from distributed import Client

    try:
        client = Client(address)
    except (OSError, TimeoutError, ValueError) as exc:  # ValueError: an address it cannot parse
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    with ExitStack() as on_failure:
        on_failure.callback(client.close)
        _wait_for_first_worker(client, f"the scheduler at {address}", worker_timeout)
        session = ClusterSession(client, "remote", sum(client.nthreads().values()), dashboard_line(client))
        on_failure.pop_all()
    return session


def _start_jobqueue(config: Config) -> ClusterSession:
    from distributed import Client

    cls, options = jobqueue_settings(config)
    with ExitStack() as on_failure:  # closing the cluster cancels the jobs it submitted
        try:
            cluster = cls(**options)
        except (TypeError, ValueError, ArithmeticError) as exc:  # a value of the wrong kind (memory: lots; cores: 0)
            source = f"cluster_config {config.cluster_config}" if config.cluster_config else "the Dask configuration"
            raise ClusterError(f"{source}: dask-jobqueue cannot use these {config.cluster} settings: {exc}") from None
        on_failure.callback(cluster.close)
        cluster.scale(**jobqueue_scale(config))
        client = Client(cluster)
        on_failure.callback(client.close)
        log.info("%s: %d worker processes requested in batch jobs", config.cluster, len(cluster.plan))
        _wait_for_first_worker(client, f"the {config.cluster} batch jobs", config.worker_timeout)
        per_worker = max(client.nthreads().values())
        session = ClusterSession(client, config.cluster, per_worker * len(cluster.plan), dashboard_line(client),
                                 cluster)
        on_failure.pop_all()
    return session


def _wait_for_first_worker(client, where: str, timeout: float) -> None:
    """Wait up to ``timeout`` s for a worker to join; ClusterError naming worker_timeout if none does."""
    if client.nthreads():
        return
    log.info("waiting up to %g s (worker_timeout) for the first Dask worker of %s ...", timeout, where)
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise ClusterError(
            f"no Dask worker of {where} joined within worker_timeout = {timeout:g} s: check that the workers "
            "start and can reach the scheduler, or give them longer with --worker_timeout"
        ) from None


def check_cluster(config: Config) -> None:
    """Check the cluster settings that can be checked before anything starts; ClusterError if wrong."""
    if config.cluster != "local":
        jobqueue_settings(config)


def jobqueue_settings(config: Config) -> tuple[type, dict[str, Any]]:
    """The dask-jobqueue cluster class for ``config.cluster`` and its checked keyword arguments.

    ClusterError for a cluster_config that cannot be used or a submit command not on PATH.
    """
    cls = jobqueue_class(config.cluster)
    options = jobqueue_options(config.cluster, config.cluster_config)
    submit = cls.job_cls.submit_command.split()[0]
    if shutil.which(submit) is None:
        raise ClusterError(f"--cluster {config.cluster} submits jobs with `{submit}`, which is not on PATH: "
                           "run trap-dask on a login node of the batch system")
    return cls, options


def jobqueue_class(kind: str) -> type:
    """The dask-jobqueue cluster class for 'slurm' or 'pbs'."""
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterError(f"--cluster {kind} needs dask-jobqueue: pip install 'trap-dask[cluster]'") from None

    return {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]


def jobqueue_parameters(kind: str) -> frozenset[str]:
    """Every keyword argument the dask-jobqueue cluster class for ``kind`` takes: its own and its jobs'."""
    from dask_jobqueue.core import Job

    cls = jobqueue_class(kind)
    return frozenset(
        p.name for f in (cls, cls.job_cls, Job) for p in inspect.signature(f).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def jobqueue_options(kind: str, path: str | None) -> dict[str, Any]:
    """Keyword arguments for the dask-jobqueue cluster from the ``jobqueue: <kind>:`` section of a YAML file.

    Keys are dask-jobqueue's configuration keys (``job-extra-directives``, ``name`` for the job name);
    a key its cluster class does not take is a ClusterError naming it.

    Without a file, none: dask-jobqueue then reads Dask's own configuration
    (``~/.config/dask/jobqueue.yaml``, ``DASK_JOBQUEUE__SLURM__QUEUE=...``).
    """
    if path is None:
        return {}
    import yaml

    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ClusterError(f"cannot read cluster_config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ClusterError(f"cluster_config {path} is not a text (UTF-8) file") from None
    except yaml.YAMLError as exc:
        raise ClusterError(f"cluster_config {path} is not valid YAML: {exc}") from None
    section = (document.get("jobqueue") or {}).get(kind)
    if not isinstance(section, dict):
        raise ClusterError(f"cluster_config {path} has no 'jobqueue: {kind}:' section")
    options = {("job_name" if key == "name" else str(key).replace("-", "_")): key for key in section}
    known = jobqueue_parameters(kind)
    for name, key in options.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise ClusterError(f"cluster_config {path}: unknown dask-jobqueue setting {key!r} in "
                               f"'jobqueue: {kind}:'{hint}")
    return {name: section[key] for name, key in options.items()}


def jobqueue_scale(config: Config) -> dict[str, int]:
    """``cluster.scale`` arguments: n_workers worker processes, else nr_threads cores, else one job."""
    if config.n_workers:
        return {"n": config.n_workers}
    if config.nr_threads:
        return {"cores": config.nr_threads}
    return {"jobs": 1}


def dashboard_line(client) -> str:
    """One log line with the dashboard address, or why there is none."""
    try:
        link = client.dashboard_link
    except KeyError:
        link = None
    if not link:
        return "dashboard: not available (install bokeh where the Dask scheduler runs)"
    return f"dashboard: {link}"


# -- writer placement ---------------------------------------------------------------------------
def host_addresses() -> frozenset[str]:
    """Every IP address and name of this host (loopback included)."""
    import psutil

    names = {socket.gethostname(), socket.getfqdn(), "localhost"}
    ips = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
           if a.family in (socket.AF_INET, socket.AF_INET6)}
    return frozenset(names | ips)


def worker_host(address: str) -> str:
    """The host part of a Dask address ('tcp://10.0.0.5:40000' -> '10.0.0.5'; inproc: 'localhost')."""
    from distributed.comm import get_address_host

    return "localhost" if address.startswith("inproc://") else get_address_host(address)


def writer_placement(
    workers: Mapping[str, Mapping[str, float]], local: Iterable[str], backend: str
) -> dict[str, Any]:
    """``client.submit`` options for the writer actor.

    ``workers`` maps each worker address to its resources, ``local`` holds this host's names and
    addresses. SQLite: a worker on this host (one with the ``trap_writer`` resource first), or
    ClusterError. PostgreSQL: a worker with the resource if any, else wherever the scheduler likes.
    """
    from trap_dask.db.backends import backend_class  # here: workers run this module's checks without a database

    marked = sorted(a for a, resources in workers.items() if resources.get(WRITER_RESOURCE, 0) > 0)
    if not backend_class(backend).writer_on_this_host:
        return {"resources": {WRITER_RESOURCE: 1}} if marked else {}
    here = set(local)
    on_host = [a for a in sorted(workers, key=lambda a: a not in marked) if worker_host(a) in here]
    if not on_host:
        raise ClusterError(
            "the SQLite export database is written by the writer actor, which must run on this host, "
            f"but no Dask worker runs here (workers: {', '.join(sorted(workers)) or 'none'}). Start one "
            f"here (`dask worker <scheduler> --nworkers 1 --resources {WRITER_RESOURCE}=1`) or use "
            "--db_backend postgres, which works from any worker"
        )
    return {"workers": [on_host[0]], "allow_other_workers": False}


# -- inputs ---------------------------------------------------------------------------------------
def unreadable(paths: Iterable[str]) -> list[tuple[str, str]]:
    """(path, reason) for each file this process cannot open and read a byte of."""
    failures = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            failures.append((path, exc.strerror or str(exc)))
    return failures


def probe_paths(paths: Iterable[str], limit: int = MAX_PROBED_DIRECTORIES) -> list[str]:
    """The first file of each input directory that this process can read (at most ``limit``):
    what every worker must see too. Files unreadable here are left to the header scan, which
    records them as rejected images."""
    first: dict[str, str] = {}
    for path in sorted(paths):
        directory = os.path.dirname(path)
        if directory not in first and os.path.isfile(path) and os.access(path, os.R_OK):
            first[directory] = path
    return list(first.values())[:limit]


def check_inputs_readable(client, paths: Iterable[str]) -> None:
    """Check on every worker that it can read the input images; ClusterError names who cannot read what.

    One file per input directory is opened on each worker (a missing mount or permission shows
    on the first file). A single unreadable file is still found by the header scan and recorded
    as a rejected image.
    """
    check_readable_on_workers(client, probe_paths(paths))


def check_readable_on_workers(client, probe: list[str]) -> None:
    """Open each of ``probe`` on every worker; ClusterError names who cannot read what. A worker
    that is gone once it has answered with a connection error (restarted for memory, its node
    lost) says nothing of its files or its Python; the run deals with lost workers."""
    results = client.run(unreadable, probe, on_error="return")
    failed = any(isinstance(result, OSError) for result in results.values())
    present = client.scheduler_info(n_workers=-1)["workers"] if failed else results
    lines = []
    for worker, result in sorted(results.items()):
        if isinstance(result, OSError) and worker not in present:
            log.debug("worker %s was lost while checking that it can read the inputs: %s", worker, result)
            continue
        if isinstance(result, BaseException):
            lines.append(f"  worker {worker}: cannot run trap-dask ({type(result).__name__}: {result}); "
                         "install trap-dask in the workers' Python environment")
            continue
        lines.extend(f"  worker {worker} cannot read {path}: {reason}" for path, reason in result)
    if lines:
        shown = lines[:20] + ([f"  ... and {len(lines) - 20} more"] if len(lines) > 20 else [])
        raise ClusterError("input images are not readable on every Dask worker (workers need the same "
                           "paths, e.g. a shared filesystem):\n" + "\n".join(shown))

