"""Export the recurrent step of a causal linear transformer to ONNX (`linear-transformers export`).

With linear attention the whole model is an RNN with a fixed-size state, so one step is a small
static graph that any ONNX runtime (onnxruntime in Python, onnxruntime-web in a browser) can run:

    inputs   token [B] int64, position [1] int64, S_0, z_0, ..., S_{L-1}, z_{L-1}
    outputs  params [B, n_params], log_probs [B, vocab], position_out [1], S_0_out, z_0_out, ...

S_i [B, H, Dk', Dv] and z_i [B, H, Dk'] are layer i's state (float32, zeros to start); position is
the index of the token being fed. A token id >= vocab_size is a start token: vocab_size + class for
a class-conditional model, vocab_size for an unconditional one; it goes in first, at position 0,
and its outputs are the distribution of the first token (what `CausalTransformer.prefill` of an
empty prompt gives). `params` are the head's parameters (logits, or the mixture of logistics);
`log_probs` the distribution over all tokens, so a client samples without knowing the head.

A JSON sidecar (same name, .json) records the model config, the data layout (image shape,
alphabet), the tensor names and shapes, and the verification: the file is run with onnxruntime
against the PyTorch model's own `step` for a few hundred steps before the export is kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import check_output_path, load_model, owned_by_training
from .integrity import SUMS, write_sums
from .model import CausalTransformer
from .ops.step import step_functional
from .options import add_options, from_args, option

FORMAT = "linear-transformers-step"
FORMAT_VERSION = 1


@dataclass
class ExportConfig:
    checkpoint: str = option("runs/model", "run folder (its latest checkpoint) or checkpoint folder")
    onnx: str = option("model.onnx", "the ONNX file to write (the JSON sidecar goes next to it)")
    opset: int = option(18, "ONNX opset of the graph")
    exporter: str = option(
        "torchscript", 'torch\'s "torchscript" exporter (fast; deprecated by torch) or "dynamo" (onnxscript)'
    )
    verify_steps: int = option(300, "steps run with onnxruntime against PyTorch before the file is kept (0: skip)")
    tolerance: float = option(1e-4, "largest difference allowed: params, probabilities; states relative to their size")
    hf: str = option("", "write a Hugging Face transformers folder here instead of ONNX (pip install '.[hf]')")

    def __post_init__(self) -> None:
        # the sidecar is the same path with .json: any other suffix could overwrite a JSON file (or a
        # checkpoint's config.json) and leave no ONNX file
        if Path(self.onnx).suffix != ".onnx":
            raise ValueError(f"--onnx must name a .onnx file (its .json sidecar goes beside it), got {self.onnx!r}")
        from torch.onnx._constants import ONNX_MAX_OPSET

        if not 13 <= self.opset <= ONNX_MAX_OPSET:
            raise ValueError(f"--opset must be in [13, {ONNX_MAX_OPSET}] (this torch's exporter), got {self.opset}")
        if self.verify_steps < 0:
            raise ValueError(f"--verify-steps must be >= 0 (0: skip the check), got {self.verify_steps}")
        if not self.tolerance > 0:
            raise ValueError(f"--tolerance must be > 0, got {self.tolerance}")


def check_exportable(model: CausalTransformer) -> None:
    """A clear error for models whose step is not a fixed-size graph."""
    kind = model.cfg.attention
    if kind == "causal-softmax":
        raise ValueError(
            "export: causal-softmax attention has no fixed-size state (its KV cache grows by one key and "
            "value per token), so its step is not a static graph; export a causal-linear model"
        )
    if kind != "causal-linear":
        raise ValueError(f"export: {kind!r} attention has no recurrent step to export; export a causal-linear model")


class RecurrentStep(nn.Module):
    """The model's `step` as a pure function of tensors (the graph that is exported).

    It computes what CausalTransformer.step computes, with the position and the state as tensors
    instead of Python values, and a start token as an ordinary token id (see the module docstring).
    """

    def __init__(self, model: CausalTransformer) -> None:
        super().__init__()
        check_exportable(model)
        self.model = model

    @property
    def n_layers(self) -> int:
        return len(self.model.blocks)

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        shapes = []
        for block in self.model.blocks:
            H, Dk, Dv = block.attn.state_shape
            shapes += [(batch, H, Dk, Dv), (batch, H, Dk)]
        return shapes

    def initial_state(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(shape) for shape in self.state_shapes(batch)]

    def forward(self, token: torch.Tensor, position: torch.Tensor, *state: torch.Tensor):
        m = self.model
        table = torch.cat([m.embed.weight, m.start.weight])  # ids >= vocab_size are start tokens
        x = nn.functional.embedding(token, table)
        if m.cfg.positional == "learned":
            x = x + m.pos(position)
        elif m.cfg.positional == "sinusoidal":
            x = x + m.pos_table.index_select(0, position)
        new_state = []
        for i, block in enumerate(m.blocks):
            attn, S, z = block.attn, state[2 * i], state[2 * i + 1]

            def attend(h, attn=attn, S=S, z=z):
                q, k, v = attn.project(h)
                out, S, z = step_functional(q, k, v, S, z, attn.eps)
                return attn.out(out.reshape(h.shape[0], -1)), (S, z)

            x, (S, z) = block.mix(x, attend)
            new_state += [S, z]
        params = m.head(m.norm(x))
        log_probs = m.head.log_probs(params, dtype=torch.float32)
        return (params, log_probs, position + 1, *new_state)


def names(n_layers: int) -> tuple[list[str], list[str]]:
    """Input and output tensor names of the exported step."""
    state = [f"{t}_{i}" for i in range(n_layers) for t in ("S", "z")]
    return ["token", "position", *state], ["params", "log_probs", "position_out", *(s + "_out" for s in state)]


EXPORTERS = ("torchscript", "dynamo")


def _export_graph(step: RecurrentStep, path: Path, opset: int, exporter: str) -> None:
    inputs, outputs = names(step.n_layers)
    args = (torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=torch.long), *step.initial_state(2))
    if exporter == "dynamo":  # torch.export, then onnxscript's translation
        batch = torch.export.Dim("batch")
        shapes = {"token": {0: batch}, "position": None, "state": tuple({0: batch} for _ in args[2:])}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it notes that the batch axes share one name
            torch.onnx.export(
                step,
                args,
                str(path),
                input_names=inputs,
                output_names=outputs,
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=shapes,
                external_data=False,
                verbose=False,
            )
        return
    batch = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        torch.onnx.export(
            step,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            dynamic_axes={name: batch for name in inputs + outputs if not name.startswith("position")},
            dynamo=False,
        )


def verify(model: CausalTransformer, onnx_path: Path, steps: int, batch: int = 3, seed: int = 0) -> dict:
    """Run the ONNX file with onnxruntime next to the model's own `step` (the path `generate` takes),
    feeding both the tokens PyTorch samples, for `steps` steps (restarting at max_len); returns the
    largest absolute differences of params and probabilities, and of the states relative to their
    largest entry (S sums a term per token, so its entries grow with the position). The same model in
    float64 steps alongside, on the same tokens: "float32_error" is how far PyTorch's own float32
    step is from it (params, probabilities), the yardstick for the graph's differences on a model
    whose outputs are sensitive to rounding."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rnn = RecurrentStep(model)
    inputs, _ = names(rnn.n_layers)
    cfg = model.cfg
    exact = copy.deepcopy(model).double()
    generator = torch.Generator().manual_seed(seed)
    worst = {"params": 0.0, "probs": 0.0, "state_rel": 0.0}
    float32_error = {"params": 0.0, "probs": 0.0}
    done = 0
    with torch.no_grad():
        while done < steps:
            labels = torch.randint(cfg.n_classes, (batch,), generator=generator) if cfg.n_classes else None
            params, state = model.prefill(torch.zeros(batch, 0, dtype=torch.long), labels)
            params64, state64 = exact.prefill(torch.zeros(batch, 0, dtype=torch.long), labels)
            start = cfg.vocab_size + (labels if labels is not None else torch.zeros(batch, dtype=torch.long))
            feeds = dict(zip(inputs, [start, torch.zeros(1, dtype=torch.long), *rnn.initial_state(batch)], strict=True))
            for t in range(min(cfg.max_len, steps - done)):
                got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
                want_probs = model.head.log_probs(params).exp()
                worst["params"] = max(worst["params"], float(np.abs(got[0] - params.numpy()).max()))
                worst["probs"] = max(worst["probs"], float(np.abs(np.exp(got[1]) - want_probs.numpy()).max()))
                pairs = zip(got[3:], [x for s in state.layers for x in (s.S, s.z)], strict=True)
                rel = [float(np.abs(g - w.numpy()).max() / max(1.0, float(w.abs().max()))) for g, w in pairs]
                worst["state_rel"] = max(worst["state_rel"], *rel)
                float32_error["params"] = max(float32_error["params"], float((params - params64).abs().max()))
                probs64 = exact.head.log_probs(params64).exp()
                float32_error["probs"] = max(float32_error["probs"], float((want_probs - probs64).abs().max()))
                token = model.head.sample(params, generator=generator)
                if t + 1 < cfg.max_len:
                    params, state = model.step(token, state)
                    params64, state64 = exact.step_pytorch(token, state64)
                feeds = dict(
                    zip(inputs, [token, torch.from_numpy(got[2]), *map(torch.from_numpy, got[3:])], strict=True)
                )
                done += 1
    return {"steps": done, "batch": batch, "max_abs_diff": worst, "float32_error": float32_error}


def within(verified: dict, tolerance: float) -> list[str]:
    """What of a `verify` result is out of bounds: each of params and probabilities may differ by
    `tolerance`, or by twice PyTorch's own float32 error where the model is that sensitive to rounding
    (the graph is then as exact as PyTorch); the states, relative to their size, by `tolerance`."""
    bad = []
    for key, diff in verified["max_abs_diff"].items():
        bound = max(tolerance, 2 * verified["float32_error"].get(key, 0.0))
        if not diff <= bound:
            bad.append(f"{key} by {diff:.2e} (allowed {bound:.1e})")
    return bad


def export(
    model: CausalTransformer,
    onnx_path: str | Path,
    *,
    data: dict | None = None,
    opset: int = 18,
    exporter: str = "torchscript",
    verify_steps: int = 300,
    tolerance: float = 1e-4,
) -> dict:
    """Write the step graph to onnx_path and its JSON sidecar; returns the sidecar's content.

    The file is verified (see `verify`) in a temporary location first and moved into place only if
    every difference is within `tolerance`; otherwise nothing is written and ValueError says what differed.
    """
    check_exportable(model)
    if exporter not in EXPORTERS:
        raise ValueError(f"export: exporter must be one of {EXPORTERS}, got {exporter!r}")
    model = model.float().eval()
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    step = RecurrentStep(model)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=onnx_path.parent, prefix=f".{onnx_path.name}.")
    os.close(fd)
    try:
        _export_graph(step, Path(tmp), opset, exporter)
        verified = verify(model, Path(tmp), verify_steps) if verify_steps else None
        bad = within(verified, tolerance) if verified else []
        if bad:
            f32 = ", ".join(f"{k} {x:.1e}" for k, x in verified["float32_error"].items())
            raise ValueError(
                f"export: onnxruntime and PyTorch differ in {'; '.join(bad)}, more than rounding explains (PyTorch's "
                f"own float32 step is off float64 by {f32}): nothing was written. Try --exporter "
                f"{'dynamo' if exporter == 'torchscript' else 'torchscript'}; --tolerance raises the bound"
            )
        inputs, outputs = names(step.n_layers)
        shapes = [("batch",), (1,), *[("batch", *s[1:]) for s in step.state_shapes(1)]]
        cfg = model.cfg
        sidecar = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "onnx": onnx_path.name,
            "opset": opset,
            "exporter": exporter,
            "model": cfg.to_dict(),
            "data": data,
            "start_token": {"id": cfg.vocab_size, "per_class": bool(cfg.n_classes)},
            "inputs": [
                {"name": n, "shape": list(s), "dtype": "int64" if i < 2 else "float32"}
                for i, (n, s) in enumerate(zip(inputs, shapes, strict=True))
            ],
            "outputs": outputs,
            "state_pairs": [[i, o] for i, o in zip(inputs[2:], outputs[3:], strict=True)]
            + [["position", "position_out"]],
            "verified": verified,
        }
        os.chmod(tmp, 0o644)  # mkstemp made it private
        os.replace(tmp, onnx_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    sidecar_path = onnx_path.with_suffix(".json")
    tmp_json = sidecar_path.with_name(f".{sidecar_path.name}.tmp")
    tmp_json.write_text(json.dumps(sidecar, indent=2) + "\n")
    os.replace(tmp_json, sidecar_path)
    return sidecar


def is_export(onnx_path: Path) -> bool:
    """Whether onnx_path's sidecar is one that `export` wrote (so both may be replaced)."""
    try:
        return json.loads(onnx_path.with_suffix(".json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_onnx_target(onnx_path: Path) -> None:
    """The ONNX file and its sidecar may be written: outside any run folder, and replacing only an
    earlier export (never another file that happens to have the name)."""
    ours = is_export(onnx_path)
    check_output_path(onnx_path, "export --onnx", ours=ours)
    check_output_path(onnx_path.with_suffix(".json"), "export --onnx (its JSON sidecar)", ours=ours)


HF_EXPORT_MARK = "linear-transformers export --hf"


def check_hf_target(folder: Path) -> None:
    """export --hf writes a new or empty folder, or one it wrote before (its SHA256SUMS says so)."""
    owner = owned_by_training(folder)
    if owner is not None:
        raise FileExistsError(
            f"export --hf: {folder} lies in {owner}, a training run's folder, which only training "
            "writes; choose another folder"
        )
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"export --hf: {folder} is a file; give a folder to write")
    if folder.is_dir() and any(folder.iterdir()):
        sums = folder / SUMS
        if not (sums.is_file() and sums.read_text(errors="replace").startswith(f"# {HF_EXPORT_MARK}")):
            raise FileExistsError(
                f"export --hf: {folder} is a folder with files this command did not write; give a new or empty folder"
            )


def run_export(cfg: ExportConfig) -> Path:
    if cfg.hf:
        check_hf_target(Path(cfg.hf))
    else:
        check_onnx_target(Path(cfg.onnx))
    model, config = load_model(cfg.checkpoint)
    if cfg.hf:
        return export_hf(model, config, cfg)
    sidecar = export(
        model,
        cfg.onnx,
        data=config.get("data"),
        opset=cfg.opset,
        exporter=cfg.exporter,
        verify_steps=cfg.verify_steps,
        tolerance=cfg.tolerance,
    )
    size = Path(cfg.onnx).stat().st_size / 2**20
    print(f"wrote {cfg.onnx} ({size:.1f} MiB) and {Path(cfg.onnx).with_suffix('.json')}")
    if sidecar["verified"]:
        v = sidecar["verified"]
        diffs = ", ".join(f"{k} {x:.1e}" for k, x in v["max_abs_diff"].items())
        f32 = ", ".join(f"{k} {x:.1e}" for k, x in v["float32_error"].items())
        print(
            f"verified with onnxruntime against PyTorch over {v['steps']} steps (batch {v['batch']}): "
            f"largest differences {diffs} (PyTorch's own float32 against float64: {f32})"
        )
    return Path(cfg.onnx)


def export_hf(model: CausalTransformer, config: dict, cfg: ExportConfig) -> Path:
    """Write the model as a transformers folder, load it back with AutoModelForCausalLM and check its
    logits against ours on random tokens before saying it is done."""
    from transformers import AutoModelForCausalLM

    from .hf import save_hf

    folder = save_hf(model, cfg.hf, config.get("data"), config.get("train"))
    write_sums(folder, [p.name for p in folder.iterdir() if p.is_file() and p.name != SUMS], HF_EXPORT_MARK)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, min(16, model.cfg.max_len - 1)))
    with torch.no_grad():
        ours = model.forward(tokens, include_next=True)[:, 1:]
        theirs = loaded(tokens, use_cache=False).logits
        if model.cfg.head != "categorical":
            ours = model.head.log_probs(ours)
    diff = (ours - theirs).abs().max().item()
    if not diff <= cfg.tolerance:
        raise RuntimeError(f"export --hf: the loaded folder's logits differ from the model's by {diff:.2e}")
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    print(
        f"wrote {folder} ({files}); AutoModelForCausalLM.from_pretrained gives the same logits (largest "
        f"difference {diff:.1e})"
    )
    return folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ExportConfig)


def main(args: argparse.Namespace) -> int:
    run_export(from_args(ExportConfig, args))
    return 0
