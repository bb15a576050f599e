"""Checkpoints: writing, finding, verifying and loading them, and keeping every other command out
of the folders that training owns.

A run folder (written by `train` alone) holds

    latest              names the newest complete checkpoint (written last, atomically)
    step-000200/        model.safetensors, config.json, state.pt, SHA256SUMS
    log.csv             step, loss, bits/dim, learning rate, tokens/s, test bits/dim
    .lock               held (flock) while a training writes to the folder

A checkpoint is written into a temporary folder that is renamed into place, then `latest` is
replaced: whatever moment a run is killed at, `latest` names a whole checkpoint. Its config.json
holds the SHA-256 of its weights and SHA256SUMS that of every file beside it; both are checked on
load, so deleting one record does not turn verification off. Pruning keeps the newest `keep`
checkpoints by step number and never the one `latest` names.

The rule every command keeps: no command writes into a checkpoint or run folder it did not create,
or over a file it did not write (`check_output_path`, `check_output_folder`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .integrity import SUMS, file_sha256, read_sums, verify_file, write_sums
from .model import CausalTransformer, ModelConfig

FORMAT = "linear-transformers-checkpoint"
FORMAT_VERSION = 2  # 2: SHA256SUMS beside the files; config.json names the format
_STEP = re.compile(r"step-(\d{6,})")
# what a run that never reached its first checkpoint leaves behind: a fresh run may start over it
_RUN_LEFTOVERS = ("log.csv", ".lock")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- which folders are training's -----------------------------------------------------------------


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The run folder's checkpoint folders (step-NNNNNN) as (step, path), oldest first by step number."""
    found = []
    with contextlib.suppress(OSError):
        for p in run.iterdir():
            m = _STEP.fullmatch(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def is_checkpoint_folder(path: Path) -> bool:
    return (path / "model.safetensors").exists() and (path / "config.json").exists()


def is_run_folder(path: Path) -> bool:
    return (path / "latest").exists() or bool(checkpoints(path))


def is_hf_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "linear_transformer"
    except (OSError, ValueError, AttributeError):
        return False


def owned_by_training(path: Path) -> Path | None:
    """The run or checkpoint folder that `path` is, or lies in (up to two levels up), or None."""
    path = Path(os.path.abspath(path))
    for folder in [path, *list(path.parents)[:3]]:
        if folder.is_dir() and (is_run_folder(folder) or (is_checkpoint_folder(folder) and not is_hf_folder(folder))):
            return folder
    return None


def check_output_path(path: Path, what: str, ours: bool = False) -> None:
    """A file a command is about to write: never inside a run or checkpoint folder, never over a
    file the command did not write (ours: the caller has checked that the existing file is its own)."""
    owner = owned_by_training(path.parent)
    if owner is not None:
        raise FileExistsError(
            f"{what}: {path} lies in {owner}, a training run's folder, which only training writes; choose another path"
        )
    if path.is_dir():
        raise IsADirectoryError(f"{what}: {path} is a folder; give a file name")
    if path.exists() and not ours:
        raise FileExistsError(f"{what}: {path} exists and was not written by this command; choose another path")


def unused_path(path: Path) -> Path:
    """`path`, or the first of path-1, path-2, ... (same suffix) that does not exist yet."""
    n = 0
    candidate = path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


# ---- writing --------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run folder while a training writes to it (flock on `.lock`): a
    second training into the same folder fails at once instead of interleaving checkpoints."""

    def __init__(self, run: Path) -> None:
        self.run, self._fd = run, None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # (Windows: no flock; a second training is not detected)
            return self
        check_run_folder(self.run)  # before the lock file is written into it
        self.run.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = (self.run / ".lock").read_text().strip() or "another process"
            raise FileExistsError(
                f"{self.run} is being written by another training ({holder}); wait for it or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def check_run_folder(run: Path) -> None:
    """`run` is new, or a folder holding nothing but what runs write: training writes nowhere else."""
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(f"train: --out {run} is a file; give a folder for the run")
    if run.is_dir() and not (run / "latest").exists():  # (a run's own folder may hold what its user put there)
        other = sorted(
            p.name
            for p in run.iterdir()
            if not (p.name in (*_RUN_LEFTOVERS, "latest") or _STEP.fullmatch(p.name) or p.name.startswith(".step-"))
        )
        if other:
            raise FileExistsError(
                f"train: --out {run} is not a run folder (it holds {', '.join(other[:3])}); a run needs a new or "
                "empty folder"
            )


def check_fresh_run(run: Path) -> None:
    """A fresh run starts in a new or empty folder (or over what a run that never checkpointed left)."""
    if (run / "latest").exists():
        raise FileExistsError(
            f"{run} already holds a run (latest: {(run / 'latest').read_text().strip()}); pass --resume to "
            "continue it, or choose another --out"
        )
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(f"train: --out {run} is a file; give a folder for the run")
    if checkpoints(run):
        raise FileExistsError(
            f"{run} holds checkpoints ({checkpoints(run)[-1][1].name}, ...) but no 'latest': another run's, "
            "damaged; choose another --out (nothing there was changed)"
        )
    check_run_folder(run)


def save_checkpoint(
    run: Path, step: int, model, model_cfg, train_cfg: dict, meta, extra_state: dict, keep: int
) -> Path:
    """Write checkpoint `step` into the run folder atomically, point `latest` at it, keep the newest
    `keep` (by step number; never the one `latest` names). The caller holds the run's RunLock."""
    run.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    for stale in run.glob(".step-*.tmp*"):  # left by a killed write (the lock says no one else writes here)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run / f".{name}.tmp{os.getpid()}"
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_cfg.to_dict(),
        "train": train_cfg,
        "data": meta,
        "step": step,
        "weights_sha256": file_sha256(tmp / "model.safetensors"),
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(extra_state, tmp / "state.pt")
    write_sums(tmp, ["model.safetensors", "config.json", "state.pt"], f"linear-transformers checkpoint {name}")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = run / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(run / "latest", name + "\n")
    for _, old in [c for c in checkpoints(run) if c[1] != final][: max(0, len(checkpoints(run)) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---- reading --------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its `latest` checkpoint, which must name a step-N
    folder inside it)."""
    path = Path(path)
    if (path / "latest").exists():
        name = (path / "latest").read_text(errors="replace").strip()
        if not _STEP.fullmatch(name):
            raise ValueError(f"{path / 'latest'} must name a checkpoint folder of the run (step-NNNNNN), got {name!r}")
        if not (path / name).is_dir():
            raise FileNotFoundError(f"{path / 'latest'} names {name}, which is missing: the run folder is damaged")
        path = path / name
    if not is_checkpoint_folder(path):
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a run folder with a 'latest' file, or a checkpoint folder "
            "holding model.safetensors and config.json"
        )
    return path


def read_config(ckpt: Path) -> dict:
    """The checkpoint's config.json, checked against SHA256SUMS where the folder has one."""
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{ckpt / 'config.json'} is not valid JSON ({e}): the checkpoint is damaged") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{ckpt / 'config.json'} has no model settings: the checkpoint is damaged")
    verify_file(ckpt, "config.json", None)
    return config


def model_config(config: dict, where: Path) -> ModelConfig:
    """ModelConfig from a checkpoint's "model" settings, with a one-line error for what is wrong."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(config["model"]) - known)
    if unknown:
        raise ValueError(
            f"{where / 'config.json'}: unknown model setting(s) {', '.join(unknown)} (written by a newer version, "
            "or edited by hand)"
        )
    try:
        return ModelConfig(**config["model"])
    except TypeError as e:
        raise ValueError(f"{where / 'config.json'}: model settings of the wrong type ({e})") from None


def load_weights(ckpt: Path, config: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's weights, after checking them against the SHA-256 in its config.json and in
    SHA256SUMS; a checkpoint of this format with neither record is refused (older ones carry none)."""
    path = ckpt / "model.safetensors"
    expected = config.get("weights_sha256")
    sums = read_sums(ckpt) or {}
    if not expected and "model.safetensors" not in sums and config.get("format") == FORMAT:
        raise ValueError(f"{ckpt}: no SHA-256 of the weights is recorded (config.json and {SUMS}): cannot verify them")
    verify_file(ckpt, "model.safetensors", expected)
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error type for a malformed file
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def load_state(ckpt: Path) -> dict:
    """The checkpoint's training state (optimizer, schedule, sampler, RNG), verified."""
    path = ckpt / "state.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the checkpoint cannot be resumed")
    verify_file(ckpt, "state.pt", None)
    try:
        state = torch.load(path, weights_only=True)  # tensors and plain containers only
    except Exception as e:  # pickle, zip and torch errors alike: the file is not a state
        raise ValueError(
            f"{path} is not a readable training state ({type(e).__name__}): the checkpoint is damaged"
        ) from None
    missing = [
        k for k in ("optimizer", "scheduler", "sampler", "rng", "step") if not isinstance(state, dict) or k not in state
    ]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: the checkpoint is damaged")
    return state


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """model.load_state_dict with a one-line error when the weights do not fit the config."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
        raise ValueError(f"{where}: the weights do not fit the model its config.json describes ({detail})") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[CausalTransformer, dict]:
    """Load a trained model (in eval mode) and its config dict from a checkpoint or run folder, or
    from a Hugging Face transformers folder of ours (`export --hf`, `save_pretrained`). A run
    folder always means its `latest` checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
    if not (path / "latest").exists() and is_hf_folder(path):
        from .hf import load_hf  # needs the [hf] extra

        return load_hf(path, device)
    ckpt = resolve_checkpoint(path)
    config = read_config(ckpt)
    model = CausalTransformer(model_config(config, ckpt))
    load_into(model, load_weights(ckpt, config), ckpt)
    return model.to(device).eval(), config
