"""Timing and peak-memory measurement shared by the benchmarks."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..decode import fused


@dataclass
class Timing:
    best_ms: float
    median_ms: float
    repeats: int


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of a from the reference b, relative to b's largest magnitude (float64)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def time_fn(fn: Callable[[], object], repeats: int, device: torch.device | None = None, warmup: int = 1) -> Timing:
    """Best and median wall time of `fn` over `repeats` runs after `warmup` runs (synchronising CUDA)."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(min(times), statistics.median(times), repeats)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def cpu_peak_memory_supported() -> bool:
    return platform.system() == "Linux" and os.access("/proc/self/clear_refs", os.W_OK)


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (bytes) that `fn` needs beyond what was allocated before it ran.

    CUDA: torch's allocator statistics. CPU (Linux): the process's peak resident set size, reset
    through /proc/self/clear_refs after returning free heap pages with malloc_trim, minus the
    resident size before the call. NaN where neither is available.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated(device) - base)
    if not cpu_peak_memory_supported():
        return float("nan")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    base = _proc_status_bytes("VmRSS")
    fn()
    return float(_proc_status_bytes("VmHWM") - base)


def batched_gemm_gflops(n: int = 64, batch: int = 1024, repeats: int = 5) -> float:
    """Measured float32 rate (GFLOP/s) of batched n x n x n matmuls on the CPU: the ceiling for the chunked path."""
    a, b = torch.randn(batch, n, n), torch.randn(batch, n, n)
    out = torch.empty(batch, n, n)
    t = time_fn(lambda: torch.bmm(a, b, out=out), repeats, warmup=2)
    return 2 * batch * n**3 / (t.best_ms * 1e-3) / 1e9


def read_f32(tensors: list[torch.Tensor], passes: int = 1) -> float:
    """The bandwidth probe (decode/read_probe.c, built into the fused step's library): read float32
    CPU tensors (contiguous) `passes` times in one parallel region with the fused step's threads,
    the way its GEMVs read weights; returns their sum (the mean over passes).
    bench generate times 784 passes against a 784-token image: the bandwidth floor of generation
    at batch 1."""
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        raise ValueError("read_f32: tensors must be contiguous float32 CPU tensors")
    if passes < 1:
        raise ValueError(f"read_f32: passes must be >= 1, got {passes}")
    ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_long * len(tensors))(*[t.numel() for t in tensors])
    return fused.load().lt_read_f32(len(tensors), ptrs, sizes, passes)
