"""Compiling the C kernels for the CPU they run on: one library per (kernel source, ISA level,
compiler), built on first use with explicit flags and cached on disk.

ISA levels (LEVELS) are compile targets with stated flags, never `-march=native`: a VM often masks
the CPU's model, and `-march=native` then tunes for the wrong chip (what that cost: BENCHMARKS.md,
"The CPU kernels per ISA level"). Each level tunes for `generic`. The kernels pick their vector width and register tiles
from the compiler's predefined macros (native/simd.h), so each level gets code written for it.

    x86-64-v4-amx  AVX-512 + AVX512-BF16 + VNNI + AMX-BF16/INT8 (Sapphire Rapids and later): 16 floats, 32 registers
    x86-64-v4-bf16 AVX-512 + AVX512-BF16 + VNNI (AMD Zen 4 and later, Cooper Lake): bfloat16 and int8 dots, no AMX
    x86-64-v4      AVX-512 (F, BW, CD, DQ, VL): 16 floats a vector, 32 registers
    x86-64-v3      AVX2 + FMA (most laptops and many cloud CPUs): 8 floats, 16 registers
    x86-64         SSE2, any x86-64: 4 floats, 16 registers
    armv8-a        AArch64 NEON: 4 floats, 32 registers
    generic        the compiler's default target: plain C (vector code lowered to what it has)

The level is the best one the CPU supports (/proc/cpuinfo flags; where there is none, PyTorch's own
`torch.backends.cpu.get_cpu_capability()`), or LINEAR_TRANSFORMERS_ISA=<level> to force one (tests
and benchmarks build every level the machine runs). The compiler is $CC, else cc, gcc, clang.
OpenMP is used only where a kernel asks for it (OPENMP_MODES), and only if the compiler has it:
"any" takes the compiler's own runtime (gcc: libgomp, which is PyTorch's on Linux, so the library
shares PyTorch's thread pool; clang: libomp, a pool of its own), else the library is built
single-threaded; "pytorch" takes OpenMP only where it is PyTorch's runtime (gcc on Linux with
PyTorch on OpenMP), else the kernel threads itself with pthreads. `Build.openmp` says what was built.
(clang's -fopenmp=libgomp links libgomp but ignores the pragmas: it is never used.)

The cache directory is LINEAR_TRANSFORMERS_CACHE, else $XDG_CACHE_HOME/linear_transformers, else
~/.cache/linear_transformers. A library's name hashes its source, flags and compiler version, so a
rebuild happens only when one of them changes; beside it a JSON file records how it was built, the
library's SHA-256 and the verdicts of speed checks (see `verdict`). A cached library is loaded only
if its bytes still match that SHA-256: one truncated or partly zeroed (a full disk, a killed copy)
would crash the process when loaded, so it is rebuilt instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..integrity import file_sha256

# Library code says what it does through logging (the command line shows INFO on stderr): a first
# call that compiles or times the kernels takes seconds, and should say so.
log = logging.getLogger("linear_transformers")

_V3 = frozenset({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "xsave"})
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True)
class Level:
    """A compile target: its flags, the CPU flags (/proc/cpuinfo names) it needs, its machine."""

    name: str
    flags: tuple[str, ...]
    needs: frozenset[str]
    machine: str  # "x86_64", "aarch64", or "" (any)
    gcc_flags: tuple[str, ...] = ()  # added for GCC only
    # the same instruction set for compilers that predate the x86-64-vN names (GCC < 11, clang < 12)
    older: tuple[str, ...] = ()


_BF16_FLAGS = ("-mavx512bf16", "-mavx512vnni")  # (on top of AVX-512)
_AMX_FLAGS = ("-mamx-tile", "-mamx-bf16", "-mamx-int8")

LEVELS: dict[str, Level] = {
    level.name: level
    for level in (
        Level(
            "x86-64-v4-amx",
            ("-march=x86-64-v4", *_BF16_FLAGS, *_AMX_FLAGS, "-mtune=generic"),
            _V4 | {"avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"},
            "x86_64",
            older=("-march=skylake-avx512", *_BF16_FLAGS, *_AMX_FLAGS, "-mtune=generic"),
        ),
        Level(
            "x86-64-v4-bf16",
            ("-march=x86-64-v4", *_BF16_FLAGS, "-mtune=generic"),
            _V4 | {"avx512_bf16", "avx512_vnni"},
            "x86_64",
            older=("-march=skylake-avx512", *_BF16_FLAGS, "-mtune=generic"),
        ),
        Level(
            "x86-64-v4",
            ("-march=x86-64-v4", "-mtune=generic"),
            _V4,
            "x86_64",
            older=("-march=skylake-avx512", "-mtune=generic"),
        ),
        # GCC's generic tuning splits every unaligned 32-byte load and store in two halves, through
        # memory where the vector was built by memcpy: 4x slower here (2026-12-02); clang does not split.
        Level(
            "x86-64-v3",
            ("-march=x86-64-v3", "-mtune=generic"),
            _V3,
            "x86_64",
            ("-mno-avx256-split-unaligned-load", "-mno-avx256-split-unaligned-store"),
            older=("-march=haswell", "-mtune=generic"),
        ),
        Level("x86-64", ("-march=x86-64", "-mtune=generic"), frozenset(), "x86_64"),
        Level("armv8-a", ("-march=armv8-a",), frozenset(), "aarch64"),
        Level("generic", (), frozenset(), ""),
    )
}
_BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11")
# LINEAR_TRANSFORMERS_SANITIZE=address builds the kernels with AddressSanitizer (a test job: the
# process must preload the compiler's libasan), so an out-of-bounds access fails instead of passing
_SANITIZERS = {"address": ("-fsanitize=address", "-fno-omit-frame-pointer", "-g")}


def sanitize_flags() -> tuple[str, ...]:
    name = os.environ.get("LINEAR_TRANSFORMERS_SANITIZE", "")
    if name and name not in _SANITIZERS:
        raise ValueError(f"LINEAR_TRANSFORMERS_SANITIZE must be one of {', '.join(_SANITIZERS)}, got {name!r}")
    return _SANITIZERS.get(name, ())


_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
# PyTorch's capability names, where /proc/cpuinfo is missing (macOS, Windows)
_FROM_TORCH = {"avx512": "x86-64-v4", "avx2": "x86-64-v3"}


def machine() -> str:
    m = platform.machine().lower()
    return _MACHINES.get(m, m)


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as Linux reports them (x86 "flags", ARM "Features"), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def supported_levels() -> list[str]:
    """The levels this CPU runs, best first."""
    m, flags = machine(), cpu_flags()
    if m == "x86_64" and flags is None:  # no flags to read (macOS, Windows): PyTorch's view of the CPU
        x86 = ["x86-64-v4", "x86-64-v3", "x86-64", "generic"]
        return x86[x86.index(_FROM_TORCH.get(torch.backends.cpu.get_cpu_capability().lower(), "x86-64")) :]
    return [
        level.name for level in LEVELS.values() if level.machine in ("", m) and level.needs <= (flags or frozenset())
    ]


def best_level() -> str:
    """The level to build: LINEAR_TRANSFORMERS_ISA if set (checked), else the best the CPU runs."""
    forced = os.environ.get("LINEAR_TRANSFORMERS_ISA", "")
    supported = supported_levels()
    if forced:
        check_level(forced, supported)
        return forced
    return supported[0]


def check_level(name: str, supported: list[str] | None = None) -> None:
    if name not in LEVELS:
        raise ValueError(f"unknown ISA level {name!r}; choose one of {', '.join(LEVELS)}")
    supported = supported_levels() if supported is None else supported
    if name not in supported:
        raise ValueError(
            f"ISA level {name!r} does not run on this CPU ({machine()}); it supports {', '.join(supported)}"
        )


def compilers() -> list[str]:
    """The C compilers found: $CC first, then cc, gcc, clang (each once, by resolved path)."""
    names = [os.environ["CC"]] if os.environ.get("CC") else []
    names += ["cc", "gcc", "clang"]
    out, seen = [], set()
    for name in names:
        path = shutil.which(name)
        if path and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            out.append(path)
    return out


def default_compiler() -> str:
    if os.environ.get("CC"):
        cc = shutil.which(os.environ["CC"])
        if not cc:
            raise RuntimeError(f"the C compiler CC={os.environ['CC']!r} was not found")
        return cc
    found = compilers()
    if not found:
        raise RuntimeError("no C compiler found (install gcc or clang, or set CC)")
    return found[0]


def _compiler_env() -> dict[str, str]:
    """The environment for the compiler: without a preloaded library (a sanitizer's runtime, meant
    for this process, would make the compiler itself run instrumented)."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def compiler_version(cc: str) -> str:
    proc = subprocess.run([cc, "--version"], capture_output=True, text=True, env=_compiler_env())
    return proc.stdout.partition("\n")[0].strip()


def cache_dir() -> Path:
    if os.environ.get("LINEAR_TRANSFORMERS_CACHE"):
        return Path(os.environ["LINEAR_TRANSFORMERS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "linear_transformers"


@dataclass(frozen=True)
class Build:
    """A compiled library: where it lies, how it was built."""

    path: Path
    level: str
    compiler: str  # the compiler's --version line
    flags: tuple[str, ...]
    openmp: bool  # built with OpenMP
    openmp_mode: str = "no"  # what the library asked for (OPENMP_MODES)

    @property
    def info_path(self) -> Path:
        return self.path.with_suffix(".json")

    def describe(self) -> str:
        threads = ""
        if self.openmp_mode == "any" and not self.openmp:
            threads = ", no OpenMP"
        elif self.openmp_mode == "pytorch":
            threads = ", OpenMP (PyTorch's pool)" if self.openmp else ", pthreads"
        return f"{self.level} ({' '.join(self.flags)}), {self.compiler}{threads}"


# What a library asks for: "no" OpenMP; "any" OpenMP the compiler has (else single-threaded);
# "pytorch": OpenMP only where it is PyTorch's own runtime, so the kernel runs on PyTorch's pool
# (else the library threads itself)
OPENMP_MODES = ("no", "any", "pytorch")


def shares_pytorch_openmp(clang: bool) -> bool:
    """Whether a library built with -fopenmp binds to PyTorch's OpenMP runtime in this process:
    gcc's libgomp on Linux, where PyTorch's wheels link libgomp.so.1 (the loader reuses the loaded one)."""
    return not clang and platform.system() == "Linux" and torch.backends.openmp.is_available()


def _openmp_flags(clang: bool, mode: str) -> list[list[str]]:
    """OpenMP flag sets to try for `mode`, best first; [] (none) last."""
    if mode == "any" or (mode == "pytorch" and shares_pytorch_openmp(clang)):
        return [["-fopenmp"], []]
    return [[]]


def build(name: str, sources: dict[str, bytes], level: str, cc: str, openmp: str = "no") -> Build:
    """Compile the .c files of `sources` (name -> text; headers beside them) into lib `name` for
    `level` with `cc`, or reuse the cached one; `openmp` is one of OPENMP_MODES. Raises
    RuntimeError with the compiler's message."""
    if openmp not in OPENMP_MODES:
        raise ValueError(f"openmp must be one of {', '.join(OPENMP_MODES)}, got {openmp!r}")
    version = compiler_version(cc)
    spec = LEVELS[level]
    clang = "clang" in version.lower()
    extra = () if clang else spec.gcc_flags
    extra += sanitize_flags()
    flag_sets = [spec.flags + extra] + ([spec.older + extra] if spec.older else [])
    key = repr((name, cc, version, _BASE_FLAGS, flag_sets, openmp, machine())).encode()
    digest = hashlib.sha256(b"".join(sources[n] for n in sorted(sources)) + key).hexdigest()[:16]
    out = cache_dir() / f"{name}-{level}-{Path(cc).name}-{digest}.so"
    info = out.with_suffix(".json")
    if out.exists() and info.exists():
        try:
            meta = json.loads(info.read_text())
            if meta["sha256"] == file_sha256(out):  # else damaged (or from an older cache): rebuilt below
                return Build(out, level, version, tuple(meta["flags"]), bool(meta["openmp"]), openmp)
        except (ValueError, KeyError, OSError, TypeError):
            pass  # rebuilt below
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log.info(
        "compiling the C library %s for %s with %s (once per machine; cached in %s) ...",
        name,
        level,
        Path(cc).name,
        out.parent,
    )
    errors = []
    attempts = [(level_flags, omp) for level_flags in flag_sets for omp in _openmp_flags(clang, openmp)]
    for level_flags, omp in attempts:
        flags = (*_BASE_FLAGS, *level_flags, "-pthread", *omp)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            for file, text in sources.items():
                (Path(tmp) / file).write_bytes(text)
            tmp_out = Path(tmp) / out.name
            c_files = [str(Path(tmp) / f) for f in sorted(sources) if f.endswith(".c")]
            cmd = [cc, *flags, *c_files, "-lm", "-o", str(tmp_out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_compiler_env())
            if proc.returncode == 0:
                digest = file_sha256(tmp_out)
                os.replace(tmp_out, out)  # atomic: concurrent builders never see a partial file
                result = Build(out, level, version, tuple(flags), bool(omp), openmp)
                _write_json(
                    info,
                    {"flags": list(flags), "openmp": bool(omp), "compiler": version, "sha256": digest, "verdicts": {}},
                )
                log.info("compiled %s in %.1f s", name, time.perf_counter() - started)
                return result
            errors.append(f"{' '.join(cmd)}\n{proc.stderr.strip()[-1500:]}")
    raise RuntimeError(f"compiling {name} for {level} failed:\n" + "\n".join(errors))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_verdict(b: Build, what: str) -> dict | None:
    """A speed check's verdict stored beside the library (see `store_verdict`), or None."""
    try:
        return json.loads(b.info_path.read_text()).get("verdicts", {}).get(what)
    except (OSError, ValueError):
        return None


def store_verdict(b: Build, what: str, verdict: dict) -> None:
    try:
        data = json.loads(b.info_path.read_text())
    except (OSError, ValueError):
        return  # a sidecar that cannot be read holds no SHA-256 either: the library is rebuilt next process
    if not isinstance(data, dict):
        return
    data.setdefault("verdicts", {})[what] = verdict
    with contextlib.suppress(OSError):  # a read-only cache: the check runs again next process
        _write_json(b.info_path, data)


def auto_policy() -> str:
    """LINEAR_TRANSFORMERS_AUTO_KERNELS: "measure" (default: a compiled kernel is used by "auto" only
    where a quick check found it faster than the PyTorch path), "always" or "never"."""
    value = os.environ.get("LINEAR_TRANSFORMERS_AUTO_KERNELS", "measure").strip().lower() or "measure"
    if value not in ("measure", "always", "never"):
        raise ValueError(f"LINEAR_TRANSFORMERS_AUTO_KERNELS must be measure, always or never, got {value!r}")
    return value
