"""Backend "cpu": the compiled CPU kernel for causal linear attention (causal_linear_impl.h).

The C source is compiled on first use with the machine's C compiler (`CC`, else cc/gcc/clang) and
`-O3 -march=native`, into a cache directory (LINEAR_TRANSFORMERS_CACHE, else
~/.cache/linear_transformers) under a name that hashes the source, the compiler and the CPU, so a
rebuild happens only when one of them changes. It is plain C (no PyTorch headers): about a second.
Without a working compiler the backend is unavailable and "auto" falls back to "chunked" with one
warning; LINEAR_TRANSFORMERS_NO_CPU_KERNEL=1 disables it.

float32 and float64 run natively; float16/bfloat16 inputs are computed in float32.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..validation import accumulation_dtype

_SOURCE_DIR = Path(__file__).parent
_SOURCES = ("causal_linear.c", "causal_linear_impl.h")
_BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-std=gnu11"]
_ARCH_FLAGS = (["-march=native"], [])  # the second is tried where the compiler has no -march=native

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def cache_dir() -> Path:
    if os.environ.get("LINEAR_TRANSFORMERS_CACHE"):
        return Path(os.environ["LINEAR_TRANSFORMERS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "linear_transformers"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compile(cc: str, out: Path) -> None:
    errors = []
    for arch in _ARCH_FLAGS:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_out = Path(tmp) / out.name
            cmd = [cc, *_BASE_FLAGS, *arch, str(_SOURCE_DIR / "causal_linear.c"), "-o", str(tmp_out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp_out, out)  # atomic: concurrent builders never see a partial file
                return
            errors.append(f"{' '.join(cmd)}\n{proc.stderr.strip()[-1500:]}")
    raise RuntimeError("compiling the CPU kernel failed:\n" + "\n".join(errors))


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (install gcc or set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.partition("\n")[0]
    source = b"".join((_SOURCE_DIR / name).read_bytes() for name in _SOURCES)
    key = repr((cc, version, _BASE_FLAGS, _ARCH_FLAGS, platform.machine(), _cpu_signature())).encode()
    digest = hashlib.sha256(source + key).hexdigest()[:16]
    out = cache_dir() / f"causal_linear-{digest}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _compile(cc, out)
    lib = ctypes.CDLL(str(out))
    ptr, i64 = ctypes.c_void_p, ctypes.c_long
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"cla_forward_{suffix}")
        fwd.argtypes = [ptr] * 11 + [i64] * 6 + [ctypes.c_double, ctypes.c_int]
        fwd.restype = ctypes.c_int
        bwd = getattr(lib, f"cla_backward_{suffix}")
        bwd.argtypes = [ptr] * 15 + [i64] * 6 + [ctypes.c_int]
        bwd.restype = ctypes.c_int
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first call; None if it cannot be built."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("LINEAR_TRANSFORMERS_NO_CPU_KERNEL", "") not in ("", "0"):
                _error = "disabled by LINEAR_TRANSFORMERS_NO_CPU_KERNEL"
            else:
                try:
                    _lib = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _error = str(e)
    return _lib


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _error


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _call(name: str, dtype: torch.dtype, *args) -> None:
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CPU kernel is unavailable: {_error}")
    suffix = "f64" if dtype == torch.float64 else "f32"
    status = getattr(lib, f"{name}_{suffix}")(*args)
    if status:
        raise MemoryError(f"causal linear attention CPU kernel ({name}): out of memory for its chunk buffers")


class CpuCausalLinearAttention(torch.autograd.Function):
    """Forward and backward by the C kernel. Keeps for the backward the (contiguous) inputs, the
    output, S and z entering every chunk and the normaliser of every position."""

    @staticmethod
    def forward(ctx, q, k, v, S0, z0, eps: float, chunk_size: int):  # type: ignore[override]
        acc = accumulation_dtype(q.dtype)
        q_, k_, v_ = (x.to(acc).contiguous() for x in (q, k, v))
        B, T, H, Dk = q_.shape
        Dv = v_.shape[-1]
        N = -(-T // chunk_size)
        out = torch.empty(B, T, H, Dv, dtype=acc)
        S_final = torch.empty(B, H, Dk, Dv, dtype=acc)
        z_final = torch.empty(B, H, Dk, dtype=acc)
        needs_grad = any(ctx.needs_input_grad[:5])
        S_save = torch.empty(B, H, N, Dk, Dv, dtype=acc) if needs_grad else None
        z_save = torch.empty(B, H, N, Dk, dtype=acc) if needs_grad else None
        den_save = torch.empty(B, H, T, dtype=acc) if needs_grad else None
        S0_, z0_ = S0.contiguous(), z0.contiguous()
        _call(
            "cla_forward", acc,
            *map(_ptr, (q_, k_, v_, S0_, z0_, out, S_final, z_final, S_save, z_save, den_save)),
            B, T, H, Dk, Dv, chunk_size, eps, torch.get_num_threads(),
        )  # fmt: skip
        if needs_grad:
            ctx.save_for_backward(q_, k_, v_, out, S_save, z_save, den_save)
        ctx.chunk_size, ctx.in_dtype = chunk_size, q.dtype
        return out.to(q.dtype), S_final, z_final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dS_final, dz_final):  # type: ignore[override]
        q_, k_, v_, out, S_save, z_save, den_save = ctx.saved_tensors
        acc = q_.dtype
        B, T, H, Dk = q_.shape
        Dv = v_.shape[-1]
        dy_, dS_, dz_ = (x.to(acc).contiguous() for x in (dy, dS_final, dz_final))
        dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
        dS0, dz0 = torch.empty(B, H, Dk, Dv, dtype=acc), torch.empty(B, H, Dk, dtype=acc)
        _call(
            "cla_backward", acc,
            *map(_ptr, (q_, k_, v_, out, dy_, S_save, z_save, den_save, dS_, dz_, dq, dk, dv, dS0, dz0)),
            B, T, H, Dk, Dv, ctx.chunk_size, torch.get_num_threads(),
        )  # fmt: skip
        need = ctx.needs_input_grad
        return (
            dq.to(ctx.in_dtype) if need[0] else None,
            dk.to(ctx.in_dtype) if need[1] else None,
            dv.to(ctx.in_dtype) if need[2] else None,
            dS0 if need[3] else None,
            dz0 if need[4] else None,
            None,
            None,
        )
