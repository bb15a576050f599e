"""The compiled CPU kernel: built once into its cache, reused, and when it cannot be built, "auto"
falls back to the PyTorch path with one warning while "cpu" says why it is unavailable."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from linear_transformers import ops
from linear_transformers.ops import cpu

from helpers import qkv, rel_err

needs_compiler = pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")), reason="no C compiler on this machine"
)


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """Forget the loaded library and build into an empty cache directory."""
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setenv("LINEAR_TRANSFORMERS_CACHE", str(tmp_path))
    monkeypatch.setattr(ops, "_warned_fallback", set())
    return tmp_path


@needs_compiler
def test_kernel_builds_on_this_machine():
    assert cpu.available(), cpu.unavailable_reason()


@needs_compiler
def test_build_is_cached_and_reused(fresh_kernel, monkeypatch):
    assert cpu.available(), cpu.unavailable_reason()
    built = list(fresh_kernel.glob("causal_linear-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_compile", lambda *a: pytest.fail("recompiled although the cache holds the library"))
    assert cpu.available()
    assert built[0].stat().st_mtime_ns == stamp


def test_auto_falls_back_with_one_warning(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_kernel / "no-such-compiler"))
    monkeypatch.setattr(cpu.shutil, "which", lambda name: None)
    q, k, v = qkv(1, 20, 2, 4, 4)
    with pytest.warns(RuntimeWarning, match="backend 'cpu' is unavailable .*using 'chunked'"):
        out = ops.causal_linear_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per process
        ops.causal_linear_attention(q, k, v)
    assert rel_err(out, ops.causal_linear_attention(q, k, v, backend="naive")) < 1e-12
    with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable"):
        ops.causal_linear_attention(q, k, v, backend="cpu")


def test_disabled_by_environment(fresh_kernel, monkeypatch):
    monkeypatch.setenv("LINEAR_TRANSFORMERS_NO_CPU_KERNEL", "1")
    assert not cpu.available()
    assert "LINEAR_TRANSFORMERS_NO_CPU_KERNEL" in cpu.unavailable_reason()


def test_compile_errors_are_reported(fresh_kernel, monkeypatch):
    # the build compiles the source read at import (not the files on disk, which may have changed since)
    bad = {name: b"this is not C\n" if name == "causal_linear.c" else b"" for name in cpu._SOURCES}
    monkeypatch.setattr(cpu, "_SOURCE_TEXT", bad)
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    assert not cpu.available()
    assert "compiling the CPU kernel failed" in cpu.unavailable_reason()


@needs_compiler
def test_cpu_backend_rejects_other_devices():
    q, k, v = (x.to("meta") for x in qkv(1, 4, 1, 2, 2, torch.float32))
    with pytest.raises(ValueError, match="backend 'cpu' runs on CPU tensors, got tensors on meta"):
        ops.causal_linear_attention(q, k, v, backend="cpu")
