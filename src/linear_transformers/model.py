"""A decoder-only causal transformer that trains in parallel and generates as an RNN.

    tokens [B, T] --(shift right behind a start token: the class label, or one learned token)-->
    embeddings + positions --> n_layers x Block --> head --> the distribution of every token

With linear attention every Block carries a constant-size state, so `step` costs O(1) per token
(paper Sec. 3.4); with softmax attention the state is a key/value cache (O(t) per token; "stateful
softmax", Appendix C), and `generate(mode="recompute")` re-runs the whole prefix per token, as the
paper's softmax baseline does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import decode, ops
from .blocks import Block, sinusoidal_table
from .config import NORMS, POSITIONAL, ModelConfig  # noqa: F401 (the model's public names: model.ModelConfig)
from .decode import DecodeConfig
from .heads import HEADS, check_sampling, sample  # noqa: F401 (sample: the model API)
from .ops import KVCache, LinearState


@dataclass
class ModelState:
    """The recurrent state of the whole model: one state per layer and the next position.

    offsets: [B] left-padding tokens of each row of a padded prompt (prefill with padding), or None;
    row b's next token sits at position `position - offsets[b]`."""

    layers: list[LinearState | KVCache] = field(default_factory=list)
    position: int = 0
    offsets: torch.Tensor | None = None

    def index_select(self, batch_index: torch.Tensor) -> ModelState:
        offsets = None if self.offsets is None else self.offsets.index_select(0, batch_index.to(self.offsets.device))
        return ModelState([s.index_select(batch_index) for s in self.layers], self.position, offsets)

    def clone(self) -> ModelState:
        offsets = None if self.offsets is None else self.offsets.clone()
        return ModelState([s.clone() for s in self.layers], self.position, offsets)


class CausalTransformer(nn.Module):
    """Autoregressive model of token sequences (pixels of an image row by row, or characters).

    Token t is predicted from the start token (the class label when n_classes > 0) and tokens < t,
    so position t of the network reads token t - 1.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.start = nn.Embedding(max(cfg.n_classes, 1), cfg.d_model)
        if cfg.positional == "learned":
            self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        elif cfg.positional == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_len, cfg.d_model), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        head_cls = HEADS[cfg.head]
        self.head = (
            head_cls(cfg.d_model, cfg.vocab_size, cfg.mol_components)
            if cfg.head == "mol"
            else head_cls(cfg.d_model, cfg.vocab_size)
        )
        self.dropout = nn.Dropout(cfg.dropout)

    # ---- inputs ---------------------------------------------------------------------------------
    def ensure_positions(self, n: int) -> None:
        """Positions [0, n) must have encodings: learned tables end at max_len (a one-line error says
        so); the sinusoidal table grows (to n, at least doubling) since it can be computed for any
        position; "none" has no limit. A recurrent model's only length limit is its positions."""
        if self.cfg.positional == "learned" and n > self.cfg.max_len:
            raise ValueError(
                f"CausalTransformer: position {n - 1} is past the learned position table (max_len="
                f"{self.cfg.max_len}); learned positions end there. Models with --positional sinusoidal or none "
                "generate without a length limit"
            )
        if self.cfg.positional == "sinusoidal" and n > self.pos_table.shape[0]:
            rows = max(n, 2 * self.pos_table.shape[0])
            table = sinusoidal_table(rows, self.cfg.d_model)  # (its first rows are the old table's, exactly)
            self.pos_table = table.to(self.pos_table.device, self.pos_table.dtype)

    def _positions(self, start: int, n: int, device) -> torch.Tensor | None:
        self.ensure_positions(start + n)
        if self.cfg.positional == "learned":
            return self.pos(torch.arange(start, start + n, device=device))
        if self.cfg.positional == "sinusoidal":
            return self.pos_table[start : start + n]
        return None

    def position_table(self) -> torch.Tensor | None:
        """The positional encodings of every position the model has a table for [rows, d_model]:
        max_len rows for learned positions, as many as generation has needed so far (at least
        max_len) for sinusoidal ones; None for positional "none"."""
        if self.cfg.positional == "learned":
            return self.pos.weight
        return self.pos_table if self.cfg.positional == "sinusoidal" else None

    def _positions_of(self, positions: torch.Tensor) -> torch.Tensor | None:
        """The positional encodings of positions [B, T] (each row its own), [B, T, d_model]."""
        self.ensure_positions(int(positions.max()) + 1)
        if self.cfg.positional == "learned":
            return self.pos(positions)
        if self.cfg.positional == "sinusoidal":
            return self.pos_table[positions]
        return None

    def _check_padding(self, tokens: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor | None:
        """padding [B, T] bool, True at left-padding tokens; None where there is none."""
        if padding is None:
            return None
        if padding.shape != tokens.shape or padding.dtype != torch.bool:
            raise ValueError(
                f"CausalTransformer: padding must be bool {list(tokens.shape)} like the tokens, "
                f"got {padding.dtype} {list(padding.shape)}"
            )
        if padding.shape[1] > 1 and bool((padding[:, 1:] & ~padding[:, :-1]).any()):
            raise ValueError("CausalTransformer: padding must be on the left (no padding after a real token)")
        return padding if bool(padding.any()) else None

    def _check_tokens(self, tokens: torch.Tensor, labels: torch.Tensor | None, batch: int | None = None) -> None:
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"CausalTransformer: tokens must be an integer tensor, got {tokens.dtype}")
        if self.cfg.n_classes and labels is None:
            raise ValueError(
                f"CausalTransformer: the model is class-conditional ({self.cfg.n_classes} classes); pass labels"
            )
        if labels is not None and not self.cfg.n_classes:
            raise ValueError("CausalTransformer: labels given to an unconditional model (n_classes=0)")
        b = tokens.shape[0] if batch is None else batch
        if labels is not None and labels.shape != (b,):
            raise ValueError(f"CausalTransformer: labels must have shape [B]=[{b}], got {list(labels.shape)}")
        if torch.compiler.is_compiling():
            return  # the value checks below read the data: a compiled graph cannot branch on them
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            raise ValueError(
                f"CausalTransformer: tokens must lie in [0, vocab_size={self.cfg.vocab_size}), "
                f"got values in [{int(tokens.min())}, {int(tokens.max())}]"
            )
        if labels is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.cfg.n_classes):
            raise ValueError(
                f"CausalTransformer: labels must be class indices in [0, {self.cfg.n_classes}), "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )

    def _start_tokens(self, batch: int, labels: torch.Tensor | None, device) -> torch.Tensor:
        idx = labels.long() if labels is not None else torch.zeros(batch, dtype=torch.long, device=device)
        return self.start(idx)  # [B, d_model]

    def _inputs(self, tokens: torch.Tensor, labels: torch.Tensor | None, with_last: bool, padding=None):
        """The network's input sequence: start token, then tokens (without the last unless with_last),
        and its key padding mask. With n left-padding tokens in a row, the start token moves to
        index n, just before the first real token, the n positions before it are masked out of every
        attention, and the real sequence takes the positions it has without padding (0, 1, ...)."""
        B, T = tokens.shape
        body = tokens if with_last else tokens[:, : T - 1]
        start = self._start_tokens(B, labels, tokens.device)
        x = torch.cat([start[:, None], self.embed(body.long())], dim=1)
        if padding is None:
            pos = self._positions(0, x.shape[1], tokens.device)
            return self.dropout(x if pos is None else x + pos), None
        n = padding.sum(1, keepdim=True)  # [B, 1]
        j = torch.arange(x.shape[1], device=tokens.device)[None]
        x = torch.where((j == n)[..., None], start[:, None], x)
        pos = self._positions_of((j - n).clamp(min=0))
        return self.dropout(x if pos is None else x + pos), j < n

    # ---- parallel -------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
        include_next: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        context_group=None,
    ) -> torch.Tensor:
        """tokens [B, T] (T >= 1) -> head parameters [B, T, n_params]; row t is the distribution of tokens[:, t].
        padding: bool [B, T], True at left padding: the real tokens' rows are what they are without it
        (the padding's rows mean nothing). include_next: one more row, the distribution of the token
        after the last ([B, T + 1, n_params]).
        cu_seqlens: packed documents: tokens [1, N] holds them one after another, document d being
            tokens cu_seqlens[d]:cu_seqlens[d + 1] (int [n + 1]); each is modelled as if alone (its own
            start token, labels [n], positions from 0). Linear attention only.
        context_group: context parallelism: every rank of this torch.distributed group passes the
            whole tokens [B, T] (and labels) and gets the rows of its segment of the positions,
            `CausalTransformer.segment(T, group)`; the activations are the segment's alone.
            Causal-linear attention only."""
        packed_docs = cu_seqlens.numel() - 1 if isinstance(cu_seqlens, torch.Tensor) else None
        self._check_tokens(tokens, labels, batch=packed_docs)  # (labels: one per document when packed)
        if cu_seqlens is not None or context_group is not None:
            if padding is not None or include_next or (cu_seqlens is not None and context_group is not None):
                raise ValueError(
                    "CausalTransformer: packed documents (cu_seqlens) and context parallelism "
                    "(context_group) each go alone: without padding, include_next or each other"
                )
            if cu_seqlens is not None:
                x, kwargs = self._packed_inputs(tokens, labels, cu_seqlens), {"cu_seqlens": cu_seqlens}
            else:
                x, kwargs = self._segment_inputs(tokens, labels, context_group), {"context_group": context_group}
            for block in self.blocks:
                x = block(x, **kwargs)
            return self.head(self.norm(x))
        x, mask = self._inputs(tokens, labels, with_last=include_next, padding=self._check_padding(tokens, padding))
        for block in self.blocks:
            x = block(x, key_padding_mask=mask)
        return self.head(self.norm(x))

    def _packed_inputs(self, tokens: torch.Tensor, labels: torch.Tensor | None, cu_seqlens: torch.Tensor):
        """The input of packed documents tokens [1, N]: each document its own start token (its label's)
        and positions from 0, as if alone."""
        lengths = ops.packed.check_cu_seqlens("CausalTransformer", cu_seqlens, tokens.shape[1], tokens.shape[0])
        n, device = len(lengths), tokens.device
        doc = torch.repeat_interleave(torch.arange(n, device=device), torch.tensor(lengths, device=device))
        positions = torch.arange(tokens.shape[1], device=device) - cu_seqlens.to(device).long()[doc]
        emb = self.embed(tokens[0].long())
        x = torch.cat([emb[:1], emb[:-1]])  # position t reads token t - 1 ...
        x = torch.where((positions == 0)[:, None], self._start_tokens(n, labels, device)[doc], x)  # ... or the start
        pos = self._positions_of(positions[None]) if tokens.shape[1] else None
        return self.dropout(x[None] if pos is None else x[None] + pos)

    def _segment_inputs(self, tokens: torch.Tensor, labels: torch.Tensor | None, group):
        """This rank's segment of the input of the whole sequences tokens [B, T] (context parallelism)."""
        import torch.distributed as dist

        a, b = ops.parallel.segment(tokens.shape[1], dist.get_rank(group), dist.get_world_size(group))
        if a == 0:
            x = torch.cat(
                [
                    self._start_tokens(tokens.shape[0], labels, tokens.device)[:, None],
                    self.embed(tokens[:, : b - 1].long()),
                ],
                dim=1,
            )
        else:
            x = self.embed(tokens[:, a - 1 : b - 1].long())
        pos = self._positions(a, b - a, tokens.device)
        return self.dropout(x if pos is None else x + pos)

    def nll(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, *, cu_seqlens=None, context_group=None
    ) -> torch.Tensor:
        """Negative log-likelihood of every token in nats, [B, T] (with `context_group`: of this rank's
        segment of the tokens, [B, T_r]; see `forward`)."""
        params = self(tokens, labels, cu_seqlens=cu_seqlens, context_group=context_group)
        if context_group is not None:
            tokens = tokens[:, self.segment(tokens.shape[1], context_group)]
        return self.head.nll(params, tokens.long())

    @staticmethod
    def segment(T: int, group) -> slice:
        """The positions of a length-T sequence this rank of `group` computes under context parallelism."""
        import torch.distributed as dist

        return slice(*ops.parallel.segment(T, dist.get_rank(group), dist.get_world_size(group)))

    def bits_per_dim(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log2-likelihood per token (per sub-pixel for images)."""
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"bits_per_dim: tokens must be [B, T] with T >= 1, got shape {list(tokens.shape)}")
        return self.nll(tokens, labels).mean() / math.log(2)

    # ---- recurrent ------------------------------------------------------------------------------
    def prefill(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
        all_rows: bool = False,
    ) -> tuple[torch.Tensor, ModelState]:
        """Run the prompt tokens [B, T0] (T0 may be 0) in parallel; returns the head parameters of the
        next token [B, n_params] (all_rows: of every position, [B, T0 + 1, n_params], as
        forward(include_next=True)) and the state to `step` from. padding: bool [B, T0], True at left
        padding (prompts of different lengths): it enters no state (a KV cache marks it as padding),
        and each row goes on at its own position."""
        if self.cfg.attention == "causal-lsh":
            raise ValueError(
                "CausalTransformer: causal-lsh attention has no recurrent state (its buckets depend on the "
                "whole sequence); generate() recomputes the prefix for every token instead"
            )
        self._check_tokens(tokens, labels)
        padding = self._check_padding(tokens, padding)
        x, mask = self._inputs(tokens, labels, with_last=True, padding=padding)
        states = []
        for block in self.blocks:
            x, state = block(x, return_state=True, key_padding_mask=mask)
            states.append(state)
        offsets = None if padding is None else padding.sum(1)
        return self.head(self.norm(x if all_rows else x[:, -1])), ModelState(states, x.shape[1], offsets)

    def step(
        self, token: torch.Tensor, state: ModelState, config: DecodeConfig = decode.DEFAULT
    ) -> tuple[torch.Tensor, ModelState]:
        """Feed one token [B]; returns the head parameters of the next token [B, n_params] and the state.
        With linear attention this costs the same at every position (the state is updated in place
        under torch.no_grad). On the CPU the whole step runs in one C call where that computes the
        same and is faster (decode.fused_step_for; config chooses and sets its precision)."""
        batches = {s.S.shape[0] if isinstance(s, LinearState) else s.batch for s in state.layers}
        if not isinstance(token, torch.Tensor) or token.dim() != 1 or batches != {token.shape[0]}:
            got = f"shape {list(token.shape)}" if isinstance(token, torch.Tensor) else type(token).__name__
            raise ValueError(f"CausalTransformer.step: token must be [B], B the state's batch {batches}; got {got}")
        if token.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"CausalTransformer.step: token must be an integer tensor (token ids), got {token.dtype}")
        if token.numel() and (int(token.min()) < 0 or int(token.max()) >= self.cfg.vocab_size):
            raise ValueError(
                f"CausalTransformer.step: token ids must lie in [0, vocab_size={self.cfg.vocab_size}), got values in "
                f"[{int(token.min())}, {int(token.max())}]"
            )
        decode.check_config("CausalTransformer.step", config)
        last = state.position if state.offsets is None else int((state.position - state.offsets).max())
        self.ensure_positions(last + 1)  # (before the fused step reads the table: it may grow)
        fused = decode.fused_step_for(self, token.shape[0], state, config)
        if fused is None:
            return self.step_pytorch(token, state)
        return decode.run_fused_step(fused, token, state), state

    def step_pytorch(self, token: torch.Tensor, state: ModelState) -> tuple[torch.Tensor, ModelState]:
        """`step` through the blocks' own step, one PyTorch operation at a time."""
        x = self.embed(token.long())
        if state.offsets is None:
            pos = self._positions(state.position, 1, token.device)
            pos = None if pos is None else pos[0]
        else:  # each row at its own position
            pos = self._positions_of((state.position - state.offsets)[:, None])
            pos = None if pos is None else pos[:, 0]
        if pos is not None:
            x = x + pos
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x, state.layers[i] = block.step(x, state.layers[i])
        state.position += 1
        return self.head(self.norm(x)), state

    def _apply(self, fn, *args, **kwargs):
        decode.forget(self)  # parameters may move or change dtype: the fused step is rebuilt on demand
        return super()._apply(fn, *args, **kwargs)

    # ---- what the fused C step reads (decode.fused) ------------------------------------------------
    def step_weights(self) -> decode.fused.StepWeights | None:
        """The weights by role for the fused C step (decode.fused.StepWeights), as they are now, or None
        where the C step does not compute what this model does: attention other than causal-linear, a
        feature map it lacks, or a layer that is not a plain nn.Linear / nn.LayerNorm (a wrapped one, a
        LoRA adapter say, computes more than its .weight, which the C step would silently drop)."""
        cfg = self.cfg
        if cfg.attention != "causal-linear" or cfg.feature_map not in decode.fused.FEATURE_MAPS:
            return None
        linear, norm = nn.Linear, nn.LayerNorm
        layers = []
        for b in self.blocks:
            mods = {
                "ln1": b.norm1,
                "qkv": b.attn.qkv,
                "out": b.attn.out,
                "ln2": b.norm2,
                "ff1": b.ff_in,
                "ff2": b.ff_out,
            }
            if any(type(mod) is not (norm if name.startswith("ln") else linear) for name, mod in mods.items()):
                return None
            layers.append(
                {
                    f"{name}_{kind}": mod.weight if kind == "w" else mod.bias
                    for name, mod in mods.items()
                    for kind in ("w", "b")
                }
            )
        final, proj = self.norm, self.head.proj
        if type(proj) is not linear or type(final) not in (norm, nn.Identity):
            return None
        is_norm = type(final) is norm
        io = {
            "embed": self.embed.weight,
            "pos": self.position_table(),
            "norm_w": final.weight if is_norm else None,
            "norm_b": final.bias if is_norm else None,
            "head_w": proj.weight,
            "head_b": proj.bias,
        }
        dk = cfg.d_model // cfg.n_heads
        return decode.fused.StepWeights(
            layers,
            io,
            n_heads=cfg.n_heads,
            dk=dk,
            dv=dk,
            pre_norm=cfg.norm == "pre",
            feature_map=cfg.feature_map,
            ln_eps=self.blocks[0].norm1.eps,
            norm_eps=final.eps if is_norm else 0.0,
            attn_eps=cfg.eps,
        )

    @staticmethod
    def measure_fused_step() -> tuple[float, float]:
        """Seconds per token at batch 1 of the fused C step and of the PyTorch step
        (decode.measure_fused_step) on a representative model: 4 blocks, d_model 256, 8 heads, d_ff
        1024, a mixture-of-logistics head. The measurement behind native.verdict("fused_step")."""
        with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
            cfg = ModelConfig(vocab_size=256, max_len=64, d_model=256, n_layers=4, n_heads=8, d_ff=1024, head="mol")
            return decode.measure_fused_step(CausalTransformer(cfg).eval())

    @torch.no_grad()
    def generate(
        self,
        n: int | None = None,
        max_new_tokens: int | None = None,
        *,
        prompt: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        mode: str = "rnn",
        padding: torch.Tensor | None = None,
        config: DecodeConfig = decode.DEFAULT,
    ) -> torch.Tensor:
        """Sample continuations. Returns [B, T0 + max_new_tokens] tokens (prompt included).

        n: batch size when there is no prompt (and no labels); prompt: [B, T0] tokens to continue;
        labels: [B] classes of a class-conditional model; max_new_tokens defaults to max_len - T0 and
        may go past max_len except with learned positions (an RNN's only length limit is its positions).
        temperature 0 picks the most likely token (greedy). mode "rnn": prefill then one `step` per
        token (O(1) per token for linear attention, a KV cache for softmax); "recompute": re-run the
        whole prefix in parallel for every token (the paper's softmax baseline). LSH attention has no
        recurrent form (its buckets depend on the whole sequence), so it always recomputes.
        padding: bool [B, T0], True at the left padding of prompts of different lengths; each row
        is continued as if it were alone. config: how the CPU steps (decode.DecodeConfig: the fused
        C step or not, up to which batch, its precision).
        """
        device = next(self.parameters()).device
        check_sampling("generate", temperature, top_k, top_p)
        prompt, max_new_tokens = decode.check_generate(
            n, max_new_tokens, prompt, labels, mode, config, self.cfg.max_len, self.cfg.positional == "learned", device
        )
        if self.cfg.attention == "causal-lsh":
            mode = "recompute"
        if config.weights != torch.float32:
            decode.forget(self)  # fresh low-precision copies of the current weights
        T0 = prompt.shape[1]
        self.ensure_positions(T0 + max_new_tokens)  # (grown once, before any fused step reads it)
        out = torch.empty(prompt.shape[0], T0 + max_new_tokens, dtype=torch.long, device=device)
        out[:, :T0] = prompt
        if max_new_tokens == 0:
            return out
        if padding is not None:
            padding = self._check_padding(prompt, padding.to(device))
            if padding is not None:
                padding = torch.cat([padding, padding.new_zeros(prompt.shape[0], max_new_tokens)], 1)
        sampling = decode.Sampling(temperature, top_k, top_p, generator)
        stepper = decode.stepper(self, out, T0, mode, labels, padding, sampling, config)
        t = T0
        while t < T0 + max_new_tokens:
            t = stepper.advance(out, t, T0 + max_new_tokens)
        return out
