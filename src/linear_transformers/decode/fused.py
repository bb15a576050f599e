"""The fused generation step: one C call (model_step.c) runs a whole causal linear transformer for
one token, from the token ids to the parameters of the next token's distribution; and the mixture-
of-logistics sampler in C, so a whole image can be generated in a few calls.

The library is built and loaded by `linear_transformers.native` (per ISA level, cached; OpenMP
where the compiler has it). This module knows the C side's layout (`_LtModel`); `from_model`
takes a model's weights by role from its `step_weights()` (StepWeights): this module never reads
a model's internals.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import native
from ..native import ptr as _ptr
from .llama import FORMATS, convert

LIBRARY = "model_step"


def _set_signatures(lib: ctypes.CDLL) -> None:
    ptr, c_int = ctypes.c_void_p, ctypes.c_int
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
    lib.lt_model_layout.argtypes = [ctypes.POINTER(ctypes.c_long), c_int]
    lib.lt_model_layout.restype = c_int
    check_layout(lib)


def check_layout(lib: ctypes.CDLL) -> None:
    """_LtModel must be lt_model (model_step.h) byte for byte; a mismatch fails the load, not a step."""
    native.check_struct(lib.lt_model_layout, _LtModel, "lt_model in model_step.h")


SOURCES = [
    Path(__file__).parent / name
    for name in ("model_step.h", "model_step.c", "mol_sample.c", "read_probe.c", "vec.h", "gemv.h")
]
native.register(LIBRARY, [*SOURCES, native.SIMD_H], "any", _set_signatures)


def load() -> ctypes.CDLL | None:
    """The fused model step library, building it on first call; None if it cannot be built."""
    return native.load(LIBRARY).lib


def available() -> bool:
    """Whether the fused model step library is built and loaded."""
    return load() is not None


def unavailable_reason() -> str | None:
    return native.load(LIBRARY).error


# A block's weights, in lt_model's order (model_step.h): one pointer per layer each
LAYER_WEIGHTS = (
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


class _LtModel(ctypes.Structure):
    """Mirror of lt_model in model_step.h (checked against the library's own layout when it loads)."""

    _fields_ = [
        *[
            (name, ctypes.c_int)
            for name in ("n_layers", "d", "n_heads", "dk", "dv", "dff", "pre_norm", "feature_map", "bf16")
        ],
        ("ln_eps", ctypes.c_float),
        ("attn_eps", ctypes.c_float),
        *[(name, ctypes.POINTER(ctypes.c_void_p)) for name in LAYER_WEIGHTS],
        *[(name, ctypes.c_int) for name in ("vocab", "max_len", "n_params")],
        ("norm_eps", ctypes.c_float),
        *[(name, ctypes.c_void_p) for name in ("embed", "pos", "norm_w", "norm_b", "head_w", "head_b")],
    ]


# feature maps the C step computes (name -> its code in model_step.c)
FEATURE_MAPS = {"elu": 0, "relu": 1}
_MOL_NOT_FINITE = "mixture-of-logistics sampling: the head's parameters are not finite (NaN or inf)"


def has_bf16_dot() -> bool:
    """Whether the compiled step has bfloat16 dot products (the CPU has AVX512-BF16)."""
    lib = load()
    return bool(lib is not None and lib.lt_has_bf16_dot())


def has_amx() -> bool:
    """Whether bfloat16 dots in the batched layout (20 rows and more) run on AMX tiles: the kernel was
    built with AMX-BF16 and Linux granted this process the tile registers."""
    lib = load()
    return bool(lib is not None and lib.lt_has_amx())


class FusedModelStep:
    """One generation step of a causal linear transformer in one C call: token ids in, the
    parameters of the next token's distribution out (embedding and positions, all blocks, final
    norm, head).

    Built from the model's parameter tensors (float32, contiguous, CPU): `layers`, the blocks' (see
    WEIGHTS), and `io`, those around them (see IO; "pos", "norm_w" and "norm_b" may be None). It
    keeps references to them, so their memory outlives any reassignment; decode.fused_step_for rebuilds
    it whenever the model's weights are other tensors or at other addresses (weights_key). In-place
    updates (optimizer steps, load_state_dict) are seen.

    weights=torch.bfloat16 streams bfloat16 copies of the four projection weights (taken here: later
    updates are not seen) and widens them to float32 for float32 arithmetic; torch.int8 streams
    int8 copies (symmetric, one scale per output row: decode.llama.quantize_int8), widened the same
    way (the row layout at every batch). dot=torch.bfloat16 (with
    bfloat16 weights, on a CPU with AVX512-BF16) also rounds the activations entering those
    projections to bfloat16 and multiplies bfloat16 pairs, accumulating in float32: no widening
    (from 20 rows on, on AMX tiles where the CPU and the kernel allow it: has_amx()). dot=torch.int8
    (with int8 weights) rounds those activations to int8 per block of 32 and sums the int8 products
    in int32 (gemv.h's gemv_i8dot; AVX512-VNNI where the CPU has it), the row layout at every batch.
    The embedding, norms and head stay float32.
    """

    WEIGHTS = LAYER_WEIGHTS
    PROJECTIONS = ("qkv_w", "out_w", "ff1_w", "ff2_w")
    # sample_mol's tokens per C call in generation: long enough to spread a call's fixed cost, short
    # enough that Ctrl-C is seen between calls
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
        if weights not in (torch.float32, torch.bfloat16, torch.int8):
            raise ValueError(
                f"FusedModelStep: weights must be torch.float32, torch.bfloat16 or torch.int8, got {weights}"
            )
        if dot not in (torch.float32, torch.bfloat16, torch.int8):
            raise ValueError(f"FusedModelStep: dot must be torch.float32, torch.bfloat16 or torch.int8, got {dot}")
        if dot != torch.float32:  # bfloat16 pairs or int8 groups: whole blocks of 32 inputs
            if weights != dot:
                raise ValueError(f"FusedModelStep: dot={dot} needs weights={dot}")
            if dot == torch.bfloat16 and not has_bf16_dot():
                level = native.build_info(LIBRARY).level
                raise ValueError(
                    "FusedModelStep: dot=torch.bfloat16 needs a CPU with AVX512-BF16 (vdpbf16ps) and a kernel built "
                    f"for it (level x86-64-v4-amx or x86-64-v4-bf16); this one is built for {level}"
                )
            widths = {n: layers[0][n].shape[1] for n in self.PROJECTIONS}
            if any(w % 32 for w in widths.values()):
                raise ValueError(f"FusedModelStep: dot={dot} needs input widths divisible by 32, got {widths}")
        d, dff = layers[0]["ln1_w"].numel(), layers[0]["ff1_w"].shape[0]  # (before any flat int8 copy)
        if weights != torch.float32:  # copies of the four projections: a half (bfloat16) or a quarter (int8) of
            # the bytes to stream per token
            layers = [
                {k: convert(t, weights) if k in self.PROJECTIONS else t for k, t in layer.items()} for layer in layers
            ]
        self.layers, self.io = layers, dict(io)  # keeps every tensor the C side points into alive
        vocab, n_params = io["embed"].shape[0], io["head_w"].shape[0]
        max_len = io["pos"].shape[0] if io["pos"] is not None else 2**31 - 1
        self.arrays = {
            name: (ctypes.c_void_p * len(layers))(*[layer[name].data_ptr() for layer in layers])
            for name in self.WEIGHTS
        }
        self.model = _LtModel(
            len(layers),
            d,
            n_heads,
            dk,
            dv,
            dff,
            int(pre_norm),
            FEATURE_MAPS[feature_map],
            FORMATS[(weights, dot)],
            ln_eps,
            attn_eps,
            *[self.arrays[name] for name in self.WEIGHTS],
            vocab,
            max_len,
            n_params,
            norm_eps,
            *[_ptr(io[name]) for name in self.IO],
        )
        self.weights, self.dot = weights, dot
        self.vocab, self.max_len, self.n_params = vocab, max_len, n_params
        self.width = n_heads * (2 * dk + dv) + n_heads * dv + dff + 2 * d
        self.key: tuple | None = None  # what from_model built it from (weights_key)
        self.generation = -1  # (from_model sets these for `current`)
        self.sources: list[torch.Tensor] = []
        self.source_ptrs: list[int] = []
        self.source_versions: list[int] | None = None
        self._work: torch.Tensor | None = None
        self._states: tuple[tuple[int, ...], ctypes.Array, ctypes.Array] | None = None

    def current(self) -> bool:
        """Cheaply, whether the model still holds the tensors this step was built from, at the same
        addresses (and, for bfloat16 copies, unchanged): no module got a new parameter or submodule
        since (_generation), and no parameter's `.data` was replaced (its address)."""
        if self.generation != _generation:
            return False
        if any(t.data_ptr() != p for t, p in zip(self.sources, self.source_ptrs, strict=True)):
            return False
        return self.source_versions is None or [t._version for t in self.sources] == self.source_versions

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
        status = load().lt_model_token_f32(
            ctypes.byref(self.model),
            B,
            tokens.data_ptr(),
            position,
            S_ptrs,
            z_ptrs,
            self._work.data_ptr(),
            params.data_ptr(),
        )
        self._check(status, tokens, position)
        return params

    def sample_mol(
        self,
        first: torch.Tensor,
        position: int,
        S: list[torch.Tensor],
        z: list[torch.Tensor],
        race: torch.Tensor,
        u: torch.Tensor,
        levels: int,
    ) -> torch.Tensor:
        """n tokens of a mixture-of-logistics head at temperature 1 after `first` [B] (the token at
        `position`), in one C call (lt_generate_mol_f32): per token the C step, then the head sampled
        with that token's random numbers, race[i] [B, K] ~ Exp(1) and u[i] [B] ~ U(0, 1) (drawn by
        MixtureOfLogisticsHead.draw; n = len(race)), with MixtureOfLogisticsHead.sample_drawn's
        arithmetic. Returns [n, B] (int64); S and z advance by n tokens (the last one sampled is not
        fed). A call cannot be interrupted: callers keep n to GENERATE_CHUNK or so."""
        n, B, K = race.shape[0], first.shape[0], self.n_params // 3
        for name, t, shape in (("race", race, (n, B, K)), ("u", u, (n, B))):
            if t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(
                    f"fused model step: {name} must be a contiguous float32 CPU tensor {list(shape)}, "
                    f"got {t.dtype} {list(t.shape)} on {t.device}"
                )
        if levels > self.vocab or position + n > self.max_len:
            raise ValueError(
                f"fused model step: {n} tokens from position {position} with {levels} levels need "
                f"position + n <= {self.max_len} and levels <= {self.vocab}"
            )
        out = torch.empty(n + 1, B, dtype=torch.int64)
        out[0] = first
        params = torch.empty(B, self.n_params, dtype=torch.float32)
        S_ptrs, z_ptrs = self._prepare(B, S, z)
        done = ctypes.c_int(0)
        status = load().lt_generate_mol_f32(
            ctypes.byref(self.model),
            B,
            out.data_ptr(),
            position,
            n,
            S_ptrs,
            z_ptrs,
            self._work.data_ptr(),
            params.data_ptr(),
            K,
            levels,
            race.data_ptr(),
            u.data_ptr(),
            ctypes.byref(done),
        )
        if status == 3:
            raise ValueError(f"{_MOL_NOT_FINITE} (token {done.value + 1} of {n})")
        self._check(status, out[0], position)
        return out[1:]


def mol_sample(params: torch.Tensor, race: torch.Tensor, u: torch.Tensor, levels: int) -> torch.Tensor:
    """Levels [B] (int64) drawn from the discretised mixtures params [B, 3K] with the given random
    numbers race [B, K] ~ Exp(1) and u [B] ~ U(0, 1): MixtureOfLogisticsHead.sample's arithmetic
    in one C call (all float32 contiguous CPU tensors)."""
    B, K = race.shape
    shapes = {"params": (params, (B, 3 * K)), "race": (race, (B, K)), "u": (u, (B,))}
    for name, (t, shape) in shapes.items():
        if t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(
                f"mol_sample: {name} must be a contiguous float32 CPU tensor {list(shape)}, got "
                f"{t.dtype} {list(t.shape)} on {t.device}"
            )
    out = torch.empty(B, dtype=torch.int64)
    status = load().lt_mol_sample_f32(B, K, levels, params.data_ptr(), race.data_ptr(), u.data_ptr(), out.data_ptr())
    if status < 0:
        raise ValueError(f"mol_sample: levels must be >= 2 and K >= 1, got {levels} and {K}")
    if status:
        raise ValueError(_MOL_NOT_FINITE)
    return out


@dataclass
class StepWeights:
    """A model's weights by role, as the fused step reads them, and the sizes it needs: what a model
    offers the fused step (`step_weights()`), so that this module never reads its internals.

    layers: per block, WEIGHTS -> tensor; io: IO -> tensor ("pos", "norm_w", "norm_b" may be None).
    """

    layers: list[dict[str, torch.Tensor]]
    io: dict[str, torch.Tensor | None]
    n_heads: int
    dk: int
    dv: int
    pre_norm: bool
    feature_map: str
    ln_eps: float
    norm_eps: float
    attn_eps: float


def computes(model) -> bool:
    """Whether the C step computes what `model` does (its step_weights() is not None)."""
    return model.step_weights() is not None


def _flat(w: StepWeights) -> list[torch.Tensor | None]:
    return [t for layer in w.layers for t in layer.values()] + list(w.io.values())


# Bumped whenever any module in the process gets a new parameter, buffer or submodule (assign=True loads,
# adapters, `m.weight = nn.Parameter(...)`): a fused step built at the same count, whose tensors still
# sit at the same addresses, is current without walking the model (`FusedModelStep.current`).
_generation = 0


def _bump(*args) -> None:
    global _generation
    _generation += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump)
torch.nn.modules.module.register_module_module_registration_hook(_bump)
torch.nn.modules.module.register_module_buffer_registration_hook(_bump)  # (a grown position table)


def current_generation() -> int:
    return _generation


def weights_key(model, bf16_copies: bool) -> tuple | None:
    """What a fused step over `model` depends on, now: each weight tensor's identity and address
    (and, where the step holds bfloat16 copies, its version counter, which every in-place update
    bumps), or None where the C step does not compute the model. A step whose key differs from the
    model's current one is rebuilt before it is called: replacing a parameter
    (load_state_dict(assign=True), a new nn.Parameter, `.data =`) can never leave it reading old
    or freed memory."""
    found = model.step_weights()
    if found is None:
        return None
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version if bf16_copies else 0) for t in _flat(found))


def from_model(model, weights: torch.dtype = torch.float32, dot: torch.dtype = torch.float32) -> FusedModelStep | None:
    """The fused step over `model`'s parameters (in-place updates are seen with float32 weights), or
    None where they are not all contiguous float32 CPU tensors or the C step does not compute the
    model. The step holds detached views of every tensor it points into, so their memory stays
    alive whatever happens to the parameters; `key` records what it was built from (weights_key)."""
    found = model.step_weights()
    if found is None:
        return None
    key = weights_key(model, weights != torch.float32)
    if any(
        t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous())
        for t in _flat(found)
    ):
        return None
    layers = [{k: t.detach() for k, t in layer.items()} for layer in found.layers]
    io = {k: None if t is None else t.detach() for k, t in found.io.items()}
    step = FusedModelStep(
        layers,
        io,
        n_heads=found.n_heads,
        dk=found.dk,
        dv=found.dv,
        pre_norm=found.pre_norm,
        feature_map=found.feature_map,
        ln_eps=found.ln_eps,
        norm_eps=found.norm_eps,
        attn_eps=found.attn_eps,
        weights=weights,
        dot=dot,
    )
    step.key = key
    step.generation = _generation
    step.sources = [t for t in _flat(found) if t is not None]
    step.source_ptrs = [t.data_ptr() for t in step.sources]
    step.source_versions = [t._version for t in step.sources] if weights != torch.float32 else None
    return step
