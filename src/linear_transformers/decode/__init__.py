"""Generation: the steppers that advance a CausalTransformer token by token, and the one place that
chooses among them.

    PyTorch step     CausalTransformer's blocks, one operation at a time (any model, any device)
    fused step       the whole model in one C call per token (fused.py, model_step.c): linear
                     attention on the CPU, batch <= DecodeConfig.max_batch, where this machine
                     measured it faster than the PyTorch step (native.verdict, once per build)
    fused mixture    a mixture-of-logistics head at temperature 1: steps and draws together in C,
                     GENERATE_CHUNK tokens per call, from the random numbers the head draws
    recompute        the whole prefix re-run in parallel for every token (the paper's softmax
                     baseline; LSH attention, which has no recurrent form)

Every stepper samples with the head's own code (`head.sample`, or `head.draw` then the same
arithmetic in C), so which stepper runs never changes the tokens a seeded generator gives.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import native
from ..ops import LinearState
from . import fused

if TYPE_CHECKING:
    from ..model import CausalTransformer, ModelState

# Up to this batch the fused step runs (from 20 rows on the batch rides in vector lanes, one weight
# broadcast per 16 rows); bench generate's step table measures where it stops paying (BENCHMARKS.md).
FUSED_MAX_BATCH = 256


@dataclass(frozen=True)
class DecodeConfig:
    """How generation runs on the CPU (the tokens do not depend on it, except through precision).

    fused: use the fused C step where it applies and was measured faster (False: the PyTorch step).
    max_batch: larger batches take the PyTorch step.
    weights: torch.bfloat16 streams bfloat16 copies of the projection weights (half the bytes per
        token; float32 arithmetic; the copies are taken at the start of each generate()); torch.int8
        streams int8 copies, symmetric with one float32 scale per output row (a quarter of the bytes;
        the activations stay float32). Both model families: our CausalTransformer and linearised Llamas.
    dot: torch.bfloat16 (with bfloat16 weights, on a CPU with AVX512-BF16) also rounds the
        projections' inputs to bfloat16 and multiplies bfloat16 pairs, accumulating in float32;
        torch.int8 (with int8 weights) rounds them to int8 per block of 32 (symmetric, one scale per
        block) and sums the int8 products exactly in int32 (AVX512-VNNI where the CPU has it; the same
        sums on every CPU). Needs input widths divisible by 32.
    """

    fused: bool = True
    max_batch: int = FUSED_MAX_BATCH
    weights: torch.dtype = torch.float32
    dot: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.max_batch < 0:
            raise ValueError(f"DecodeConfig: max_batch must be >= 0, got {self.max_batch}")
        if self.weights not in (torch.float32, torch.bfloat16, torch.int8):
            raise ValueError(
                f"DecodeConfig: weights must be torch.float32, torch.bfloat16 or torch.int8, got {self.weights}"
            )
        if self.dot not in (torch.float32, torch.bfloat16, torch.int8):
            raise ValueError(f"DecodeConfig: dot must be torch.float32, torch.bfloat16 or torch.int8, got {self.dot}")
        if self.dot != torch.float32 and self.weights != self.dot:
            raise ValueError(f"DecodeConfig: dot={self.dot} needs weights={self.dot}, got {self.weights}")

    @classmethod
    def precision(cls, name: str, **kwargs) -> DecodeConfig:
        """The config for a --cpu-precision name (PRECISIONS)."""
        if name not in PRECISIONS:
            raise ValueError(f"cpu precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
        weights, dot = PRECISIONS[name]
        return cls(weights=weights, dot=dot, **kwargs)


# --cpu-precision names: the fused step's (weights, dot products)
PRECISIONS = {
    "float32": (torch.float32, torch.float32),
    "bf16-weights": (torch.bfloat16, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "int8": (torch.int8, torch.float32),
    "int8-dot": (torch.int8, torch.int8),
}
DEFAULT = DecodeConfig()


# The fused step built for each model (decode owns it; the model only asks to forget it when its
# parameters move or change dtype: CausalTransformer._apply).
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget(model) -> None:
    """Drop the fused step built for `model`: the next step builds one over its current weights."""
    _STEPS.pop(model, None)


def built_step(model) -> fused.FusedModelStep | None:
    """The fused step built for `model` so far (None: none yet, or forgotten)."""
    return _STEPS.get(model)


def why_not_fused(model, device: torch.device) -> str | None:
    """Why the fused CPU step cannot run `model` on `device` (one clause), or None where it can."""
    if device.type != "cpu":
        return f"it is for generation on the CPU; the device is {device}"
    if model.step_weights() is None:
        cfg = model.cfg
        return (
            f"it computes causal-linear attention with one of the feature maps {', '.join(fused.FEATURE_MAPS)} "
            f"and plain layers; this model has {cfg.attention}, {cfg.feature_map}"
        )
    if not fused.available():
        return f"the CPU kernel is unavailable: {fused.unavailable_reason()}"
    return None


def check_config(fn: str, config: object) -> None:
    if not isinstance(config, DecodeConfig):
        raise TypeError(f"{fn}: config must be a linear_transformers.decode.DecodeConfig, got {type(config).__name__}")


@torch.no_grad()
def measure_fused_step(model: CausalTransformer) -> tuple[float, float]:
    """Seconds per token at batch 1 of the fused C step and of the PyTorch step on `model` (a
    vocabulary of at least 256), best of 7 runs of 16 tokens interleaved (under a second)."""
    step = fused.from_model(model)
    tokens = torch.randint(0, 256, (16, 1))
    _, state = model.prefill(torch.zeros(1, 0, dtype=torch.long))
    S, z = [s.S for s in state.layers], [s.z for s in state.layers]

    def run_fused():
        for t in range(16):
            step(tokens[t], t, S, z)

    def run_pytorch():
        st = state.clone()
        for t in range(16):
            model.step_pytorch(tokens[t], st)

    kernel, pytorch = native.best_of([run_fused, run_pytorch])
    return kernel / 16, pytorch / 16


def check_generate(
    n, max_new_tokens, prompt, labels, mode: str, config, max_len: int, learned_positions: bool, device
) -> tuple[torch.Tensor, int]:
    """generate()'s arguments checked, each wrong one a one-line error -> (the prompt [B, T0] as int64,
    on `device`, an empty one of batch n or len(labels) when None; max_new_tokens, by default up to
    max_len). Learned positions end at max_len; other models generate past it."""
    if mode not in ("rnn", "recompute"):
        raise ValueError(f"generate: mode must be 'rnn' or 'recompute', got {mode!r}")
    check_config("generate", config)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"generate: n must be an int >= 1, got {n!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if prompt is None:
        B = labels.shape[0] if labels is not None else n
        if B is None:
            raise ValueError("generate: give n, a prompt or labels")
        prompt = torch.zeros(B, 0, dtype=torch.long, device=device)
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        got = f"shape {list(prompt.shape)}" if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"generate: prompt must be a [B, T0] tensor of token ids, got {got}")
    if prompt.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"generate: prompt must hold integer token ids, got {prompt.dtype}")
    T0 = prompt.shape[1]
    if T0 > max_len and learned_positions:
        raise ValueError(f"generate: the prompt's {T0} tokens exceed the learned positions (max_len={max_len})")
    batch = {"n": n, "the prompt's batch": prompt.shape[0], "the labels": None if labels is None else len(labels)}
    if len({b for b in batch.values() if b is not None}) > 1:
        given = ", ".join(f"{k} {b}" for k, b in batch.items() if b is not None)
        raise ValueError(f"generate: n, the prompt and the labels must agree on the batch, got {given}")
    if max_new_tokens is None:
        max_new_tokens = max(max_len - T0, 0)
    if T0 + max_new_tokens > max_len and learned_positions:
        raise ValueError(
            f"generate: {T0} + {max_new_tokens} tokens exceed the learned positions (max_len={max_len}); "
            "models with --positional sinusoidal or none generate without a length limit"
        )
    return prompt.long(), max_new_tokens


def fused_step_for(model: CausalTransformer, batch: int, state: ModelState, config: DecodeConfig = DEFAULT):
    """The fused C step for stepping `state` (batch rows) of `model`, or None where the PyTorch step
    must run: the C step computes what the model would (fused.computes: linear attention with an
    elementwise feature map, plain layers; float32 on the CPU, no autograd, no dropout, no per-row
    offsets) and is the faster way (batch <= config.max_batch, and the build measured faster than
    the PyTorch step on this machine). Kept on the model, and rebuilt whenever the model's weights
    are no longer the tensors it points into (fused.weights_key)."""
    if not (
        config.fused
        and batch <= config.max_batch
        and not model.training
        and not torch.is_grad_enabled()
        and state.offsets is None
        and all(isinstance(s, LinearState) and s.S.device.type == "cpu" for s in state.layers)
        and all(s.S.dtype == torch.float32 and s.S.is_contiguous() and s.z.is_contiguous() for s in state.layers)
    ):
        return None
    step = _STEPS.get(model)
    if step is not None and (step.weights, step.dot) == (config.weights, config.dot) and step.current():
        return step  # (the common case: nothing about the model changed since the step was built)
    key = fused.weights_key(model, config.weights != torch.float32)
    if key is None or not fused.available():
        return None
    if not native.verdict("fused_step", model.measure_fused_step, fused.LIBRARY):
        return None
    if step is None or step.key != key or (step.weights, step.dot) != (config.weights, config.dot):
        # a weight replaced, moved or (for bfloat16 copies) updated: a fresh step over the current tensors
        step = _STEPS[model] = fused.from_model(model, config.weights, config.dot)
    else:  # the same tensors: only something elsewhere in the process registered a module or parameter
        step.generation = fused.current_generation()  # (so the next call takes the cheap check again)
    return step


def run_fused_step(step: fused.FusedModelStep, token: torch.Tensor, state: ModelState) -> torch.Tensor:
    """One token [B] through the fused step: the next token's head parameters; `state` advances."""
    params = step(token, state.position, [s.S for s in state.layers], [s.z for s in state.layers])
    for s in state.layers:
        s.n_tokens += 1
    state.position += 1
    return params


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __call__(self, head, params: torch.Tensor) -> torch.Tensor:
        return head.sample(params, self.temperature, self.top_k, self.top_p, self.generator)


class _Recurrent:
    """Per call: feed the token before t (the prefill's parameters serve the first), sample token t."""

    def __init__(
        self,
        model: CausalTransformer,
        params: torch.Tensor,
        state: ModelState,
        sampling: Sampling,
        fused_step: fused.FusedModelStep | None,
    ) -> None:
        self.model, self.params, self.state, self.sampling, self.fused = model, params, state, sampling, fused_step

    def advance(self, out: torch.Tensor, t: int, end: int) -> int:
        if self.params is None:
            token = out[:, t - 1]
            if self.fused is not None:
                self.params = run_fused_step(self.fused, token, self.state)
            else:
                self.params, self.state = self.model.step_pytorch(token, self.state)
        out[:, t] = self.sampling(self.model.head, self.params)
        self.params = None
        return t + 1


class _FusedMixture(_Recurrent):
    """A mixture-of-logistics head drawn directly: after the first token, up to GENERATE_CHUNK
    tokens per C call, each stepped and sampled in C from the random numbers the head draws for it
    (MixtureOfLogisticsHead.draw, token by token: the draws of sampling them one at a time)."""

    def advance(self, out: torch.Tensor, t: int, end: int) -> int:
        if self.params is not None:
            return super().advance(out, t, end)
        head, B = self.model.head, out.shape[0]
        n = min(fused.FusedModelStep.GENERATE_CHUNK, end - t)
        draws = [head.draw((B,), self.sampling.generator) for _ in range(n)]
        race, u = torch.stack([r for r, _ in draws]), torch.stack([v for _, v in draws])
        S, z = [s.S for s in self.state.layers], [s.z for s in self.state.layers]
        tokens = self.fused.sample_mol(out[:, t - 1], self.state.position, S, z, race, u, head.vocab_size)
        for s in self.state.layers:
            s.n_tokens += n
        self.state.position += n
        out[:, t : t + n] = tokens.T
        return t + n


class _Recompute:
    """Per token: the whole prefix re-run in parallel (no state)."""

    def __init__(self, model: CausalTransformer, labels, padding, sampling: Sampling) -> None:
        self.model, self.labels, self.padding, self.sampling = model, labels, padding, sampling

    def advance(self, out: torch.Tensor, t: int, end: int) -> int:
        window = torch.cat([out[:, :t], torch.zeros_like(out[:, :1])], 1)  # forward drops the last input token
        padding = None if self.padding is None else self.padding[:, : t + 1]
        out[:, t] = self.sampling(self.model.head, self.model(window, self.labels, padding)[:, t])
        return t + 1


def stepper(
    model: CausalTransformer,
    out: torch.Tensor,
    T0: int,
    mode: str,
    labels,
    padding,
    sampling: Sampling,
    config: DecodeConfig,
):
    """The stepper that fills out[:, T0:] (the one place the way of generating is chosen)."""
    if mode == "recompute":
        return _Recompute(model, labels, padding, sampling)
    params, state = model.prefill(out[:, :T0], labels, None if padding is None else padding[:, :T0])
    step = fused_step_for(model, out.shape[0], state, config)
    direct = model.cfg.head == "mol" and model.head.draws_directly(sampling.temperature, sampling.top_k, sampling.top_p)
    kind = _FusedMixture if step is not None and direct else _Recurrent
    return kind(model, params, state, sampling, step)
