"""generate images (PNG grid) or text from a checkpoint (ours, or a linearised language model)"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import decode
from ..checkpoint import check_output_path, load_model, unused_path
from ..data.images import image_grid, write_png
from ..decode import PRECISIONS, DecodeConfig, fused
from ..heads import check_sampling
from ..options import add_options, from_args, option
from ..train import resolve_device


@dataclass
class SampleConfig:
    checkpoint: str = option("runs/model", "run folder (its latest checkpoint) or checkpoint folder")
    n: int = option(10, "samples (per class for a class-conditional image model)")
    temperature: float = option(1.0, "0 picks the most likely token")
    top_k: int = option(0, "keep the k most likely tokens (0: all)")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set with this much probability")
    mode: str = option("rnn", "rnn (O(1) per token for linear attention; KV cache for softmax) or recompute")
    prompt: str = option("", "text models: the text to continue")
    max_new_tokens: int = option(
        0, "text models: tokens to generate (0: fill the model's max_len; 100 for a linearised language model)"
    )
    batch_size: int = option(100, "sequences generated at once")
    seed: int = option(0, "seed of the sampler's random generator")
    out: str = option(
        "",
        "output file, which must not exist yet (default: samples.png or samples.txt in the "
        "current folder, or samples-N.* if taken)",
    )
    device: str = option("auto", "auto, cpu or cuda")
    cpu_precision: str = option(
        "float32",
        "linear RNN on the CPU, the fused step's weights: float32, bf16-weights, "
        "bf16 (bfloat16 dot products, AVX512-BF16), int8 (int8 weights) or int8-dot (int8 weights and "
        "int8 dot products: faster for batches; see README)",
    )
    fused_step: bool = option(
        True,
        "linear RNN on the CPU: the fused C step where it applies and measured faster "
        "(--no-fused-step: PyTorch's step; the same tokens)",
    )

    def __post_init__(self) -> None:
        if self.cpu_precision not in PRECISIONS:
            raise ValueError(f"--cpu-precision must be one of {', '.join(PRECISIONS)}, got {self.cpu_precision!r}")
        if self.mode not in ("rnn", "recompute"):
            raise ValueError(f"--mode must be rnn or recompute, got {self.mode!r}")
        for name in ("n", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0 (0: fill max_len), got {self.max_new_tokens}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0: every token), got {self.top_k}")
        check_sampling("sample", self.temperature, self.top_k or None, self.top_p)


def _sample_output(cfg: SampleConfig, suffix: str) -> Path:
    """Where samples go: --out (a new file, outside any run folder), or the first free samples[-N]
    name in the current folder. Checked before any work, so a bad path fails at once."""
    if not cfg.out:
        return unused_path(Path("samples" + suffix))
    out = Path(cfg.out)
    check_output_path(out, "sample --out")
    return out


def run_sample(cfg: SampleConfig) -> Path:
    device = resolve_device(cfg.device)
    if _model_type(Path(cfg.checkpoint)) == "linear_llama":
        return _sample_linearized(cfg, device)
    model, config = load_model(cfg.checkpoint, device)
    decode_config = _decode_config(model, cfg.cpu_precision, cfg.fused_step, device)
    meta = config["data"]
    if meta["alphabet"] is None:
        for option, value in (("--prompt", cfg.prompt), ("--max-new-tokens", cfg.max_new_tokens)):
            if value:
                raise ValueError(f"{option} is for text models; this is an image model, whose samples are whole images")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    kwargs = dict(
        temperature=cfg.temperature,
        top_k=cfg.top_k or None,
        top_p=cfg.top_p,
        generator=generator,
        mode=cfg.mode,
        config=decode_config,
    )
    start = time.perf_counter()
    if meta["alphabet"] is not None:
        alphabet = meta["alphabet"]
        unknown = sorted(set(cfg.prompt) - set(alphabet))
        if unknown:
            raise ValueError(f"sample: the prompt has characters the model never saw: {unknown}")
        out = _sample_output(cfg, ".txt")
        prompt = torch.tensor([[alphabet.index(c) for c in cfg.prompt]] * cfg.n, dtype=torch.long, device=device)
        new = cfg.max_new_tokens or model.cfg.max_len - prompt.shape[1]
        tokens = model.generate(prompt=prompt, max_new_tokens=new, **kwargs)
        text = "\n\n".join("".join(alphabet[t] for t in row.tolist()) for row in tokens)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(text[:2000])
    else:
        out = _sample_output(cfg, ".png")
        n_classes = model.cfg.n_classes
        labels = torch.arange(n_classes, device=device).repeat_interleave(cfg.n) if n_classes else None
        total = len(labels) if labels is not None else cfg.n
        chunks = []
        for s in range(0, total, cfg.batch_size):
            lab = labels[s : s + cfg.batch_size] if labels is not None else None
            chunks.append(model.generate(n=min(cfg.batch_size, total - s), labels=lab, **kwargs).cpu())
        tokens = torch.cat(chunks)
        from ..data import levels_to_images

        images = levels_to_images(tokens, tuple(meta["image_shape"]), meta["vocab_size"])
        write_png(out, image_grid(images, rows=n_classes or int(np.ceil(np.sqrt(total)))))
    elapsed = time.perf_counter() - start
    precision = "" if cfg.cpu_precision == "float32" else f", CPU precision {cfg.cpu_precision}"
    print(f"wrote {out} ({len(tokens)} samples in {elapsed:.1f} s, mode {cfg.mode}{precision})")
    return out


def _model_type(folder: Path) -> str | None:
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _sample_linearized(cfg: SampleConfig, device: torch.device) -> Path:
    """Text from a linearised pretrained model (`linearize`'s model/ folder): its own tokenizer, the
    prompt through the model's forward, then every token through the fused C step and the C sampler
    (linearize.generate) as an RNN, for any number of new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..linearize import generate

    if not cfg.prompt:
        raise ValueError("sample: a linearised language model needs --prompt, the text to continue")
    out = _sample_output(cfg, ".txt")
    tok = AutoTokenizer.from_pretrained(cfg.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(cfg.checkpoint).to(device).eval()
    model.decode_config = _decode_config(model, cfg.cpu_precision, cfg.fused_step, device, _why_not_fused_llama)
    ids = tok([cfg.prompt] * cfg.n, return_tensors="pt")["input_ids"]
    start = time.perf_counter()
    tokens = generate(
        model,
        ids,
        cfg.max_new_tokens or 100,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_token_id=tok.eos_token_id,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    text = "\n\n".join(tok.decode(row, skip_special_tokens=True) for row in tokens)
    with open(out, "x") as f:
        f.write(text + "\n")
    print(text[:2000])
    new = tokens.shape[1] - ids.shape[1]
    print(f"wrote {out} ({cfg.n} samples of {new} new tokens in {time.perf_counter() - start:.1f} s, as an RNN)")
    return out


def _why_not_fused_llama(model, device: torch.device) -> str | None:
    from ..decode import llama
    from ..linearize.step import why_not_fused

    if device.type != "cpu":
        return f"it is for generation on the CPU; the device is {device}"
    if not llama.available():
        return f"the C step is unavailable: {llama.unavailable_reason()}"
    return why_not_fused(model)


def _decode_config(model, name: str, fused_step: bool, device: torch.device, why_not=None) -> DecodeConfig:
    """--cpu-precision and --fused-step as a DecodeConfig: a precision is refused where the fused CPU
    step would not run (so it cannot be ignored). why_not(model, device): the model family's reason
    (default: our CausalTransformer's, decode.why_not_fused)."""
    if name == "float32":
        return DecodeConfig(fused=fused_step)
    if not fused_step:
        raise ValueError(f"sample: --cpu-precision {name} is the fused CPU step's precision; drop --no-fused-step")
    reason = (why_not or decode.why_not_fused)(model, device)
    if reason is not None:
        raise ValueError(f"sample: --cpu-precision {name} needs the fused CPU step, but {reason}")
    if name == "bf16" and not fused.has_bf16_dot():
        raise ValueError("sample: --cpu-precision bf16 needs a CPU with AVX512-BF16; bf16-weights runs anywhere")
    return DecodeConfig.precision(name)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, SampleConfig)


def main(args: argparse.Namespace) -> int:
    run_sample(from_args(SampleConfig, args))
    return 0
