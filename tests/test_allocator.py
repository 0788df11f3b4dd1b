"""The run's process keeps freed image-sized arrays for the next ones (trap_dask.allocator)."""

import subprocess
import sys

import pytest

#: A worker thread allocates, fills and frees a 64 MiB array 8 times, as an extraction thread does
#: with an image's maps; prints the page faults of the last 7 (fresh pages, each zeroed by the
#: kernel: 64 MiB of them per array by default, none when the first one's memory is reused).
PROBE = """
import resource, sys, threading
import numpy as np
from trap_dask.allocator import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
faults = []
def images():
    for _ in range(8):
        maps = np.empty(64 << 20, np.uint8)
        maps.fill(1)
        del maps
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt)
thread = threading.Thread(target=images)
thread.start()
thread.join()
print(faults[-1] - faults[0])
"""


def page_faults(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                              check=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (mallopt) on Linux only")
def test_freed_arrays_are_reused_not_faulted_in_again():
    fresh, reused = page_faults("default"), page_faults("reuse")
    assert reused * 10 < fresh, (reused, fresh)


def test_the_run_command_sets_it(monkeypatch):
    from trap_dask import allocator, cli

    calls = []
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda: calls.append(True) or True)
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert calls == [True]
