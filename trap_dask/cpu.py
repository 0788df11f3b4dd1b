"""Numpy's CPU dispatch in the processes of a run: no AVX-512 sorts where they are slow.

numpy sorts (``np.sort``, ``argsort``, ``partition``) with x86-simd-sort. Its AVX-512 kernels store
with ``vpcompress`` to memory, which AMD's family 19h cores (Zen 4) run in microcode: there they
sort 2-5x slower than its AVX2 kernels (numpy 2.4; benchmarks/RESULTS.md, issue 15 round 7), and a
run sorts a lot (the clipped noise statistics, the islands' growth). So a run loads numpy without
its AVX-512 targets on those CPUs, as OpenJDK does for its own SIMD sort. A value of
``NPY_DISABLE_CPU_FEATURES`` set by the user wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: numpy's environment variable of CPU features not to dispatch to (read when numpy is imported)
NUMPY_DISABLE = "NPY_DISABLE_CPU_FEATURES"
#: numpy's AVX-512 dispatch targets (their names since numpy 2.4)
AVX512_TARGETS = "X86_V4 AVX512_ICL AVX512_SPR"


def slow_avx512_sorts(cpuinfo: str) -> bool:
    """Whether the CPU described by ``cpuinfo`` (Linux ``/proc/cpuinfo``) is an AMD family 19h
    (Zen 4) with AVX-512: the CPUs whose AVX-512 compress-stores are microcoded."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor describes them all
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return (fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25"
            and "avx512f" in fields.get("flags", "").split())


def _numpy_names_targets() -> bool:
    """Whether the installed numpy names its dispatch targets as AVX512_TARGETS does (2.4 and later)."""
    from importlib.metadata import PackageNotFoundError, version  # here: ~10 ms, and only a run asks

    try:
        major, minor = (int(part) for part in version("numpy").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (2, 4)


def numpy_environ(environ: Mapping[str, str] = os.environ, cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The environment a run's processes load numpy with: ``{NUMPY_DISABLE: AVX512_TARGETS}`` on a
    CPU with slow AVX-512 sorts, unless ``environ`` sets NUMPY_DISABLE already; else nothing."""
    if NUMPY_DISABLE in environ or not _numpy_names_targets():
        return {}
    try:
        with open(cpuinfo_path) as fh:
            cpuinfo = fh.read(16384)
    except OSError:  # not Linux
        return {}
    return {NUMPY_DISABLE: AVX512_TARGETS} if slow_avx512_sorts(cpuinfo) else {}
