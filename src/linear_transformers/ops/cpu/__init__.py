"""Backend "cpu": compiled CPU kernels, loaded with ctypes.

Two libraries, each built on first use for this CPU's ISA level (build.py: explicit -march flags,
never -march=native; vectors and register tiles sized for the target, simd.h) and cached on disk:

    causal_linear  causal linear attention forward/backward (causal_linear_impl.h), pthreads only
    model_step     the fused generation step of a whole model and its sampler (model_step.c), OpenMP
                   where the compiler has it (else single-threaded, with one warning)

Plain C (no PyTorch headers): about a second each. Without a working compiler a library is
unavailable and "auto" / the model fall back to the PyTorch paths with one warning;
LINEAR_TRANSFORMERS_NO_CPU_KERNEL=1 disables both. LINEAR_TRANSFORMERS_ISA=<level> forces a level and
CC a compiler; `use(level, cc)` selects another build within a process (tests, benchmarks).

"auto" takes a compiled kernel only where it is faster than the PyTorch path on this machine:
the first use measures both on a small representative shape (a few milliseconds) and stores the
verdict beside the library (`verdict`); LINEAR_TRANSFORMERS_AUTO_KERNELS=always|never overrides.

float32 and float64 run natively; float16/bfloat16 inputs are computed in float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..state import forward_result
from ..validation import accumulation_dtype
from . import build

_SOURCE_DIR = Path(__file__).parent
LIBRARIES = {
    "causal_linear": ("causal_linear.c", "causal_linear_impl.h", "simd.h"),
    "model_step": ("model_step.c", "simd.h"),
}
_OPENMP = {"causal_linear": False, "model_step": True}
# Read once, at import: a library is built (on first use, maybe hours later) from the source this
# module was imported with, so it always matches the ctypes signatures below even if the files on
# disk change meanwhile (an editable install being edited while a long run goes on).
_SOURCE_TEXT = {name: (_SOURCE_DIR / name).read_bytes() for files in LIBRARIES.values() for name in files}


@dataclass
class _Loaded:
    lib: ctypes.CDLL | None
    error: str | None
    build: build.Build | None


_lock = threading.RLock()
_loaded: dict[tuple[str, str | None, str | None], _Loaded] = {}
_selected: tuple[str | None, str | None] = (None, None)  # (level, compiler); None: the defaults
_warned: set[object] = set()  # what was said once per process
_verdicts: dict[tuple[Path, str], bool] = {}  # verdicts read or measured in this process


@contextlib.contextmanager
def use(level: str | None = None, cc: str | None = None) -> Iterator[None]:
    """Within the block, the kernels come from the build for `level` (see build.LEVELS) with the
    compiler `cc` (a path or name); None keeps the default."""
    global _selected
    if level is not None:
        build.check_level(level)
    before = _selected
    _selected = (level, cc)
    try:
        yield
    finally:
        _selected = before


def _set_signatures(name: str, lib: ctypes.CDLL) -> None:
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    if name == "causal_linear":
        for suffix in ("f32", "f64"):
            fwd = getattr(lib, f"cla_forward_{suffix}")
            fwd.argtypes = [ptr] * 11 + [i64] * 6 + [ctypes.c_double, c_int]
            fwd.restype = c_int
            bwd = getattr(lib, f"cla_backward_{suffix}")
            bwd.argtypes = [ptr] * 15 + [i64] * 6 + [c_int]
            bwd.restype = c_int
        return
    lib.lt_model_token_f32.argtypes = [ctypes.POINTER(_LtModel), c_int, ptr, ctypes.c_long] + [ptr] * 4
    lib.lt_model_token_f32.restype = c_int
    lib.lt_has_bf16_dot.restype = c_int
    lib.lt_has_amx.restype = c_int
    lib.lt_mol_sample_f32.argtypes = [c_int] * 3 + [ptr] * 4
    lib.lt_mol_sample_f32.restype = c_int
    lib.lt_generate_mol_f32.argtypes = (
        [ctypes.POINTER(_LtModel), c_int, ptr, ctypes.c_long, c_int]
        + [ptr] * 4
        + [c_int, c_int, ptr, ptr, ctypes.POINTER(c_int)]
    )
    lib.lt_generate_mol_f32.restype = c_int
    lib.lt_read_f32.argtypes = [c_int, ptr, ptr, c_int]
    lib.lt_read_f32.restype = ctypes.c_float


def _load(name: str) -> _Loaded:
    with _lock:
        key = (name, *_selected)
        if key not in _loaded:
            _loaded[key] = _build_and_open(name)
        return _loaded[key]


def _build_and_open(name: str) -> _Loaded:
    if os.environ.get("LINEAR_TRANSFORMERS_NO_CPU_KERNEL", "") not in ("", "0"):
        return _Loaded(None, "disabled by LINEAR_TRANSFORMERS_NO_CPU_KERNEL", None)
    level, cc = _selected
    try:
        level = level or build.best_level()
        cc = build.default_compiler() if cc is None else cc
        sources = {f: _SOURCE_TEXT[f] for f in LIBRARIES[name]}
        b = build.build(name, sources, level, cc, openmp=_OPENMP[name])
        lib = ctypes.CDLL(str(b.path))
        _set_signatures(name, lib)
    except (OSError, RuntimeError, ValueError, AttributeError) as e:
        return _Loaded(None, f"{name}: {e}", None)
    if _OPENMP[name] and not b.openmp and name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"the CPU kernel {name} was built without OpenMP ({b.compiler} has none; install libomp or use gcc): "
            "it runs single-threaded",
            RuntimeWarning,
            stacklevel=4,
        )
    return _Loaded(lib, None, b)


def load() -> ctypes.CDLL | None:
    """The attention kernel library (causal_linear), building it on first call; None if it cannot be built."""
    return _load("causal_linear").lib


def load_step() -> ctypes.CDLL | None:
    """The fused model step library (model_step), building it on first call; None if it cannot be built."""
    return _load("model_step").lib


def build_info(name: str = "causal_linear") -> build.Build | None:
    """How the library `name` was built (level, flags, compiler), or None where it is unavailable."""
    return _load(name).build


# Evaluated once while torch.compile traces (the answer does not change within a process).
@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the attention kernel (backend "cpu") is built and loaded."""
    return load() is not None


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    return _load("causal_linear").error


def step_available() -> bool:
    """Whether the fused model step library is built and loaded."""
    return load_step() is not None


def step_unavailable_reason() -> str | None:
    return _load("model_step").error


def verdict(kind: str, measure: Callable[[], tuple[float, float]], library: str = "causal_linear") -> bool:
    """Whether "auto" should use the compiled `kind` ("attention", "fused_step") of `library` here:
    LINEAR_TRANSFORMERS_AUTO_KERNELS=always/never, else the stored verdict of `measure` (seconds of
    the compiled kernel and of the PyTorch path on a representative shape, run once per build,
    thread count and kind; the result is kept beside the library). A loss is said once per process."""
    policy = build.auto_policy()
    if policy != "measure":
        return policy == "always"
    loaded = _load(library)
    if loaded.build is None:
        return False
    what = f"{kind}@{torch.get_num_threads()}threads"
    key = (loaded.build.path, what)
    if key in _verdicts:  # the common case, on every call of "auto": no file read
        return _verdicts[key]
    with _lock:
        stored = build.read_verdict(loaded.build, what)
        if stored is None:
            try:
                kernel_s, pytorch_s = measure()
            except Exception as e:  # unverified is not faster: PyTorch, said once, measured again next process
                kernel_s, pytorch_s = float("nan"), float("nan")
                warnings.warn(f"timing the compiled {kind} kernel failed ({e!r})", RuntimeWarning, stacklevel=3)
            stored = {
                "kernel_ms": round(kernel_s * 1e3, 4),
                "pytorch_ms": round(pytorch_s * 1e3, 4),
                # a tie goes to the kernel: within 5% either choice is as fast, and a noisy
                # measurement must not keep a faster kernel off for good
                "faster": kernel_s <= VERDICT_TOLERANCE * pytorch_s,
                "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            }
            if kernel_s == kernel_s:  # (a failed measurement is not kept)
                build.store_verdict(loaded.build, what, stored)
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


# The verdict's shape: one training forward+backward at B=1, T=1024, H=8, D=64 (float32), ~5-10 ms.
VERDICT_SHAPE = (1, 1024, 8, 64)
VERDICT_TOLERANCE = 1.05


def _measure_attention() -> tuple[float, float]:
    from .. import chunked

    B, T, H, D = VERDICT_SHAPE
    g = torch.Generator().manual_seed(0)
    q, k = (torch.rand(B, T, H, D, generator=g) + 0.1 for _ in range(2))
    v, dy = (torch.randn(B, T, H, D, generator=g) for _ in range(2))
    S0, z0 = torch.zeros(B, H, D, D), torch.zeros(B, H, D)
    dS, dz = torch.zeros(B, H, D, D), torch.zeros(B, H, D)

    def fwd_bwd(forward, backward):
        def run():
            y, _, _, out_acc, *aux = forward(q, k, v, S0, z0, 1e-6, 64, True)
            backward(q, k, v, y, out_acc, *aux, dy, dS, dz, 1e-6, 64)

        return run

    kernel, pytorch = best_of([fwd_bwd(run_forward, run_backward), fwd_bwd(chunked.run_forward, chunked.run_backward)])
    return kernel, pytorch


@torch.compiler.assume_constant_result
def auto_uses_kernel() -> bool:
    """Whether "auto" takes the attention kernel for CPU tensors: it is built and beats "chunked" here."""
    return available() and verdict("attention", _measure_attention)


class _LtModel(ctypes.Structure):
    """Mirror of lt_model in model_step.c."""

    _fields_ = [
        *[(name, ctypes.c_int) for name in ("n_layers", "d", "n_heads", "dk", "dv", "dff", "pre_norm", "feature_map",
                                            "bf16")],
        ("ln_eps", ctypes.c_float),
        ("attn_eps", ctypes.c_float),
        *[(name, ctypes.POINTER(ctypes.c_void_p)) for name in ("ln1_w", "ln1_b", "qkv_w", "qkv_b", "out_w", "out_b",
                                                               "ln2_w", "ln2_b", "ff1_w", "ff1_b", "ff2_w", "ff2_b")],
        *[(name, ctypes.c_int) for name in ("vocab", "max_len", "n_params")],
        ("norm_eps", ctypes.c_float),
        *[(name, ctypes.c_void_p) for name in ("embed", "pos", "norm_w", "norm_b", "head_w", "head_b")],
    ]  # fmt: skip


FUSED_FEATURE_MAPS = {"elu": 0, "relu": 1}
# The mixture-of-logistics sampler's uniform draw, kept off 0 and 1 (heads.MixtureOfLogisticsHead.sample
# and FusedModelStep.sample_mol draw it alike, so both give the same tokens).
MOL_UNIFORM = (1e-7, 1 - 1e-7)
_MOL_NOT_FINITE = "mixture-of-logistics sampling: the head's parameters are not finite (NaN or inf)"


def has_bf16_dot() -> bool:
    """Whether the compiled step has bfloat16 dot products (the CPU has AVX512-BF16)."""
    lib = load_step()
    return bool(lib is not None and lib.lt_has_bf16_dot())


def has_amx() -> bool:
    """Whether bfloat16 dots in the batched layout (20 rows and more) run on AMX tiles: the kernel was
    built with AMX-BF16 and Linux granted this process the tile registers."""
    lib = load_step()
    return bool(lib is not None and lib.lt_has_amx())


class FusedModelStep:
    """One generation step of a causal linear transformer in one C call: token ids in, the
    parameters of the next token's distribution out (embedding and positions, all blocks, final
    norm, head).

    Built from the model's parameter tensors (float32, contiguous, CPU): `layers`, the blocks' (see
    WEIGHTS), and `io`, those around them (see IO; "pos", "norm_w" and "norm_b" may be None). It
    keeps references to them, so their memory outlives any reassignment; the model rebuilds it when
    its parameters move (CausalTransformer._apply). In-place updates (optimizer steps,
    load_state_dict) are seen.

    weights=torch.bfloat16 streams bfloat16 copies of the four projection weights (taken here: later
    updates are not seen) and widens them to float32 for float32 arithmetic. dot=torch.bfloat16 (with
    bfloat16 weights, on a CPU with AVX512-BF16) also rounds the activations entering those
    projections to bfloat16 and multiplies bfloat16 pairs, accumulating in float32: no widening
    (from 20 rows on, on AMX tiles where the CPU and the kernel allow it: has_amx()).
    The embedding, norms and head stay float32.
    """

    WEIGHTS = (
        "ln1_w",
        "ln1_b",
        "qkv_w",
        "qkv_b",
        "out_w",
        "out_b",
        "ln2_w",
        "ln2_b",
        "ff1_w",
        "ff1_b",
        "ff2_w",
        "ff2_b",
    )
    PROJECTIONS = ("qkv_w", "out_w", "ff1_w", "ff2_w")
    # sample_mol's tokens per C call: a call is uninterruptible, and one costs ~50 us more than its steps
    GENERATE_CHUNK = 64
    IO = ("embed", "pos", "norm_w", "norm_b", "head_w", "head_b")

    def __init__(
        self,
        layers: list[dict[str, torch.Tensor]],
        io: dict[str, torch.Tensor | None],
        *,
        n_heads: int,
        dk: int,
        dv: int,
        pre_norm: bool,
        feature_map: str,
        ln_eps: float,
        norm_eps: float,
        attn_eps: float,
        weights: torch.dtype = torch.float32,
        dot: torch.dtype = torch.float32,
    ) -> None:
        tensors = [t for layer in layers for t in layer.values()] + [t for t in io.values() if t is not None]
        if any(t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
            raise ValueError("FusedModelStep: every weight must be a contiguous float32 CPU tensor")
        if set(io) != set(self.IO) or any(io[k] is None for k in ("embed", "head_w", "head_b")):
            raise ValueError(f"FusedModelStep: io must map {', '.join(self.IO)} to tensors (pos and norm_*: or None)")
        if weights not in (torch.float32, torch.bfloat16):
            raise ValueError(f"FusedModelStep: weights must be torch.float32 or torch.bfloat16, got {weights}")
        if dot not in (torch.float32, torch.bfloat16):
            raise ValueError(f"FusedModelStep: dot must be torch.float32 or torch.bfloat16, got {dot}")
        if dot == torch.bfloat16:
            if weights != torch.bfloat16:
                raise ValueError("FusedModelStep: dot=torch.bfloat16 needs weights=torch.bfloat16")
            if not has_bf16_dot():
                level = build_info("model_step").level
                raise ValueError(
                    "FusedModelStep: dot=torch.bfloat16 needs a CPU with AVX512-BF16 (vdpbf16ps) and a kernel built "
                    f"for it (level x86-64-v4-amx or x86-64-v4-bf16); this one is built for {level}"
                )
            widths = {n: layers[0][n].shape[1] for n in self.PROJECTIONS}
            if any(w % 32 for w in widths.values()):
                raise ValueError(f"FusedModelStep: dot=torch.bfloat16 needs input widths divisible by 32, got {widths}")
        if weights == torch.bfloat16:  # copies of the four projections: half the bytes to stream per token
            layers = [{k: t.to(torch.bfloat16) if k in self.PROJECTIONS else t for k, t in layer.items()}
                      for layer in layers]  # fmt: skip
        self.layers, self.io = layers, dict(io)  # keeps every tensor the C side points into alive
        d, dff = layers[0]["ln1_w"].numel(), layers[0]["ff1_w"].shape[0]
        vocab, n_params = io["embed"].shape[0], io["head_w"].shape[0]
        max_len = io["pos"].shape[0] if io["pos"] is not None else 2**31 - 1
        self.arrays = {name: (ctypes.c_void_p * len(layers))(*[layer[name].data_ptr() for layer in layers])
                       for name in self.WEIGHTS}  # fmt: skip
        self.model = _LtModel(len(layers), d, n_heads, dk, dv, dff, int(pre_norm), FUSED_FEATURE_MAPS[feature_map],
                              2 if dot == torch.bfloat16 else int(weights == torch.bfloat16), ln_eps, attn_eps,
                              *[self.arrays[name] for name in self.WEIGHTS], vocab, max_len, n_params, norm_eps,
                              *[_ptr(io[name]) for name in self.IO])  # fmt: skip
        self.weights, self.dot = weights, dot
        self.vocab, self.max_len, self.n_params = vocab, max_len, n_params
        self.width = n_heads * (2 * dk + dv) + n_heads * dv + dff + 2 * d
        self._work: torch.Tensor | None = None
        self._states: tuple[tuple[int, ...], ctypes.Array, ctypes.Array] | None = None

    def _prepare(self, B: int, S: list[torch.Tensor], z: list[torch.Tensor]) -> tuple[ctypes.Array, ctypes.Array]:
        self._check_states(B, S, z)
        padded = -(-B // 16) * 16  # the C step's shared buffers hold B rounded up to 16 rows
        if self._work is None or self._work.numel() < padded * self.width:
            self._work = torch.empty(padded * self.width, dtype=torch.float32)
        key = tuple(t.data_ptr() for t in S) + tuple(t.data_ptr() for t in z)
        if self._states is None or self._states[0] != key:  # the pointer arrays, rebuilt when the state moves
            n = len(S)
            self._states = key, (ctypes.c_void_p * n)(*key[:n]), (ctypes.c_void_p * n)(*key[n:])
        return self._states[1], self._states[2]

    def _check_states(self, B: int, S: list[torch.Tensor], z: list[torch.Tensor]) -> None:
        """The C step writes B rows of every layer's state in place: each must be exactly that
        (a wrong batch, a view or a replaced tensor would be written out of bounds)."""
        H, dk, dv, L = self.model.n_heads, self.model.dk, self.model.dv, self.model.n_layers
        if B < 1:
            raise ValueError(f"fused model step: the token batch must hold at least one token, got {B}")
        if len(S) != L or len(z) != L:
            raise ValueError(f"fused model step: one state per layer ({L}), got {len(S)} S and {len(z)} z")
        for layer, (s, zz) in enumerate(zip(S, z, strict=True)):
            for name, t, shape in (("S", s, (B, H, dk, dv)), ("z", zz, (B, H, dk))):
                if t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                    raise ValueError(
                        f"fused model step: layer {layer}'s state {name} must be a contiguous float32 CPU tensor "
                        f"of shape {list(shape)} for a batch of {B} tokens, got {t.dtype} {list(t.shape)} on "
                        f"{t.device}{'' if t.is_contiguous() else ', not contiguous'}"
                    )

    def _check(self, status: int, tokens: torch.Tensor, position: int) -> None:
        if status == 2:
            raise ValueError(
                f"fused model step: tokens must lie in [0, {self.vocab}) and the position in [0, {self.max_len}), "
                f"got tokens in [{int(tokens.min())}, {int(tokens.max())}] at position {position}"
            )
        if status:
            raise MemoryError("fused model step: out of memory for its per-thread buffers")

    def __call__(self, tokens: torch.Tensor, position: int, S: list[torch.Tensor], z: list[torch.Tensor]):
        """tokens [B] (int64) at `position` -> the head's parameters [B, n_params] for the next token;
        S [B, H, Dk, Dv] and z [B, H, Dk] (contiguous float32, one per block) are updated in place."""
        if tokens.dim() != 1:
            raise ValueError(f"fused model step: tokens must be [B], got shape {list(tokens.shape)}")
        B = tokens.shape[0]
        tokens = tokens.to(torch.int64).contiguous()
        S_ptrs, z_ptrs = self._prepare(B, S, z)
        params = torch.empty(B, self.n_params, dtype=torch.float32)
        status = load_step().lt_model_token_f32(ctypes.byref(self.model), B, tokens.data_ptr(), position, S_ptrs,
                                                z_ptrs, self._work.data_ptr(), params.data_ptr())  # fmt: skip
        self._check(status, tokens, position)
        return params

    def sample_mol(
        self,
        first: torch.Tensor,
        position: int,
        S: list[torch.Tensor],
        z: list[torch.Tensor],
        n: int,
        levels: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generation with a mixture-of-logistics head at temperature 1, n tokens after `first` [B]
        (the token at `position`), in C calls of GENERATE_CHUNK tokens (lt_generate_mol_f32): per
        token the C step, then the head sampled in C from PyTorch's draws, race [B, K] ~ Exp(1)
        then u [B] ~ U(MOL_UNIFORM) from `generator`, all drawn first in that order, token by token.
        The same draws in the same order as stepping the model and calling
        MixtureOfLogisticsHead.sample each time, so the same tokens. Returns [n, B] (int64); S and z
        advance by n tokens (the last one sampled is not fed)."""
        if levels > self.vocab or position + n > self.max_len:
            raise ValueError(
                f"fused model step: {n} tokens from position {position} with {levels} levels need "
                f"position + n <= {self.max_len} and levels <= {self.vocab}"
            )
        B, K = first.shape[0], self.n_params // 3
        out = torch.empty(n + 1, B, dtype=torch.int64)
        out[0] = first
        race, u = torch.empty(n, B, K), torch.empty(n, B)
        for r, v in zip(race, u, strict=True):  # per token, as MixtureOfLogisticsHead.sample draws them
            r.exponential_(generator=generator)
            v.uniform_(*MOL_UNIFORM, generator=generator)
        params = torch.empty(B, self.n_params, dtype=torch.float32)
        S_ptrs, z_ptrs = self._prepare(B, S, z)
        lib, model, work, done = load_step(), ctypes.byref(self.model), self._work.data_ptr(), ctypes.c_int(0)
        for t in range(0, n, self.GENERATE_CHUNK):  # Python between chunks: Ctrl-C is seen
            k = min(self.GENERATE_CHUNK, n - t)
            status = lib.lt_generate_mol_f32(model, B, out[t].data_ptr(), position + t, k, S_ptrs, z_ptrs, work,
                                             params.data_ptr(), K, levels, race[t].data_ptr(), u[t].data_ptr(),
                                             ctypes.byref(done))  # fmt: skip
            if status == 3:
                raise ValueError(f"{_MOL_NOT_FINITE} (token {t + done.value + 1} of {n})")
            self._check(status, out[t], position + t)
        return out[1:]


def read_f32(tensors: list[torch.Tensor], passes: int = 1) -> float:
    """Read float32 CPU tensors (contiguous) `passes` times in one parallel region with the fused
    step's threads, the way its GEMVs read weights; returns their sum (the mean over passes).
    bench generate times 784 passes against a 784-token image: the bandwidth floor of generation
    at batch 1."""
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        raise ValueError("read_f32: tensors must be contiguous float32 CPU tensors")
    if passes < 1:
        raise ValueError(f"read_f32: passes must be >= 1, got {passes}")
    ptrs = (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_long * len(tensors))(*[t.numel() for t in tensors])
    return load_step().lt_read_f32(len(tensors), ptrs, sizes, passes)


def mol_sample(params: torch.Tensor, race: torch.Tensor, u: torch.Tensor, levels: int) -> torch.Tensor:
    """Levels [B] (int64) drawn from the discretised mixtures params [B, 3K] with the given random
    numbers race [B, K] ~ Exp(1) and u [B] ~ U(0, 1): MixtureOfLogisticsHead.sample's arithmetic
    in one C call (all float32 contiguous CPU tensors)."""
    B, K = race.shape
    shapes = {"params": (params, (B, 3 * K)), "race": (race, (B, K)), "u": (u, (B,))}
    for name, (t, shape) in shapes.items():
        if t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"mol_sample: {name} must be a contiguous float32 CPU tensor {list(shape)}, got "
                             f"{t.dtype} {list(t.shape)} on {t.device}")  # fmt: skip
    out = torch.empty(B, dtype=torch.int64)
    status = load_step().lt_mol_sample_f32(B, K, levels, params.data_ptr(), race.data_ptr(), u.data_ptr(),
                                            out.data_ptr())  # fmt: skip
    if status < 0:
        raise ValueError(f"mol_sample: levels must be >= 2 and K >= 1, got {levels} and {K}")
    if status:
        raise ValueError(_MOL_NOT_FINITE)
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _call(name: str, dtype: torch.dtype, *args) -> None:
    lib = load()
    if lib is None:
        raise RuntimeError(f"the CPU kernel is unavailable: {unavailable_reason()}")
    suffix = "f64" if dtype == torch.float64 else "f32"
    status = getattr(lib, f"{name}_{suffix}")(*args)
    if status == 2:
        B, T, H, Dk, Dv, C = args[-8:-2] if name == "cla_forward" else args[-7:-1]
        raise ValueError(
            f"causal linear attention CPU kernel ({name}): sizes out of range, got B={B} T={T} H={H} Dk={Dk} Dv={Dv} "
            f"chunk={C} (each >= 1; Dk, Dv and the chunk below 2**29)"
        )
    if status:
        raise MemoryError(f"causal linear attention CPU kernel ({name}): out of memory for its chunk buffers")


def aux_shapes(B: int, T: int, H: int, Dk: int, Dv: int, C: int) -> tuple[tuple[int, ...], ...]:
    """What run_forward keeps for the backward: S and z entering every chunk, the normaliser."""
    N = -(-T // C)
    return (B, H, N, Dk, Dv), (B, H, N, Dk), (B, H, T)


def run_forward(q, k, v, S0, z0, eps: float, C: int, save: bool):
    """-> (y, S_final, z_final, out_acc, S_save, z_save, den) (the last four empty unless needed)."""
    acc = accumulation_dtype(q.dtype)
    q_, k_, v_ = (x.to(acc).contiguous() for x in (q, k, v))
    B, T, H, Dk = q_.shape
    Dv = v_.shape[-1]
    out = torch.empty(B, T, H, Dv, dtype=acc)
    S_final = torch.empty(B, H, Dk, Dv, dtype=acc)
    z_final = torch.empty(B, H, Dk, dtype=acc)
    shapes = aux_shapes(B, T, H, Dk, Dv, C)
    S_save, z_save, den = (torch.empty(shape, dtype=acc) if save else None for shape in shapes)
    # (bound to names: a temporary made inside the call's arguments could be freed before the C
    # call reads it, leaving a dangling pointer)
    S0_, z0_ = S0.contiguous(), z0.contiguous()
    _call(
        "cla_forward", acc,
        *map(_ptr, (q_, k_, v_, S0_, z0_, out, S_final, z_final, S_save, z_save, den)),
        B, T, H, Dk, Dv, C, eps, torch.get_num_threads(),
    )  # fmt: skip
    y = out.to(q.dtype)

    out_acc = out if (save and y is not out) else None
    return forward_result(y, S_final, z_final, out_acc, (S_save, z_save, den) if save else None, like=out)


def run_backward(q, k, v, y, out_acc, S_save, z_save, den, dy, dS_final, dz_final, eps: float, C: int):
    """Gradients of run_forward: (dq, dk, dv, dS0, dz0)."""
    acc = S_save.dtype
    q_, k_, v_ = (x.to(acc).contiguous() for x in (q, k, v))
    out = (out_acc if out_acc.numel() else y).to(acc).contiguous()
    B, T, H, Dk = q_.shape
    Dv = v_.shape[-1]
    dy_, dS_, dz_ = (x.to(acc).contiguous() for x in (dy, dS_final, dz_final))
    dq, dk, dv = torch.empty_like(q_), torch.empty_like(k_), torch.empty_like(v_)
    dS0, dz0 = torch.empty(B, H, Dk, Dv, dtype=acc), torch.empty(B, H, Dk, dtype=acc)
    _call(
        "cla_backward", acc,
        *map(_ptr, (q_, k_, v_, out, dy_, S_save, z_save, den, dS_, dz_, dq, dk, dv, dS0, dz0)),
        B, T, H, Dk, Dv, C, torch.get_num_threads(),
    )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dS0, dz0
