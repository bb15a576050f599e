"""The fused generation step for linearised Llama-style models (llama_step.c): one C call per token
from the token ids to the logits, with the weights in float32, bfloat16 or int8 (and bfloat16 or int8
dot products).

A model offers its weights by role (`LlamaWeights`, built by linearize.hf.llama_weights for any
Llama-style model that linearize converted); `FusedLlamaStep` holds them (or their bfloat16 / int8
copies) and steps the recurrent state that linearize.LinearizedCache keeps (one HybridState per
layer, updated in place). The layout of the C struct is declared once, in llama_step.h, and checked
against the library's own when it loads.
"""

from __future__ import annotations

import ctypes
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .. import native

LIBRARY = "llama_step"
_HERE = Path(__file__).parent
SOURCES = [_HERE / name for name in ("llama_step.h", "llama_step.c", "token_sample.c", "vec.h", "gemv.h")]

MODES = {"linear": 0, "hybrid": 1, "window": 2}
FEATURE_MAPS = {"hedgehog": 0, "elu": 1, "relu": 2}
# DecodeConfig's (weights, dot) -> the C side's weight format
FORMATS = {
    (torch.float32, torch.float32): 0,
    (torch.bfloat16, torch.float32): 1,
    (torch.bfloat16, torch.bfloat16): 2,
    (torch.int8, torch.float32): 3,
    (torch.int8, torch.int8): 4,
}
I8_BLOCK = 32  # int8 dot products round the projections' inputs per block of this many (gemv.h's LT_I8_BLOCK)
PER_LAYER = ("attn_norm", "mlp_norm", "wq", "wk", "wv", "wo", "wg", "wu", "wd")
BIASES = ("bq", "bk", "bv", "bo")
HEDGEHOG = ("fq_w", "fq_b", "fk_w", "fk_b")
PROJECTIONS = ("wq", "wk", "wv", "wo", "wg", "wu", "wd")


class _LtLlama(ctypes.Structure):
    """Mirror of lt_llama in llama_step.h (checked against the library's layout when it loads)."""

    _fields_ = [
        *[
            (n, ctypes.c_int)
            for n in (
                "n_layers",
                "d",
                "n_heads",
                "n_kv_heads",
                "head_dim",
                "dff",
                "vocab",
                "mode",
                "feature_map",
                "n_features",
                "hh_m",
                "window",
                "sinks",
                "wkind",
                "amx_rows",
            )
        ],
        *[(n, ctypes.c_float) for n in ("rms_eps", "attn_eps", "rope_scale")],
        ("inv_freq", ctypes.c_void_p),
        *[(n, ctypes.POINTER(ctypes.c_void_p)) for n in (*PER_LAYER, *BIASES, *HEDGEHOG)],
        *[(n, ctypes.c_void_p) for n in ("embed", "final_norm", "head")],
    ]


def check_layout(lib: ctypes.CDLL) -> None:
    """_LtLlama must be lt_llama (llama_step.h) byte for byte; a mismatch fails the load, not a step."""
    native.check_struct(lib.lt_llama_layout, _LtLlama, "lt_llama in llama_step.h")


def _set_signatures(lib: ctypes.CDLL) -> None:
    ptr = ctypes.c_void_p
    lib.lt_llama_layout.argtypes = [ctypes.POINTER(ctypes.c_long), ctypes.c_int]
    lib.lt_llama_layout.restype = ctypes.c_int
    lib.lt_llama_work_size.argtypes = [ctypes.POINTER(_LtLlama), ctypes.c_int]
    lib.lt_llama_work_size.restype = ctypes.c_long
    lib.lt_llama_token_f32.argtypes = [
        ctypes.POINTER(_LtLlama),
        ctypes.c_int,
        ptr,
        ptr,
        ptr,
        *[ptr] * 6,
        ptr,
        ctypes.c_long,
        ptr,
    ]
    lib.lt_llama_token_f32.restype = ctypes.c_int
    lib.lt_llama_gemv_f32.argtypes = [*[ctypes.c_int] * 5, ptr, ptr, ptr, ptr]
    lib.lt_llama_gemv_f32.restype = ctypes.c_int
    lib.lt_llama_tiles.argtypes = [ctypes.c_int]
    lib.lt_llama_tiles.restype = ctypes.c_int
    lib.lt_sample_tokens_f32.argtypes = [
        ctypes.c_int,
        ctypes.c_long,
        ptr,
        ctypes.c_float,
        ctypes.c_long,
        ctypes.c_float,
        ptr,
        ptr,
        ctypes.c_long,
        ptr,
    ]
    lib.lt_sample_tokens_f32.restype = ctypes.c_int
    check_layout(lib)


native.register(LIBRARY, [*SOURCES, native.SIMD_H], "any", _set_signatures)


def load() -> ctypes.CDLL | None:
    return native.load(LIBRARY).lib


def has_tiles(weights: torch.dtype, dot: torch.dtype) -> bool:
    """Whether the (weights, dot) format runs on AMX tiles here (batched rows, from
    FusedLlamaStep.TILE_ROWS[dot] on): bfloat16 dots with AMX-BF16, int8 dots with AMX-INT8, in a build for
    them (level x86-64-v4-amx) and with the tile registers granted to this process by Linux."""
    lib = load()
    return bool(lib is not None and (weights, dot) in FORMATS and lib.lt_llama_tiles(FORMATS[(weights, dot)]))


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    return native.load(LIBRARY).error


@dataclass
class LlamaWeights:
    """A linearised Llama-style model's weights by role, as the C step reads them (a model's
    `step_weights()`), and its sizes. layers: per layer, PER_LAYER -> tensor, BIASES -> tensor or
    None, HEDGEHOG -> tensor or None; embed [vocab, d]; head [vocab, d] (the embedding itself when
    tied); inv_freq [head_dim / 2] (RoPE)."""

    layers: list[dict[str, torch.Tensor | None]]
    embed: torch.Tensor
    final_norm: torch.Tensor
    head: torch.Tensor
    inv_freq: torch.Tensor
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mode: str
    feature_map: str
    window: int
    sinks: int
    rms_eps: float
    attn_eps: float
    rope_scale: float = 1.0

    def tensors(self) -> list[torch.Tensor]:
        found = [t for layer in self.layers for t in layer.values() if t is not None]
        return [*found, self.embed, self.final_norm, self.head, self.inv_freq]


def quantize_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one float32 scale per slice along dim 1: a projection [out, in] gets a scale
    per output row, Hedgehog weights [H, D, m] one per (head, column). The int8 tensor then its scales
    (dim 1 dropped), as one flat int8 tensor (llama_step.h's LT_I8 layout). scale = max|slice| / 127; a
    zero slice gets scale 1."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale.unsqueeze(1)), -127, 127).to(torch.int8)
    return torch.cat([q.reshape(-1), scale.contiguous().view(torch.int8).reshape(-1)])


def dequantize_int8(packed: torch.Tensor, *shape: int) -> torch.Tensor:
    """The float32 tensor of `shape` ([out, in] or [H, D, m]) an int8 packing stands for (tests; the C
    side never widens it whole)."""
    n = math.prod(shape)
    scale = packed[n:].clone().view(torch.float32)  # (clone: the scales may be unaligned)
    return packed[:n].view(*shape).float() * scale.view(shape[0], 1, *shape[2:])


def quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gemv.h's quantize_input: x [..., n] float32 (n a multiple of I8_BLOCK) rounded to int8 per block of
    I8_BLOCK, symmetric: (x_q [..., n] int8 values as float32, scales [..., n / I8_BLOCK]), x ~ x_q * scale."""
    b = x.detach().float().reshape(*x.shape[:-1], -1, I8_BLOCK)
    top = b.abs().amax(-1, keepdim=True)
    inv = torch.where(top > 0, torch.tensor(127.0) / top, torch.zeros_like(top))
    q = torch.clamp(torch.round(b * inv), -127, 127)
    return q.reshape(x.shape), (top / 127.0).squeeze(-1)


def int8_dot_reference(packed: torch.Tensor, n_out: int, n_in: int, x: torch.Tensor) -> torch.Tensor:
    """What an int8-dot projection computes, in float64: x [..., n_in] -> [..., n_out], the int8 weights
    times the input rounded by quantize_input, each block's integer sum times its scale (tests)."""
    q = packed[: n_out * n_in].view(n_out, n_in).double()
    scale = packed[n_out * n_in :].clone().view(torch.float32).double()
    xq, s = quantize_input(x)
    per_block = torch.einsum(
        "...bi,obi->...ob", xq.double().reshape(*x.shape[:-1], -1, I8_BLOCK), q.view(n_out, -1, I8_BLOCK)
    )
    return (per_block * s.double()[..., None, :]).sum(-1) * scale


def convert(w: torch.Tensor, weights: torch.dtype) -> torch.Tensor:
    """A projection [out, in], or Hedgehog weights [H, D, m], in the step's weight format (a copy
    unless float32). The maps are read once a token like the projections, so they follow them."""
    w = w.detach()
    if weights == torch.float32:
        return w
    if weights == torch.bfloat16:
        return w.to(torch.bfloat16).contiguous()
    return quantize_int8(w)


def project(
    x: torch.Tensor,
    w: torch.Tensor,
    weights: torch.dtype = torch.float32,
    dot: torch.dtype = torch.float32,
    bias: torch.Tensor | None = None,
    tiles: bool = False,
) -> torch.Tensor:
    """One projection as the fused step computes it: x [B, n_in] float32, w [n_out, n_in] float32 taken
    to the (weights, dot) format (convert) -> [B, n_out] (tests and benchmarks; one thread); on AMX
    tiles with `tiles` (formats for which has_tiles() holds)."""
    if (weights, dot) not in FORMATS:
        raise ValueError(f"project: (weights, dot) must be one of {sorted(map(str, FORMATS))}, got ({weights}, {dot})")
    lib = load()
    if lib is None:
        raise RuntimeError(f"project: the C step is unavailable: {unavailable_reason()}")
    if tiles and not has_tiles(weights, dot):
        raise ValueError(f"project: ({weights}, {dot}) has no AMX tiles here (has_tiles)")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or (bias is not None and bias.shape != w.shape[:1]):
        raise ValueError(f"project: x [B, n] and w [m, n] (bias [m]) expected, got {list(x.shape)}, {list(w.shape)}")
    x = x.detach().float().contiguous()
    packed = convert(w.detach().float().contiguous(), weights)
    b = None if bias is None else bias.detach().float().contiguous()
    y = torch.empty(x.shape[0], w.shape[0])
    code = lib.lt_llama_gemv_f32(
        FORMATS[(weights, dot)],
        int(tiles),
        x.shape[0],
        x.shape[1],
        w.shape[0],
        packed.data_ptr(),
        None if b is None else b.data_ptr(),
        x.data_ptr(),
        y.data_ptr(),
    )
    if code:
        raise ValueError(
            f"project: the C step refused ({weights}, {dot}) at n_in={x.shape[1]} (a multiple of 32 for dots)"
        )
    return y


class FusedLlamaStep:
    """One token of a linearised Llama-style model in one C call: tokens [B] -> logits [B, vocab],
    the per-layer HybridState tensors updated in place. weights: torch.float32 (the model's own
    tensors, read where they are), torch.bfloat16 or torch.int8 (copies taken here); dot:
    torch.bfloat16 with bfloat16 weights multiplies bfloat16 pairs (AVX512-BF16), torch.int8 with int8
    weights rounds the projections' inputs to int8 per block of 32 and sums int8 products in int32
    (AVX512-VNNI where present; every target computes the same sums). Both dot formats run batches of
    TILE_ROWS[dot] rows and more on AMX tiles where the CPU has them (has_tiles): the same products, summed
    in another order."""

    KEEP_CHECKED = 4  # states remembered as checked (_state_arrays)
    # the batch from which each dot format runs on AMX tiles (where has_tiles): below it the row layout,
    # bound by reading the weights, is faster (BENCHMARKS.md, "Batched rows on AMX tiles")
    TILE_ROWS: ClassVar[dict] = {torch.bfloat16: 8, torch.int8: 16}

    def __init__(self, w: LlamaWeights, weights: torch.dtype = torch.float32, dot: torch.dtype = torch.float32):
        if (weights, dot) not in FORMATS:
            raise ValueError(
                f"FusedLlamaStep: (weights, dot) must be one of {sorted(map(str, FORMATS))}, got ({weights}, {dot})"
            )
        lib = load()
        if lib is None:
            raise RuntimeError(f"FusedLlamaStep: the C step is unavailable: {unavailable_reason()}")
        if w.mode not in MODES or w.feature_map not in FEATURE_MAPS:
            raise ValueError(
                f"FusedLlamaStep: mode {w.mode!r} / feature map {w.feature_map!r} are not computed in C "
                f"(modes {', '.join(MODES)}; maps {', '.join(FEATURE_MAPS)})"
            )
        for t in w.tensors():
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(
                    "FusedLlamaStep: every weight must be a contiguous float32 CPU tensor, got "
                    f"{t.dtype} {list(t.shape)} on {t.device}"
                )
        d = w.embed.shape[1]
        dff = w.layers[0]["wg"].shape[0]
        self._check_shapes(w, d, dff)
        if dot == torch.bfloat16:
            from . import fused

            if not fused.has_bf16_dot():
                raise ValueError("FusedLlamaStep: dot=torch.bfloat16 needs a CPU with AVX512-BF16")
        if dot != torch.float32:
            widths = {"d_model": d, "d_ff": dff, "heads x head_dim": w.n_heads * w.head_dim}
            if any(v % 32 for v in widths.values()):
                raise ValueError(f"FusedLlamaStep: dot={dot} needs widths divisible by 32, got {widths}")
        self.weights, self.dot, self.vocab = weights, dot, w.embed.shape[0]
        self.n_heads, self.head_dim, self.window, self.sinks = w.n_heads, w.head_dim, w.window, w.sinks
        self.mode = w.mode

        def in_format(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return convert(t, weights) if name in (*PROJECTIONS, "fq_w", "fk_w") else t.detach()

        layers = [{k: in_format(k, t) for k, t in layer.items()} for layer in w.layers]
        head = w.head.detach() if weights == torch.float32 else convert(w.head, weights)
        self.held = (layers, w.embed.detach(), w.final_norm.detach(), head, w.inv_freq.detach())  # kept alive
        L = len(layers)

        def array(name):
            values = [layer.get(name) for layer in layers]
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise ValueError(f"FusedLlamaStep: {name} is given for some layers only")
            return (ctypes.c_void_p * L)(*[v.data_ptr() for v in values])

        self.arrays = {name: array(name) for name in (*PER_LAYER, *BIASES, *HEDGEHOG)}
        F = w.head_dim
        hh_m = 0
        if w.feature_map == "hedgehog" and w.mode != "window":
            hh_m = w.layers[0]["fq_w"].shape[-1]
            F = 2 * hh_m
        self.n_features = F
        # batches of TILE_ROWS rows and more on AMX tiles, where this format has them (has_tiles)
        rows = self.TILE_ROWS.get(dot, 0)
        if not isinstance(rows, int) or rows < 0:
            raise ValueError(f"FusedLlamaStep.TILE_ROWS[{dot}] must be an int >= 0 (0: never), got {rows!r}")
        self.tile_rows = rows if has_tiles(weights, dot) else 0
        self.struct = _LtLlama(
            L,
            d,
            w.n_heads,
            w.n_kv_heads,
            w.head_dim,
            dff,
            self.vocab,
            MODES[w.mode],
            FEATURE_MAPS[w.feature_map],
            F,
            hh_m,
            w.window,
            w.sinks,
            FORMATS[(weights, dot)],
            self.tile_rows,
            w.rms_eps,
            w.attn_eps,
            w.rope_scale,
            w.inv_freq.data_ptr(),
            *[self.arrays[n] for n in (*PER_LAYER, *BIASES, *HEDGEHOG)],
            w.embed.data_ptr(),
            w.final_norm.data_ptr(),
            head.data_ptr(),
        )
        self._work: torch.Tensor | None = None
        self._checked: list[dict] = []  # what the last calls checked of their states (_state_arrays)
        self._used = {
            "linear": ("S", "z"),
            "hybrid": ("S", "z", "ring_k", "ring_v", "sink_k", "sink_v"),
            "window": ("ring_k", "ring_v", "sink_k", "sink_v"),
        }[w.mode]
        self.generation = -1  # (set by the model's builder, with the sources: what `current` checks)
        self.sources: list[torch.Tensor] = []
        self.source_ptrs: list[int] = []
        self.source_versions: list[int] | None = None

    @staticmethod
    def _check_shapes(w: LlamaWeights, d: int, dff: int) -> None:
        """Every weight's shape against the sizes the C step reads by (it cannot check them itself:
        a wrong one would be read out of bounds)."""
        H, Hkv, D, V = w.n_heads, w.n_kv_heads, w.head_dim, w.embed.shape[0]
        if H < 1 or Hkv < 1 or H % Hkv or D < 2 or D % 2:
            raise ValueError(f"FusedLlamaStep: n_heads={H} must be a multiple of n_kv_heads={Hkv}, head_dim={D} even")
        hedgehog = w.feature_map == "hedgehog" and w.mode != "window"
        m = w.layers[0]["fq_w"].shape[-1] if hedgehog and w.layers[0]["fq_w"] is not None else 0
        want = {
            "attn_norm": (d,),
            "mlp_norm": (d,),
            "wq": (H * D, d),
            "wk": (Hkv * D, d),
            "wv": (Hkv * D, d),
            "wo": (d, H * D),
            "wg": (dff, d),
            "wu": (dff, d),
            "wd": (d, dff),
            "bq": (H * D,),
            "bk": (Hkv * D,),
            "bv": (Hkv * D,),
            "bo": (d,),
            "fq_w": (H, D, m),
            "fq_b": (H, m),
            "fk_w": (H, D, m),
            "fk_b": (H, m),
        }
        for i, layer in enumerate(w.layers):
            if hedgehog and any(layer.get(k) is None for k in HEDGEHOG):
                raise ValueError(f"FusedLlamaStep: layer {i} lacks its Hedgehog feature-map weights")
            for name, shape in want.items():
                t = layer.get(name)
                if name in PER_LAYER and t is None:
                    raise ValueError(f"FusedLlamaStep: layer {i} lacks {name}")
                if t is not None and (name not in HEDGEHOG or hedgehog) and tuple(t.shape) != shape:
                    raise ValueError(
                        f"FusedLlamaStep: layer {i}'s {name} must have shape {list(shape)}, got {list(t.shape)}"
                    )
        around = {
            "embed": (w.embed, (V, d)),
            "final_norm": (w.final_norm, (d,)),
            "head": (w.head, (V, d)),
            "inv_freq": (w.inv_freq, (D // 2,)),
        }
        for name, (t, shape) in around.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"FusedLlamaStep: {name} must have shape {list(shape)}, got {list(t.shape)}")

    def current(self) -> bool:
        """Whether the tensors this step was built from are still the model's (no module got a new
        parameter or submodule since: fused.current_generation), at the same addresses (and, for
        copies, unchanged since)."""
        from . import fused

        if self.generation != fused.current_generation():
            return False
        if [t.data_ptr() for t in self.sources] != self.source_ptrs:  # (list comprehensions: ~0.1 ms for 400)
            return False
        return self.source_versions is None or [t._version for t in self.sources] == self.source_versions

    def knows(self, B: int, states) -> bool:
        """Whether `states` hold the very tensors that one of the last few calls checked, with the
        `seen` it left them (then nothing is checked again: asking each of their ~180 tensors for its
        address and layout took 85 us a token, read cold after the step has streamed the weights;
        knowing them by identity 35 us: BENCHMARKS.md)."""
        return self._entry(B, states) is not None

    def _entry(self, B: int, states) -> dict | None:
        for entry in self._checked:
            if not entry or entry["B"] != B or len(states) != entry["L"] or entry["seen"]() is None:
                continue
            seen, refs, i = entry["seen"](), entry["refs"], 0
            for s in states:
                if s.seen is not seen:
                    break
                if any(refs[i + j]() is not getattr(s, name) for j, name in enumerate(self._used)):
                    break
                i += len(self._used)
            else:
                return entry
        return None

    def _state_arrays(self, B: int, states) -> dict:
        """What a call checked of its states: among them the six per-layer pointer arrays (S, z,
        ring_k, ring_v, sink_k, sink_v), taken from the last few calls where the states hold the same
        tensors (`knows`: a few, so that generations taking turns are not checked at every token),
        else from each tensor checked. The storages under them are kept alive while those tensors
        live, so no pointer can dangle whatever is done to a tensor in place (resize_, set_)."""
        entry = self._entry(B, states)
        if entry is not None:
            return entry
        arrays = self._check_states(B, states)
        tensors = [getattr(s, name) for s in states for name in self._used]
        entry = {}
        forget = lambda _ref, entry=entry: entry.clear()  # noqa: E731 (a checked tensor is gone)
        entry.update(
            B=B,
            L=len(states),
            refs=[weakref.ref(t, forget) for t in tensors],
            storages=[t.untyped_storage() for t in tensors],
            seen=weakref.ref(states[0].seen),
            arrays=arrays,
        )
        self._checked = [entry, *[e for e in self._checked if e][: self.KEEP_CHECKED - 1]]
        return entry

    def _check_states(self, B: int, states) -> list:
        H, D, F, W, ns = self.n_heads, self.head_dim, self.n_features, self.window, self.sinks
        Hk, L = self.struct.n_kv_heads, self.struct.n_layers
        if len(states) != L:
            raise ValueError(f"fused Llama step: one state per layer ({L}), got {len(states)}")
        shapes = {
            "S": (B, H, F, D),
            "z": (B, H, F),
            "ring_k": (B, Hk, W, D),
            "ring_v": (B, Hk, W, D),
            "sink_k": (B, Hk, ns, D),
            "sink_v": (B, Hk, ns, D),
        }
        used = {"linear": ("S", "z"), "hybrid": tuple(shapes), "window": ("ring_k", "ring_v", "sink_k", "sink_v")}
        out = []
        for name, shape in shapes.items():
            if name not in used[self.mode]:
                out.append(None)
                continue
            ptrs = []
            for layer, s in enumerate(states):
                t = getattr(s, name)
                if (
                    t is None
                    or t.shape != shape
                    or t.dtype != torch.float32
                    or not t.is_contiguous()
                    or (t.device.type != "cpu")
                ):
                    got = "None" if t is None else f"{t.dtype} {list(t.shape)} on {t.device}"
                    raise ValueError(
                        f"fused Llama step: layer {layer}'s state {name} must be a contiguous float32 "
                        f"CPU tensor {list(shape)}, got {got}"
                    )
                ptrs.append(t.data_ptr())
            out.append((ctypes.c_void_p * L)(*ptrs))
        seen = states[0].seen
        if (
            not isinstance(seen, torch.Tensor)
            or seen.dtype != torch.int64
            or seen.shape != (B,)
            or seen.device.type != "cpu"
        ):
            got = f"{seen.dtype} {list(seen.shape)}" if isinstance(seen, torch.Tensor) else repr(seen)
            raise ValueError(f"fused Llama step: a state's seen must be an int64 CPU tensor [{B}], got {got}")
        differ = [i for i, s in enumerate(states) if not torch.equal(s.seen, seen)]
        if differ:
            raise ValueError(
                f"fused Llama step: every layer's state must have seen the same tokens; layer {differ[0]} has "
                f"{states[differ[0]].seen.tolist()}, layer 0 {seen.tolist()}"
            )
        return out

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, states) -> torch.Tensor:
        """tokens [B] and positions [B] (RoPE's) -> logits [B, vocab]; `states` (one HybridState per
        layer, all having seen the same tokens: seen [B], per row) advance by one token, in place."""
        if tokens.dim() != 1 or positions.shape != tokens.shape:
            raise ValueError(
                f"fused Llama step: tokens and positions must both be [B], got {list(tokens.shape)} "
                f"and {list(positions.shape)}"
            )
        B = tokens.shape[0]
        tokens, positions = tokens.to(torch.int64).contiguous(), positions.to(torch.int64).contiguous()
        checked = self._state_arrays(B, states)
        lib = load()
        need = lib.lt_llama_work_size(ctypes.byref(self.struct), B)
        if self._work is None or self._work.numel() < need:
            self._work = torch.empty(max(need, 1), dtype=torch.float32)
        logits = torch.empty(B, self.vocab, dtype=torch.float32)
        seen = states[0].seen.contiguous()
        status = lib.lt_llama_token_f32(
            ctypes.byref(self.struct),
            B,
            tokens.data_ptr(),
            positions.data_ptr(),
            seen.data_ptr(),
            *[_ptr_array(a) for a in checked["arrays"]],
            self._work.data_ptr(),
            self._work.numel(),
            logits.data_ptr(),
        )
        if status == 2:
            raise ValueError(
                f"fused Llama step: tokens must lie in [0, {self.vocab}) and positions be >= 0, got tokens in "
                f"[{int(tokens.min())}, {int(tokens.max())}], positions from {int(positions.min())}"
            )
        if status:
            raise MemoryError("fused Llama step: out of memory for its per-thread buffers")
        advanced = seen + 1  # (one tensor for every layer, as it came: the next call checks nothing again)
        for s in states:
            s.seen = advanced
        if checked:  # (empty: a checked tensor died during the call)
            checked["seen"] = weakref.ref(advanced)
        return logits

    def weight_bytes(self) -> int:
        """The bytes of weights one token reads (every projection and the head; one embedding row)."""
        layers, embed, norm, head, _ = self.held
        total = sum(t.numel() * t.element_size() for layer in layers for t in layer.values() if t is not None)
        return total + head.numel() * head.element_size() + norm.numel() * 4 + embed.shape[1] * 4

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every weight tensor the step reads per token (the embedding excepted), for a bandwidth probe."""
        layers, _, norm, head, _ = self.held
        return [t for layer in layers for t in layer.values() if t is not None] + [norm, head]


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """One-line errors for sampling settings out of range."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"sampling: temperature must be finite and >= 0 (0: the most likely token), got {temperature}")
    if top_k < 0:
        raise ValueError(f"sampling: top_k must be >= 0 (0: no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"sampling: top_p must be in (0, 1], got {top_p}")


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    u: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next tokens [B] (int64) from logits [B, V] in C (token_sample.c: the rule is in its header
    comment), u [B] ~ U[0, 1) (float32; needed unless temperature is 0). `work`: a float32 scratch
    tensor of at least 4 V to reuse between calls (else one is allocated). Where the library is
    unavailable, sample_tokens_reference (the same rule in PyTorch) runs instead."""
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(f"sample_tokens: logits must be [B, V] with B, V >= 1, got {list(logits.shape)}")
    B, V = logits.shape
    if temperature > 0 and (u is None or u.shape != (B,)):
        got = None if u is None else list(u.shape)
        raise ValueError(f"sample_tokens: u must be [B] = [{B}] uniform draws, got {got}")
    lib = load()
    if lib is None:
        return sample_tokens_reference(logits, temperature, top_k, top_p, u)
    x = logits.detach().to(torch.float32).contiguous()
    u_ = u.detach().to(torch.float32).contiguous() if u is not None else None
    if work is None or work.dtype != torch.float32 or not work.is_contiguous() or work.numel() < 4 * V:
        work = torch.empty(4 * V if temperature > 0 else 1, dtype=torch.float32)
    out = torch.empty(B, dtype=torch.int64)
    status = lib.lt_sample_tokens_f32(
        B,
        V,
        x.data_ptr(),
        float(temperature),
        int(top_k),
        float(top_p),
        None if u_ is None else u_.data_ptr(),
        work.data_ptr(),
        work.numel(),
        out.data_ptr(),
    )
    if status == 3:
        raise ValueError("sample_tokens: a row of logits holds NaN or +inf, or is all -inf")
    if status:
        raise ValueError(f"sample_tokens: u must lie in [0, 1), got [{float(u_.min())}, {float(u_.max())}]")
    return out


def sample_tokens_reference(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, u: torch.Tensor | None = None
) -> torch.Tensor:
    """lt_sample_tokens_f32's rule in PyTorch, row by row, with its arithmetic (float32 scaling,
    float64 sums in the same order): the same token for the same u."""
    check_sampling_args(temperature, top_k, top_p)
    logits = logits.detach().to(torch.float32)
    if temperature == 0:
        return logits.argmax(-1)
    out = []
    p = torch.tensor(top_p, dtype=torch.float32).double()
    for b, row in enumerate(logits):
        x = row / torch.tensor(temperature, dtype=torch.float32)
        best = int(row.argmax())
        if torch.isinf(x[best]):
            out.append(best)
            continue
        top = x.max().double()
        t = torch.tensor(-float("inf"), dtype=torch.float32)
        finite = int((x > -float("inf")).sum())
        if 0 < top_k < finite:
            t = x.topk(top_k).values[-1]
        if top_p < 1:
            kept = x >= t
            total = torch.exp(x[kept].double() - top).cumsum(0)[-1]
            cand = x[kept].sort(descending=True).values
            mass = torch.exp(cand.double() - top).cumsum(0)
            reached = (mass >= p * total).nonzero()
            j = int(reached[0]) if len(reached) else len(cand) - 1
            t = torch.maximum(t, cand[j])
        kept = x >= t
        run = torch.where(kept, torch.exp(x.double() - top), torch.zeros((), dtype=torch.float64)).cumsum(0)
        above = ((run > u[b].double() * run[-1]) & kept).nonzero()
        out.append(int(above[0]) if len(above) else int(kept.nonzero()[-1]))
    return torch.tensor(out, dtype=torch.int64)


def _ptr_array(a):
    return None if a is None else ctypes.cast(a, ctypes.c_void_p)
