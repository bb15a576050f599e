"""Compiled C libraries, loaded with ctypes: built on first use for this CPU's ISA level (build.py:
explicit -march flags, never -march=native; vectors and register tiles sized for the target,
simd.h), cached on disk, and checked for speed before "auto" takes them.

A library is registered by the package whose code it holds (its sources, whether it wants OpenMP,
its ctypes signatures); two are:

    causal_linear  causal linear attention forward/backward (ops/cpu), on PyTorch's OpenMP pool
                   where the compiler has PyTorch's runtime (gcc on Linux), else on pthreads
    model_step     the fused generation step of a whole model and its sampler (decode/), OpenMP
                   where the compiler has it (else single-threaded, with one warning)

Plain C (no PyTorch headers): about a second each. Without a working compiler a library is
unavailable and its users fall back to their PyTorch paths with one warning;
LINEAR_TRANSFORMERS_NO_CPU_KERNEL=1 disables all. LINEAR_TRANSFORMERS_ISA=<level> forces a level and
CC a compiler; `use(level, cc)` selects another build within a process (tests, benchmarks).

"auto" takes a compiled kernel only where it is faster than the PyTorch path on this machine:
the first use measures both on a small representative shape (under a second) and stores the
verdict beside the library (`verdict`); LINEAR_TRANSFORMERS_AUTO_KERNELS=always|never overrides.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import build

SIMD_H = Path(__file__).parent / "simd.h"
# A verdict within this factor of the PyTorch time goes to the kernel: within 5% either choice is as
# fast, and a noisy measurement must not keep a faster kernel off for good.
VERDICT_TOLERANCE = 1.05


@dataclass(frozen=True)
class Library:
    """A C library: its sources (file name -> text, read at registration: a library built hours
    later, from an editable install being edited meanwhile, still matches the signatures set by
    the code that registered it), OpenMP or not, and the function that sets its ctypes signatures."""

    name: str
    sources: dict[str, bytes]
    openmp: str  # build.OPENMP_MODES
    set_signatures: Callable[[ctypes.CDLL], None]
    paths: tuple[Path, ...] = ()  # where the sources were read from


@dataclass
class Loaded:
    lib: ctypes.CDLL | None
    error: str | None
    build: build.Build | None


_libraries: dict[str, Library] = {}
_lock = threading.RLock()
_loaded: dict[tuple[str, str | None, str | None, bool], Loaded] = {}
_selected: tuple[str | None, str | None, bool] = (None, None, True)  # (level, compiler, OpenMP); None: defaults
_warned: set[object] = set()  # what was said once per process
_verdicts: dict[tuple[Path, str], bool] = {}  # verdicts read or measured in this process


def register(name: str, files: list[Path], openmp: str, set_signatures: Callable[[ctypes.CDLL], None]) -> None:
    """Declare the library `name`, built from `files` (.c files and the headers they include)."""
    _libraries[name] = Library(name, {f.name: f.read_bytes() for f in files}, openmp, set_signatures, tuple(files))


def check_struct(layout: Callable, struct: type[ctypes.Structure], what: str) -> None:
    """A ctypes mirror must be its C struct byte for byte: `layout(out, n)` (a library's
    lt_*_layout) writes the struct's size and each field's offset in declaration order; they must
    equal the mirror's. Raises RuntimeError naming `what` (the struct and its header) otherwise, so
    the library fails to load instead of a step reading the wrong fields."""
    n = layout(None, 0)
    values = (ctypes.c_long * n)()
    layout(values, n)
    ours = [ctypes.sizeof(struct)] + [getattr(struct, name).offset for name, _ in struct._fields_]
    if list(values) != ours:
        raise RuntimeError(
            f"{struct.__name__} does not mirror {what} (size and offsets: C {list(values)}, Python {ours})"
        )


def registered() -> list[str]:
    """The names of every library declared so far (each module that has one declares it on import)."""
    return list(_libraries)


@contextlib.contextmanager
def use(level: str | None = None, cc: str | None = None, openmp: bool = True) -> Iterator[None]:
    """Within the block, every library comes from the build for `level` (see build.LEVELS) with the
    compiler `cc` (a path or name); None keeps the default. openmp=False builds every library
    without OpenMP (the attention kernel then runs on pthreads, the fused step on one thread)."""
    global _selected
    if level is not None:
        build.check_level(level)
    before = _selected
    _selected = (level, cc, openmp)
    try:
        yield
    finally:
        _selected = before


def load(name: str) -> Loaded:
    """The library `name` for the selected level and compiler, built on first call (or why not)."""
    with _lock:
        key = (name, *_selected)
        if key not in _loaded:
            _loaded[key] = _build_and_open(_libraries[name])
        return _loaded[key]


def _build_and_open(library: Library) -> Loaded:
    name = library.name
    if os.environ.get("LINEAR_TRANSFORMERS_NO_CPU_KERNEL", "") not in ("", "0"):
        return Loaded(None, "disabled by LINEAR_TRANSFORMERS_NO_CPU_KERNEL", None)
    level, cc, openmp = _selected
    try:
        level = level or build.best_level()
        cc = build.default_compiler() if cc is None else cc
        b = build.build(name, library.sources, level, cc, openmp=library.openmp if openmp else "no")
        try:
            lib = ctypes.CDLL(str(b.path))
        except OSError:
            if library.openmp != "pytorch" or not b.openmp:
                raise
            # PyTorch's libgomp lacks a symbol this compiler's OpenMP needs: the pthreads build
            b = build.build(name, library.sources, level, cc, openmp="no")
            lib = ctypes.CDLL(str(b.path))
        library.set_signatures(lib)
        b = dataclasses.replace(b, openmp_mode=library.openmp)  # what it asked for, whatever was built
    except (OSError, RuntimeError, ValueError, AttributeError) as e:
        return Loaded(None, f"{name}: {e}", None)
    if library.openmp == "any" and openmp and not b.openmp and name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"the CPU kernel {name} was built without OpenMP ({b.compiler} has none; install libomp or use gcc): "
            "it runs single-threaded",
            RuntimeWarning,
            stacklevel=4,
        )
    return Loaded(lib, None, b)


def build_info(name: str) -> build.Build | None:
    """How the library `name` was built (level, flags, compiler), or None where it is unavailable."""
    return load(name).build


def verdict(kind: str, measure: Callable[[], tuple[float, float]], library: str) -> bool:
    """Whether "auto" should use the compiled `kind` ("attention", "fused_step") of `library` here:
    LINEAR_TRANSFORMERS_AUTO_KERNELS=always/never, else the stored verdict of `measure` (seconds of
    the compiled kernel and of the PyTorch path on a representative shape, run once per build,
    thread count and kind; the result is kept beside the library). A loss is said once per process."""
    policy = build.auto_policy()
    if policy != "measure":
        return policy == "always"
    loaded = load(library)
    if loaded.build is None:
        return False
    what = f"{kind}@{torch.get_num_threads()}threads"
    key = (loaded.build.path, what)
    if key in _verdicts:  # the common case, on every call of "auto": no file read
        return _verdicts[key]
    with _lock:
        stored = build.read_verdict(loaded.build, what)
        if stored is None:
            started = time.perf_counter()
            build.log.info("timing the compiled %s kernel against PyTorch (once per build and thread count) ...", kind)
            try:
                kernel_s, pytorch_s = measure()
            except Exception as e:  # unverified is not faster: PyTorch, said once, measured again next process
                kernel_s, pytorch_s = float("nan"), float("nan")
                warnings.warn(f"timing the compiled {kind} kernel failed ({e!r})", RuntimeWarning, stacklevel=3)
            stored = {
                "kernel_ms": round(kernel_s * 1e3, 4),
                "pytorch_ms": round(pytorch_s * 1e3, 4),
                "faster": kernel_s <= VERDICT_TOLERANCE * pytorch_s,
                "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            }
            if kernel_s == kernel_s:  # (a failed measurement is not kept)
                build.store_verdict(loaded.build, what, stored)
            build.log.info(
                "timed %s in %.1f s: %s ms against PyTorch's %s ms",
                kind,
                time.perf_counter() - started,
                stored["kernel_ms"],
                stored["pytorch_ms"],
            )
    if not stored["faster"] and key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"the compiled {kind} kernel ({loaded.build.describe()}) measured slower than PyTorch on this machine "
            f"({stored['kernel_ms']:.3g} vs {stored['pytorch_ms']:.3g} ms); 'auto' uses the PyTorch path "
            f"(LINEAR_TRANSFORMERS_AUTO_KERNELS=always overrides; the verdict lies in {loaded.build.info_path})",
            RuntimeWarning,
            stacklevel=3,
        )
    _verdicts[key] = bool(stored["faster"])
    return _verdicts[key]


def best_of(fns: list[Callable[[], object]], repeats: int = 7, warmup: int = 2) -> list[float]:
    """Each function's best time in seconds, the functions interleaved (a slow moment hits all)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's data pointer for a C call (None stays NULL)."""
    return None if t is None else t.data_ptr()
