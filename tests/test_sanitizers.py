"""The C kernels under AddressSanitizer: the ISA-level tests (attention forward/backward, the fused
steps, the generation loop and sampler, the Llama step's AMX tiles) and the property-based tests
rerun in a child process whose kernels are built with -fsanitize=address
(LINEAR_TRANSFORMERS_SANITIZE=address) and gcc's libasan preloaded, so an out-of-bounds read or
write fails the suite instead of passing by luck. (A kernel that reads one row past q on the last
chunk was caught this way: heap-buffer-overflow in vload_f64.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from linear_transformers.native import build


def _libasan() -> str | None:
    if shutil.which("gcc") is None:
        return None
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(_libasan() is None, reason="gcc's libasan is not installed (apt-get install gcc)")
def test_kernels_under_address_sanitizer(tmp_path):
    level = build.supported_levels()[0]
    env = {
        **os.environ,
        "LINEAR_TRANSFORMERS_SANITIZE": "address",
        "LINEAR_TRANSFORMERS_CACHE": str(tmp_path / "cache"),
        "LD_PRELOAD": _libasan(),
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",  # Python's own allocations are not ours to judge
    }
    env["CC"] = "gcc"  # libasan is gcc's
    here = Path(__file__).parent
    tests = [
        str(here / "ops" / "test_isa_levels.py"),
        str(here / "decode" / "test_fused_step.py"),
        str(here / "decode" / "test_llama_step.py"),
        str(here / "test_properties.py"),
    ]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        *tests,
        "-k",
        f"{level}-gcc or test_properties or amx_tiles",  # (amx_tiles: skipped without AMX)
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "AddressSanitizer" not in report, report
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and " failed" not in proc.stdout, report
