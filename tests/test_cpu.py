"""Numpy's CPU dispatch in a run's processes (trap_dask.cpu): no AVX-512 sorts on AMD Zen 4."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version

from trap_dask.cpu import AVX512_TARGETS, NUMPY_DISABLE, numpy_environ, slow_avx512_sorts


def _cpuinfo(vendor: str, family: int, flags: str) -> str:
    one = f"processor\t: {{}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 17\nflags\t\t: {flags}\n"
    return one.format(0) + "\n" + one.format(1)


ZEN4 = _cpuinfo("AuthenticAMD", 25, "fpu sse2 avx2 avx512f avx512dq avx512bw")


def test_only_amd_family_19h_with_avx512_has_slow_avx512_sorts():
    assert slow_avx512_sorts(ZEN4)
    assert not slow_avx512_sorts(_cpuinfo("AuthenticAMD", 25, "fpu sse2 avx2"))  # Zen 3: no AVX-512
    assert not slow_avx512_sorts(_cpuinfo("AuthenticAMD", 26, "avx2 avx512f"))  # Zen 5
    assert not slow_avx512_sorts(_cpuinfo("GenuineIntel", 6, "avx2 avx512f avx512dq"))
    assert not slow_avx512_sorts("")


def test_the_run_environment_turns_the_avx512_targets_off_on_zen4_unless_the_user_chose(tmp_path):
    zen4, intel = tmp_path / "zen4", tmp_path / "intel"
    zen4.write_text(ZEN4)
    intel.write_text(_cpuinfo("GenuineIntel", 6, "avx2 avx512f"))
    names_targets = tuple(int(p) for p in version("numpy").split(".")[:2]) >= (2, 4)
    assert numpy_environ({}, str(zen4)) == ({NUMPY_DISABLE: AVX512_TARGETS} if names_targets else {})
    assert numpy_environ({}, str(intel)) == {}
    assert numpy_environ({NUMPY_DISABLE: ""}, str(zen4)) == {}  # the user's setting, even empty, wins
    assert numpy_environ({}, str(tmp_path / "absent")) == {}


def test_the_run_imports_numpy_with_the_setting_and_leaves_no_trace_in_the_environment():
    """What ``trap-dask run`` does before numpy loads: numpy dispatches without the targets, and
    processes started later (a batch job's workers) do not inherit the setting."""
    code = (
        "import os\n"
        "from trap_dask.cli import _import_numpy_with\n"
        f"_import_numpy_with({{{NUMPY_DISABLE!r}: {AVX512_TARGETS!r}}})\n"
        "from numpy._core._multiarray_umath import __cpu_features__ as features\n"
        f"print(features.get('X86_V4'), features.get('AVX512_ICL'), {NUMPY_DISABLE!r} in os.environ)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != NUMPY_DISABLE}  # (conftest.py sets it here)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]
