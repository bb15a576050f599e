"""The `linear-transformers` command: train, sample, eval, export, web, bench, experiment, demo.

Options of train, sample, eval, export and web are generated from the config dataclasses
(ModelConfig, TrainConfig, SampleConfig, EvalConfig, ExportConfig, WebConfig; options.py): every
field is an option with its default and help, and an unknown option is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import decode
from .checkpoint import check_output_path, load_model, model_config, read_config, resolve_checkpoint, unused_path
from .commands import given_options
from .data.images import image_grid, write_png
from .decode import PRECISIONS, DecodeConfig, fused
from .export import ExportConfig, run_export
from .heads import check_sampling
from .model import ModelConfig
from .options import Parser, add_options, from_args, option
from .train import TrainConfig, TrainingDiverged, evaluate, resolve_device, train
from .web import WebConfig, run_web

# ModelConfig fields that the data decides (vocabulary, length, classes): not options of `train`.
DERIVED_MODEL_FIELDS = ("vocab_size", "n_classes", "max_len")


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
    cpu_precision: str = option("float32", "linear RNN on the CPU: float32, bf16-weights or bf16 (faster, see README)")
    fused_step: bool = option(True, "linear RNN on the CPU: the fused C step where it applies and measured faster "
                              "(--no-fused-step: PyTorch's step; the same tokens)")  # fmt: skip

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


@dataclass
class EvalConfig:
    checkpoint: str = option("runs/model", "run folder or checkpoint folder")
    batches: int = option(0, "test batches (0: the whole test split)")
    batch_size: int = option(64, "test sequences per batch")
    data_path: str = option("", "where the data is now (default: where training found it)")
    device: str = option("auto", "auto, cpu or cuda")

    def __post_init__(self) -> None:
        if self.batches < 0:
            raise ValueError(f"--batches must be >= 0 (0: the whole test split), got {self.batches}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


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
        from .data import levels_to_images

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
    """Text from a linearised pretrained model (`linearize`'s model/ folder): its own tokenizer, and
    transformers' generate() running it as an RNN (LinearizedCache), for any number of new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import linear_transformers.linearize  # noqa: F401 (registers linear_llama)

    if not cfg.prompt:
        raise ValueError("sample: a linearised language model needs --prompt, the text to continue")
    out = _sample_output(cfg, ".txt")
    tok = AutoTokenizer.from_pretrained(cfg.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(cfg.checkpoint).to(device).eval()
    ids = tok([cfg.prompt] * cfg.n, return_tensors="pt")["input_ids"].to(device)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k or None, "top_p": cfg.top_p}
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=cfg.max_new_tokens or 100, pad_token_id=tok.eos_token_id,
                                **(sampling if cfg.temperature > 0 else {"do_sample": False}))  # fmt: skip
    text = "\n\n".join(tok.decode(row, skip_special_tokens=True) for row in tokens)
    with open(out, "x") as f:
        f.write(text + "\n")
    print(text[:2000])
    new = tokens.shape[1] - ids.shape[1]
    print(f"wrote {out} ({cfg.n} samples of {new} new tokens in {time.perf_counter() - start:.1f} s, as an RNN)")
    return out


def _decode_config(model, name: str, fused_step: bool, device: torch.device) -> DecodeConfig:
    """--cpu-precision and --fused-step as a DecodeConfig: a precision is refused where the fused CPU
    step would not run (so it cannot be ignored)."""
    if name == "float32":
        return DecodeConfig(fused=fused_step)
    if not fused_step:
        raise ValueError(f"sample: --cpu-precision {name} is the fused CPU step's precision; drop --no-fused-step")
    reason = decode.why_not_fused(model, device)
    if reason is not None:
        raise ValueError(f"sample: --cpu-precision {name} needs the fused CPU step, but {reason}")
    if name == "bf16" and not fused.has_bf16_dot():
        raise ValueError("sample: --cpu-precision bf16 needs a CPU with AVX512-BF16; bf16-weights runs anywhere")
    return DecodeConfig.precision(name)


def run_eval(cfg: EvalConfig) -> float:
    from . import data as datasets

    device = resolve_device(cfg.device)
    model, config = load_model(cfg.checkpoint, device)
    t = config.get("train")
    if not t:
        raise ValueError(
            f"eval: {cfg.checkpoint} does not record the data it trained on (a transformers folder saved "
            "without `linear-transformers export --hf`); evaluate the checkpoint"
        )
    t = {**TrainConfig().__dict__, **t}  # a transformers folder keeps only the data settings
    data_path = cfg.data_path or t["data_path"] or None
    d = datasets.load(t["data"], data_path, size=t["image_size"], levels=t["levels"], seq_len=t["seq_len"])
    # (the device it trained on may not be here: the evaluation's own)
    train_cfg = TrainConfig(**{**t, "batch_size": cfg.batch_size, "conditional": bool(model.cfg.n_classes),
                               "device": str(device), "data_path": data_path or ""})  # fmt: skip
    batches = cfg.batches or -(-d.n_items("test") // cfg.batch_size)
    bpd = evaluate(model, d, train_cfg, device, batches)
    print(f"{d.name} test: {bpd:.4f} bits/dim over {min(batches * cfg.batch_size, d.n_items('test'))} sequences")
    return bpd


@dataclass
class CommandOptions:
    debug: bool = option(False, "show the traceback of a user error")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="linear-transformers", description=__doc__.splitlines()[0])
    add_options(parser, CommandOptions, title="every command")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"linear-transformers {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # name -> its parser
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("train", help="train (or resume) a causal transformer", formatter_class=fmt)
    add_options(p, ModelConfig, skip=DERIVED_MODEL_FIELDS)
    add_options(p, TrainConfig)
    p = sub.add_parser("sample", help="generate images (PNG grid) or text from a checkpoint", formatter_class=fmt)
    add_options(p, SampleConfig)
    p = sub.add_parser("eval", help="test bits/dim of a checkpoint", formatter_class=fmt)
    add_options(p, EvalConfig)
    p = sub.add_parser("export", help="export a causal-linear model's recurrent step to ONNX", formatter_class=fmt)
    add_options(p, ExportConfig)
    p = sub.add_parser("web", help="serve the in-browser generation demo on localhost", formatter_class=fmt)
    add_options(p, WebConfig)
    sub.add_parser("bench", help="benchmarks: linear-transformers bench attention|generate|gpu --help", add_help=False)
    sub.add_parser(
        "experiment", help="the paper's experiments: linear-transformers experiment copy|image|speech --help",
        add_help=False,
    )  # fmt: skip
    sub.add_parser(
        "demo", help="train a small model on MNIST and generate digits as an RNN (make demo)", add_help=False
    )
    sub.add_parser(
        "linearize", help="turn SmolLM2-135M into linear attention (attention transfer): linearize --help",
        add_help=False,
    )  # fmt: skip
    return parser


def resumed_configs(model_cfg: ModelConfig, train_cfg: TrainConfig, given: set[str]):
    """`train --resume`: every setting left out is the run's own (from its latest checkpoint);
    those given are kept, and train() refuses the ones that would change the run."""
    try:
        ckpt = resolve_checkpoint(train_cfg.out)
    except FileNotFoundError:
        return model_cfg, train_cfg  # train() says there is nothing to resume
    stored = read_config(ckpt)
    model_config(stored, ckpt)  # the run's own settings must make a model (one-line error if damaged)
    model_values = {k: v for k, v in stored["model"].items() if k not in given}
    # (the run folder is where the command line points: it may have moved since)
    train_values = {k: v for k, v in stored.get("train", {}).items() if k not in given and k not in ("resume", "out")}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return (
        dataclasses.replace(model_cfg, **{k: v for k, v in model_values.items() if k in model_fields}),
        dataclasses.replace(train_cfg, **{k: v for k, v in train_values.items() if k in train_fields}),
    )


# What a user can cause by what they typed or pointed at (a bad value, a missing or existing file):
# one line and exit status 2. Anything else is a bug in the program and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               TrainingDiverged)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """The command line. A user error prints `linear-transformers <command>: error: <what>` and
    returns 2 (`--debug` shows the traceback instead); Ctrl-C returns 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    try:
        return _run(argv)
    except SystemExit as e:  # argparse: --help (0), or a mistake on the command line it has said in one line (2)
        return e.code if isinstance(e.code, int) else 2
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"linear-transformers {command}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # too big for this machine: the user's sizes, said in one line
        if debug or not (isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(f"linear-transformers {command}: error: out of memory ({first}); use smaller sizes (batch, length, "
              "model)", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"linear-transformers {command}: interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str]) -> int:
    if argv and argv[0] == "bench":
        from .bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "experiment":
        from .experiments.__main__ import main as experiment_main

        return experiment_main(argv[1:])
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "linearize":
        from .linearize.transfer import main as linearize_main  # needs the [linearize] extra

        return linearize_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        model_cfg, train_cfg = from_args(ModelConfig, args), from_args(TrainConfig, args)
        if train_cfg.resume:
            given = given_options(parser.commands["train"], argv[argv.index("train") + 1 :])
            model_cfg, train_cfg = resumed_configs(model_cfg, train_cfg, given)
        ckpt = train(model_cfg, train_cfg)
        print(f"checkpoint: {ckpt}")
    elif args.command == "sample":
        run_sample(from_args(SampleConfig, args))
    elif args.command == "eval":
        run_eval(from_args(EvalConfig, args))
    elif args.command == "export":
        run_export(from_args(ExportConfig, args))
    elif args.command == "web":
        run_web(from_args(WebConfig, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
