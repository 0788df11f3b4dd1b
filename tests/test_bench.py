"""`trap-dask bench`: a tiny simulated survey on a local cluster, on a running scheduler, a scaling
table and Dask's performance report."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from trap_dask.bench import ROWS
from trap_dask.cli import main

TINY = ["-i", "3", "--size", "128", "--sources", "6", "--detection_threshold", "5"]


def table(text: str) -> dict[str, list[float]]:
    """The bench table's rows: label -> the numbers of each column."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 1 and cells[0] and re.fullmatch(r"-?[\d.]+", cells[1]):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def check_sane(rows: dict[str, list[float]], column: int = 0) -> None:
    value = {label: numbers[column] for label, numbers in rows.items()}
    assert value["images"] == 3
    assert 0 < value["images/s (whole run)"] <= value["images/s (after start-up)"]
    assert 0 < value["start-up: launch -> first image submitted, s"] < value["wall time, s"]
    for stage in ("read", "background", "extract"):
        assert value[f"{stage}, ms/image (worker)"] > 0, stage
    assert value["associate, ms/image (writer)"] > 0
    assert value["commit, ms/image (writer, its own thread or process)"] > 0
    assert value["waiting for a commit, ms/image (writer)"] >= 0
    assert 0 < value["writer busy, % of the wall time"] < 100
    label = {key: text for text, key, _ in ROWS}
    assert value[label["cpu"]] > 0
    in_stages = value[label["stage_cpu_pct"]]
    assert 0 < in_stages <= 100 and in_stages + value[label["overhead_pct"]] == 100
    assert 0 < value["worker utilisation, % of the extraction threads"] <= 101  # of its stages alone


def test_bench_on_the_local_cluster_prints_the_table(capsys):
    assert main(["bench", *TINY, "--nr_threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 images of 128x128 pixels" in out
    check_sane(table(out))
    assert table(out)["extraction threads"] == [2]


def test_bench_on_a_running_scheduler(capsys):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        assert main(["bench", *TINY, "--scheduler_address", cluster.scheduler_address]) == 0
        assert main(["bench", *TINY, "--scheduler_address", cluster.scheduler_address, "--workers", "1"]) == 2
    rows = table(capsys.readouterr().out)
    check_sane(rows)
    assert rows["extraction threads"] == [2]


def test_bench_scaling_table_and_performance_report(tmp_path, capsys):
    report = tmp_path / "report.html"
    assert main(["bench", *TINY, "--scheduler", "threads", "--workers", "1", "2", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\|\s+\|\s+1 threads \|\s+2 threads \|", out), out
    rows = table(out)
    assert rows["extraction threads"] == [1, 2]
    for column in (0, 1):
        check_sane(rows, column)
    for count in (1, 2):
        written = tmp_path / f"report-w{count}.html"
        assert written.stat().st_size > 10_000 and "Dask Performance Report" in written.read_text()


@pytest.mark.parametrize("processes", [False, True])
def test_the_cluster_cpu_counts_each_process_once(processes):
    """A local cluster's threads share this process (one entry, whatever the number of workers);
    worker processes are each their own entry, beside this process (which runs the scheduler)."""
    from distributed import Client, LocalCluster

    from trap_dask.bench import cluster_cpu

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        before = cluster_cpu(client)
        until = time.process_time() + 0.2
        while time.process_time() < until:  # 0.2 s of this process's CPU
            pass
        after = cluster_cpu(client)
    assert len(after) == (3 if processes else 1) and (socket.gethostname(), os.getpid()) in after
    # read in clock ticks (10 ms): at least 0.19 s of it, whatever the rounding of the two readings
    assert after[socket.gethostname(), os.getpid()] - before[socket.gethostname(), os.getpid()] >= 0.185


@pytest.mark.parametrize("flags, said", [
    (["--images", "0"], "--images must be >= 1"), (["--size", "10"], "--size >= 64"),
    (["--size", "128", "--sources", "100000"], "100000 sources do not fit in 128x128 pixels"),  # filled memory
    (["--size", "128", "--sources", "20"], "20 sources do not fit"),  # the simulator's own traceback
    (["--images", "1", "--size", "512", "--sources", "100"], "transients need at least two epochs"),
    (["--workers", "0"], "--workers takes counts >= 1"), (["--workers", "-2"], "--workers takes counts >= 1"),
    (["--report", "/proc/no/report.html"], "--report /proc/no/report.html: cannot write a file there"),
])
def test_bench_refuses_what_it_cannot_run_before_it_starts(capsys, flags, said):
    """Flags the benchmark cannot run are refused at once (an unwritable --report failed after the
    whole run; too many sources filled the memory; --workers -2 was a traceback)."""
    assert main(["bench", *flags]) == 2 and said in capsys.readouterr().err


def test_bench_never_overwrites_a_directory_of_other_files(tmp_path, capsys):
    """--survey_dir pointing at somebody's images is refused, untouched; a bench survey is reused."""
    images = tmp_path / "my_images"
    images.mkdir()
    (images / "epoch0.fits").write_bytes(b"not a bench survey")
    assert main(["bench", *TINY, "--survey_dir", str(images)]) == 2
    assert "not a bench survey" in capsys.readouterr().err
    assert [p.name for p in images.iterdir()] == ["epoch0.fits"]
    assert (images / "epoch0.fits").read_bytes() == b"not a bench survey"

    survey = tmp_path / "bench_survey"
    for _ in range(2):
        assert main(["bench", *TINY, "--scheduler", "threads", "--survey_dir", str(survey)]) == 0
    assert ", reused)" in capsys.readouterr().out


def test_bench_stopped_by_sigterm_says_so_and_leaves_nothing(tmp_path):
    """What a batch system sends before it kills a job: one line, exit status 128 + SIGTERM, no
    traceback, and its temporary directory gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    # 160 images: ~4 s of run on a fast 2-core VM (40 took 1.4 s there and could end before the signal)
    proc = subprocess.Popen([sys.executable, "-m", "trap_dask.cli", "bench", "-i", "160", "--size", "512",
                             "--sources", "60", "--nr_threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("trap-dask-bench-*/*.db")) and time.monotonic() < deadline:
        time.sleep(0.05)  # the survey is simulated; the run has made its database
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "trap-dask bench: terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert not list(tmp_path.glob("trap-dask-bench-*"))
