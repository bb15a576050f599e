"""Generation of our own for linearised language models: the prompt through the model's forward (the
parallel form, in PyTorch), then each new token through the fused C step and the C sampler
(decode/llama.py), with nothing of transformers' generate() and forward around each token.

transformers' generate() runs the same model through `LinearizedCache` and the same C step, but
its loop and the model's forward cost about 1 ms a token on a 2-core VM and its logits processors
another 0.3 ms over a 49k vocabulary (BENCHMARKS.md); here a token costs the C step, the C sampler
and a few microseconds of Python. Where the fused step does not apply (a GPU, a model it does not
compute, `DecodeConfig(fused=False)`), each token goes through the model's forward instead.

    tokens = generate(model, input_ids, max_new_tokens=100, temperature=0.8, top_p=0.9)

Sampling is decode/llama.py's rule (temperature, top-k, top-p; ties at a cut are kept), drawing one
uniform number per row and token from `generator` (or PyTorch's global one): a seed gives the same
text every time, but not the tokens transformers' sampler would draw from the same seed.
"""

from __future__ import annotations

import torch

from ..decode import DecodeConfig, llama
from .convert import LinearizedCache
from .step import fused_step


class RecurrentGenerator:
    """The prompt's state, then one token per call of `next_tokens()` for every row.

    input_ids [B, T] (T >= 1); attention_mask [B, T]: 0 at left padding, for prompts of different
    lengths (each row then generates what it generates alone). After each call the state holds every
    token returned so far, and `logits` [B, vocab] (float32) are those of the next one."""

    def __init__(
        self,
        model,
        input_ids: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        config: DecodeConfig | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"generate: input_ids must be [B, T] with B, T >= 1, got {list(input_ids.shape)}")
        vocab = model.config.vocab_size
        if input_ids.is_floating_point() or int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(
                f"generate: input_ids must be integer token ids in [0, {vocab}), got {input_ids.dtype} "
                f"in [{input_ids.min().item()}, {input_ids.max().item()}]"
            )
        llama.check_sampling_args(temperature, top_k, top_p)
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"generate: attention_mask must be input_ids' shape {list(input_ids.shape)}, "
                f"got {list(attention_mask.shape)}"
            )
        cache = LinearizedCache()
        device = next(model.parameters()).device
        mask = None if attention_mask is None else attention_mask.to(device)
        with torch.no_grad():
            out = model(input_ids=input_ids.to(device), attention_mask=mask, cache=cache, use_cache=True)
        self._start(model, cache, out.logits[:, -1], temperature, top_k, top_p, generator, config)

    @classmethod
    def resume(
        cls,
        model,
        cache: LinearizedCache,
        logits: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        config: DecodeConfig | None = None,
    ) -> RecurrentGenerator:
        """Go on from a prefill already made: its cache (advanced in place from here) and the logits
        [B, vocab] of the token after it."""
        llama.check_sampling_args(temperature, top_k, top_p)
        gen = cls.__new__(cls)
        gen._start(model, cache, logits, temperature, top_k, top_p, generator, config)
        return gen

    def _start(self, model, cache, logits, temperature, top_k, top_p, generator, config) -> None:
        self.model, self.temperature, self.top_k, self.top_p = model, temperature, top_k, top_p
        self.generator, self.cache, self.logits = generator, cache, logits.float()
        self._work = None  # the sampler's scratch, kept between tokens
        config = config if config is not None else getattr(model, "decode_config", DecodeConfig())
        cpu = next(model.parameters()).device.type == "cpu"
        self.step = fused_step(model, config) if cpu else None
        self.config = config
        self.states = [cache.states[i] for i in range(model.config.num_hidden_layers)]

    @torch.no_grad()
    def sample(self) -> torch.Tensor:
        """The next token of every row [B] from `logits`, without feeding it."""
        B = self.logits.shape[0]
        u = None
        if self.temperature > 0:
            u = torch.rand(B, generator=self.generator)
        if self._work is None or self._work.numel() < 4 * self.logits.shape[1]:
            self._work = torch.empty(4 * self.logits.shape[1], dtype=torch.float32)
        return llama.sample_tokens(self.logits.cpu(), self.temperature, self.top_k, self.top_p, u, self._work)

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor) -> None:
        """Add tokens [B] to the state; `logits` become those of the token after them."""
        if self.step is not None:
            positions = self.states[0].seen.clone()  # (each row's own count: padding is not counted)
            self.logits = self.step(tokens, positions, self.states)
            self.cache.seen += 1
            return
        before, self.model.decode_config = getattr(self.model, "decode_config", None), self.config
        try:
            device = self.logits.device
            positions = self.states[0].seen[:, None].to(device)
            out = self.model(
                input_ids=tokens[:, None].to(device), position_ids=positions, cache=self.cache, use_cache=True
            )
        finally:
            self.model.decode_config = before
        self.logits = out.logits[:, -1].float()
        self.states = [self.cache.states[i] for i in range(len(self.states))]  # (a PyTorch step replaces them)

    def next_tokens(self) -> torch.Tensor:
        """sample(), then feed() what it drew: one generated token per row [B]."""
        tokens = self.sample()
        self.feed(tokens)
        return tokens


def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 100,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    config: DecodeConfig | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """input_ids [B, T] followed by up to max_new_tokens generated tokens per row, [B, T + n] (CPU,
    int64). A row that produces eos_token_id keeps producing it; generation stops early once every
    row has. temperature 0: the most likely token each time (transformers' greedy search gives the
    same tokens). attention_mask [B, T]: 0 at left padding (prompts of different lengths)."""
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    gen = RecurrentGenerator(
        model,
        input_ids,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        config=config,
        attention_mask=attention_mask,
    )
    out = [input_ids.cpu()]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for i in range(max_new_tokens):
        tokens = gen.sample()
        if eos_token_id is not None:
            tokens = torch.where(done, torch.full_like(tokens, eos_token_id), tokens)
            done |= tokens == eos_token_id
        out.append(tokens[:, None])
        if bool(done.all()):
            break
        if i + 1 < max_new_tokens:  # (the last token's successor is never needed)
            gen.feed(tokens)
    return torch.cat(out, 1)
