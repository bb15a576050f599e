"""Hugging Face `transformers` integration: our models as `AutoModelForCausalLM`, decoding as an RNN.

    pip install 'linear_transformers[hf]'

    import linear_transformers.hf                       # registers the model type with the Auto classes
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.generate(**tokenizer("ROMEO:", return_tensors="pt"), max_new_tokens=100, do_sample=True)

`LinearTransformerForCausalLM` wraps a `CausalTransformer` (the same weights, the same code): its
forward returns transformers' `CausalLMOutputWithPast`, so `generate()`, `Trainer`, `pipeline` and
`peft` work. Decoding keeps a `RecurrentStateCache`: the parallel prefill leaves one state per
layer (S and z for linear attention, a KV cache for the softmax baseline), then every new token is
one `CausalTransformer.step` (the fused C step on the CPU where it applies): O(1) per token for
linear attention. A recurrent state cannot be cropped back to an earlier position (assisted
decoding asks for that): it says so. Left padding (attention_mask 0) enters no state; each row's
positions start at its first real token.

Token ids follow our model, with one difference of convention: transformers' logits at position
t predict token t + 1, so the distribution of the first token (which our model predicts from its
start token) is not among them. The tokenizer (`char_tokenizer`) is our character vocabulary plus
a padding token and an unknown token whose ids lie past the model's vocabulary: padding is masked
and never embedded; an unknown character is an error.

`save_hf(model, folder, data)` writes a folder that `from_pretrained`, `pipeline` and our CLI
(`sample`, `eval`: `load_hf`) read; `linear-transformers export --hf DIR` converts a checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationConfig,
        GenerationMixin,
        LogitsProcessor,
        PreTrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerFast,
    )
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError(
        f"linear_transformers.hf needs Hugging Face transformers: pip install 'linear_transformers[hf]' ({e})"
    ) from None

from .heads import check_sampling
from .heads import sample as sample_tokens
from .model import CausalTransformer, ModelConfig, ModelState, sinusoidal_table

MODEL_TYPE = "linear_transformer"
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"


class LinearTransformerConfig(PreTrainedConfig):
    """`ModelConfig`'s fields (the same names and defaults) as a transformers config, plus `data`:
    what the model was trained on (our data meta: the alphabet of a text model, the image shape),
    and `training`: the data settings of its training run (so `linear-transformers eval` finds
    the test split)."""

    model_type = MODEL_TYPE
    attribute_map = {  # noqa: RUF012 (transformers' own pattern: a class attribute, not a field)
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_len",
    }

    vocab_size: int = 256
    n_classes: int = 0
    max_len: int = 784
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 8
    d_ff: int = 1024
    dropout: float = 0.0
    attention: str = "causal-linear"
    feature_map: str = "elu"
    positional: str = "sinusoidal"
    norm: str = "pre"
    head: str = "categorical"
    mol_components: int = 10
    eps: float = 1e-6
    chunk_size: int = 64
    lsh_hashes: int = 1
    lsh_buckets: int = 64
    lsh_chunk: int = 0
    data: dict | None = None
    training: dict | None = None  # the data settings it was trained with (data, data_path, image_size, ...)
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        self.model_config()  # our checks, with their messages
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})

    @classmethod
    def from_model_config(
        cls, cfg: ModelConfig, data: dict | None = None, training: dict | None = None, **kwargs
    ) -> LinearTransformerConfig:
        return cls(**cfg.to_dict(), data=data, training=training, **kwargs)


class RecurrentStateCache(Cache):
    """transformers' `Cache` over our `ModelState`: per layer the linear-attention state (S, z) or
    the softmax baseline's KV cache, and the tokens seen. Beam search reorders it (`reorder_cache`),
    batch expansion and selection work; `crop` cannot work on a recurrent state and says so."""

    def __init__(self, n_layers: int, state: ModelState | None = None, seen: int = 0) -> None:
        super().__init__(layers=[])
        self.n_layers = n_layers
        self.state = state
        self.seen = seen  # tokens fed so far, padding included (transformers' sequence length)

    def __len__(self) -> int:
        return self.n_layers

    def __repr__(self) -> str:
        return f"RecurrentStateCache(layers={self.n_layers}, seen={self.seen}, batch={self.batch_size})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def _select(self, index: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.index_select(index.to(self._device()))

    def _device(self) -> torch.device:
        layer = self.state.layers[0]
        return layer.S.device if hasattr(layer, "S") else layer.device

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self._select(torch.arange(self.batch_size).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise ValueError(
            "RecurrentStateCache: a recurrent state cannot be cropped back to an earlier position (it holds a "
            "sum over the tokens, not the tokens); decode without assisted generation, or prefill again"
        )

    def reset(self) -> None:
        self.state, self.seen = None, 0

    @property
    def batch_size(self) -> int:
        if self.state is None:
            return -1
        layer = self.state.layers[0]
        return layer.S.shape[0] if hasattr(layer, "S") else layer.batch

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None


class LinearTransformerForCausalLM(PreTrainedModel, GenerationMixin):
    """A `CausalTransformer` as a transformers causal language model (see the module docstring)."""

    config_class = LinearTransformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # no assisted decoding: the state cannot go back
    _no_split_modules = ["Block"]  # noqa: RUF012

    def __init__(self, config: LinearTransformerConfig) -> None:
        super().__init__(config)
        self.model = CausalTransformer(config.model_config())
        self.post_init()
        register_lora_targets()  # (peft may have been imported since this module was)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward makes its own RecurrentStateCache

    def _init_weights(self, module) -> None:
        # the model's own (PyTorch's default) initialisation, as CausalTransformer has it; the
        # positional table is a buffer that is not saved: from_pretrained makes it here
        if module is not self and hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if isinstance(module, CausalTransformer) and hasattr(module, "pos_table"):
            with torch.no_grad():
                module.pos_table.copy_(sinusoidal_table(module.cfg.max_len, module.cfg.d_model))

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value) -> None:
        self.model.embed = value

    def get_output_embeddings(self):
        return None  # the head may be a mixture of logistics; nothing is tied

    def _logits(self, params: torch.Tensor) -> torch.Tensor:
        """Head parameters -> logits over the vocabulary (a mixture-of-logistics head gives its
        log-probabilities, which are logits of the same distribution)."""
        return params if self.config.head == "categorical" else self.model.head.log_probs(params)

    def _tokens(self, input_ids: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        V = self.config.vocab_size
        outside = input_ids >= V
        if padding is not None:
            outside = outside & ~padding
        if bool(outside.any()):
            bad = sorted(set(input_ids[outside].tolist()))[:5]
            raise ValueError(
                f"LinearTransformerForCausalLM: token ids {bad} are not in the model's vocabulary (0..{V - 1}); "
                f"id {V} is the tokenizer's padding (give attention_mask) and {V + 1} an unknown character"
            )
        return input_ids if padding is None else input_ids.masked_fill(padding, 0)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: RecurrentStateCache | None = None,
        past_key_values: RecurrentStateCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> logits [B, T, vocab] (position t predicts token t + 1), the loss when
        labels are given (shifted inside, -100 ignored), and the cache when use_cache. attention_mask
        [B, past + T]: 0 at left padding. position_ids are ignored: positions follow attention_mask."""
        if inputs_embeds is not None:
            raise ValueError("LinearTransformerForCausalLM: inputs_embeds is not supported; pass input_ids")
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            got = None if input_ids is None else list(input_ids.shape)
            raise ValueError(f"LinearTransformerForCausalLM: input_ids must be [B, T] with T >= 1, got {got}")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, RecurrentStateCache):
            raise TypeError(
                f"LinearTransformerForCausalLM: the cache must be a RecurrentStateCache, got {type(cache).__name__}"
            )
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        T = input_ids.shape[1]
        mask = None if attention_mask is None else attention_mask.to(input_ids.device) == 0
        if cache is None or cache.state is None:
            padding = None if mask is None else mask[:, -T:]
            tokens = self._tokens(input_ids, padding)
            if use_cache:
                params, state = self.model.prefill(tokens, padding=padding, all_rows=True)
                cache = cache if cache is not None else RecurrentStateCache(self.config.n_layers)
                cache.state, cache.seen = state, T
            else:
                params = self.model(tokens, padding=padding, include_next=True)
            params = params[:, 1:]  # row 0 is the first token's distribution, given the start token alone
        else:
            if mask is not None and bool(mask[:, -T:].any()):
                raise ValueError("LinearTransformerForCausalLM: padding after the prefill; pad prompts on the left")
            tokens = self._tokens(input_ids, None)
            rows = []
            for t in range(T):  # one recurrent step per new token
                p, cache.state = self.model.step(tokens[:, t], cache.state)
                rows.append(p)
            cache.seen += T
            params = rows[0][:, None] if T == 1 else torch.stack(rows, 1)
        logits = self._logits(params)
        loss = None
        if labels is not None:  # (on every position, whatever logits_to_keep returns)
            shifted = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


class SameDraws(LogitsProcessor):
    """Makes `generate(do_sample=True, logits_processor=[SameDraws(generator, temperature, top_k,
    top_p)])` draw exactly as our `CausalTransformer.generate(..., temperature, top_k, top_p,
    generator)`: it draws each token with our sampler (from the log-softmax of the logits, with
    these settings) and leaves only that token possible for transformers' own draw. (transformers
    runs a custom processor before its temperature and top-k/top-p warpers: give the settings here.)"""

    def __init__(
        self,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> None:
        check_sampling("SameDraws", temperature, top_k, top_p)
        self.generator, self.temperature, self.top_k, self.top_p = generator, temperature, top_k, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        log_probs = torch.log_softmax(scores.float(), dim=-1)
        token = sample_tokens(log_probs, self.temperature, self.top_k, self.top_p, self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)


# ---- the tokenizer --------------------------------------------------------------------------------


def char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """Our character vocabulary (token i = alphabet[i]) as a fast tokenizer, with <pad> and <unk>
    after it (ids len(alphabet) and len(alphabet) + 1) and padding on the left."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if len(set(alphabet)) != len(alphabet) or not alphabet:
        raise ValueError("char_tokenizer: the alphabet must be a non-empty string of distinct characters")
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab[PAD_TOKEN], vocab[UNK_TOKEN] = len(alphabet), len(alphabet) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


# ---- folders --------------------------------------------------------------------------------------


# the training settings that say where its data was and how it was cut: what `eval` needs
TRAINING_DATA_FIELDS = ("data", "data_path", "image_size", "levels", "seq_len", "conditional")


def from_model(
    model: CausalTransformer, data: dict | None = None, training: dict | None = None
) -> LinearTransformerForCausalLM:
    """The transformers model holding a copy of `model`'s weights."""
    if training is not None:
        training = {k: training[k] for k in TRAINING_DATA_FIELDS if k in training}
        if training.get("data_path"):  # a folder to share names its data, not this machine's directories
            training["data_path"] = Path(training["data_path"]).name
    hf = LinearTransformerForCausalLM(LinearTransformerConfig.from_model_config(model.cfg, data, training))
    hf.model.load_state_dict(model.state_dict())
    return hf.eval()


def save_hf(
    model: CausalTransformer, folder: str | Path, data: dict | None = None, training: dict | None = None
) -> Path:
    """Write `model` as a transformers folder: config.json, model.safetensors, generation_config.json
    and, for a text model (data["alphabet"]), the tokenizer. data: our data meta (a checkpoint's
    config["data"]); training: its training settings (config["train"]: the data fields are kept)."""
    folder = Path(folder)
    hf = from_model(model, data, training)
    alphabet = (data or {}).get("alphabet")
    if alphabet:
        tokenizer = char_tokenizer(alphabet)
        hf.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, do_sample=True)
        tokenizer.save_pretrained(folder)
    hf.save_pretrained(folder)
    return folder


def load_hf(folder: str | Path, device: str | torch.device = "cpu") -> tuple[CausalTransformer, dict]:
    """Our model and a config dict like a checkpoint's ({"model", "data", "train", "step"}) from a
    transformers folder written by save_hf / save_pretrained (or trained further with Trainer);
    "train" holds only the data settings, and is None when the folder does not record them."""
    from .integrity import read_sums, verify_file

    folder = Path(folder)
    for name in read_sums(folder) or {}:  # written by `export --hf`: a damaged file is named, not loaded
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} is missing (listed in {folder / 'SHA256SUMS'})")
        verify_file(folder, name, None)
    try:
        hf = LinearTransformerForCausalLM.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as e:  # safetensors' errors are among them
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{folder}: not a loadable transformers folder ({first[:300]})") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{folder}: a damaged weights file ({str(e)[:300]})") from None
    model = hf.model.to(device).eval()
    data = hf.config.data or {"alphabet": None}
    return model, {"model": model.cfg.to_dict(), "data": data, "train": hf.config.training, "step": None}


# LoRA's default targets for this model type: the attention projections (qkv: queries, keys and values
# in one Linear; out). `LoraConfig(task_type="CAUSAL_LM")` without target_modules finds them once
# they are in peft's table: registered here when peft is imported, and again when a model is built.
LORA_TARGETS = ["qkv", "out"]


def register_lora_targets() -> bool:
    """Add this model type's LoRA targets to peft's default table, if peft is imported (importing it
    here would cost seconds for users who never use it). Returns whether they are registered."""
    constants = sys.modules.get("peft.utils.constants")
    if constants is None:
        return False
    constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(MODEL_TYPE, list(LORA_TARGETS))
    return True


register_lora_targets()
AutoConfig.register(MODEL_TYPE, LinearTransformerConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearTransformerConfig, LinearTransformerForCausalLM, exist_ok=True)
