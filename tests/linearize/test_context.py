"""linearize-context: held-out perplexity filed by the context each token has. Its buckets cover
every predicted token once, its whole-window number is the perplexity finetune reports on the same
windows (so the teacher + LoRA it loads is the run's own), and a window-only model's losses stop
changing once the context is past its reach (layers x window) while the hybrid's do not."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import linear_transformers.linearize
from linear_transformers import commands
from linear_transformers.linearize import context

pytest.importorskip("transformers")

from helpers import linear_llama, tiny_llama


def test_buckets_cover_every_context_once():
    assert context.buckets(2048, 64) == [(1, 64), (64, 128), (128, 256), (256, 512), (512, 1024), (1024, 2048)]
    assert context.buckets(100, 64) == [(1, 64), (64, 100)]
    assert context.buckets(129, 64) == [(1, 64), (64, 128), (128, 129)]


def test_a_window_model_stops_gaining_past_its_window_and_the_hybrid_does_not():
    torch.manual_seed(0)
    w = torch.randint(0, 97, (2, 40))
    window = linear_llama(mode="window", window=5, sinks=0)
    hybrid = linear_llama(mode="hybrid", window=5, sinks=0)
    # the same token with more past than the window: the window model cannot tell, the hybrid can
    far = torch.cat([torch.randint(0, 97, (2, 20)), w[:, 20:]], dim=1)
    lw, lw_far = context.losses_by_context(window, w), context.losses_by_context(window, far)
    lh, lh_far = context.losses_by_context(hybrid, w), context.losses_by_context(hybrid, far)
    # through 2 layers a token reaches 2 (W - 1) = 8 tokens back: from position 28 on, the window
    # model sees only tokens the two sequences share (RoPE's scores are relative)
    torch.testing.assert_close(lw[:, 28:], lw_far[:, 28:], rtol=1e-5, atol=1e-5)
    assert (lw[:, 20:28] - lw_far[:, 20:28]).abs().max() > 1e-4  # (and before that it does not)
    assert (lh[:, 28:] - lh_far[:, 28:]).abs().max() > 1e-4


def test_command_files_every_token_once_and_agrees_with_finetune(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from linear_transformers.linearize import save_linearized, transfer

    save_linearized(linear_llama(d=48, heads=6, kv_heads=2), tmp_path / "s" / "model")
    g = torch.Generator().manual_seed(0)
    data = {k: torch.randint(0, 97, (6, 24), generator=g) for k in ("train", "held_out", "second_domain")}
    torch.save(data, tmp_path / "s" / "data.pt")
    monkeypatch.setattr(transfer, "load_teacher", lambda: (None, tiny_llama()))  # (a fresh one per load)
    finetune = ["finetune", "--teacher", "--student", str(tmp_path / "s" / "model"), "--out", str(tmp_path / "t")]
    assert commands.dispatch("linear-transformers", [*finetune, "--steps", "2", "--eval-windows", "2"]) == 0
    result = json.loads((tmp_path / "t" / "result.json").read_text())

    argv = ["linearize-context", "--data", str(tmp_path / "s" / "data.pt"), "--length", "24", "--windows", "2"]
    argv += ["--first-bucket", "4", "--out", str(tmp_path / "ctx"), "--model", f"lora={tmp_path / 't'}"]
    argv += [f"student={tmp_path / 's' / 'model'}", "teacher=teacher", "--relative-to", "teacher", "--linear-share"]
    assert commands.dispatch("linear-transformers", argv) == 0
    with open(tmp_path / "ctx" / "context.csv") as f:
        rows = list(csv.DictReader(f))
    for model in ("lora", "student", "teacher"):
        for domain in ("held_out", "second_domain"):
            mine = [r for r in rows if r["model"] == model and r["domain"] == domain]
            whole = [r for r in mine if r["context"] == "all"]
            assert [r["context"] for r in mine] == ["1-3", "4-7", "8-15", "16-23", "all"]
            assert sum(int(r["tokens"]) for r in mine[:-1]) == int(whole[0]["tokens"]) == 2 * 23
            # the buckets' losses average to the whole window's
            mean = sum(int(r["tokens"]) * math.log(float(r["ppl"])) for r in mine[:-1]) / (2 * 23)
            assert math.exp(mean) == pytest.approx(float(whole[0]["ppl"]), rel=1e-6)
    shares = {r["model"]: r["linear_share"] for r in rows if r["context"] == "16-23"}
    assert shares["teacher"] == "" and 0 < float(shares["student"]) < 1  # (a hybrid student: window 5)
    lora = {r["domain"]: float(r["ppl"]) for r in rows if r["model"] == "lora" and r["context"] == "all"}
    assert lora["held_out"] == pytest.approx(result["teacher_lora_ppl"], rel=1e-5)
    assert lora["second_domain"] == pytest.approx(result["second_domain"]["teacher_lora_ppl"], rel=1e-5)
    teacher_ppl = transfer.perplexity(tiny_llama(), data["held_out"][:2])
    whole = next(float(r["ppl"]) for r in rows if r["model"] == "teacher" and r["context"] == "all")
    assert whole == pytest.approx(teacher_ppl, rel=1e-6)
    table = (tmp_path / "ctx" / "table.md").read_text()
    assert "as a multiple of teacher's" in table and (tmp_path / "ctx" / "context.png").stat().st_size > 0
    assert json.loads((tmp_path / "ctx" / "run.json").read_text())["command"].startswith("linear-transformers")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "teacher"], "--model takes name=path"),
        (["--model", "a=x", "a=y"], "model names must differ"),
        (["--model", "a=x", "--relative-to", "b"], "--relative-to 'b' is not one of"),
        (["--length", "64", "--first-bucket", "64"], "must be below --length"),
    ],
)
def test_bad_settings_are_one_line_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        commands.dispatch("linear-transformers", ["linearize-context", *argv])


def test_too_few_windows_and_unknown_folders_say_so(tmp_path):
    torch.save({"held_out": torch.zeros(2, 24, dtype=torch.long)}, tmp_path / "data.pt")
    argv = ["linearize-context", "--data", str(tmp_path / "data.pt"), "--length", "24", "--first-bucket", "4"]
    with pytest.raises(ValueError, match=r"holds 2 windows of 24 tokens, 16 asked for"):
        commands.dispatch("linear-transformers", argv)
    with pytest.raises(FileNotFoundError, match="neither 'teacher'"):
        context.load_model(str(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text("step-1\n")  # (a training run's folder)
    argv = ["linearize-context", "--data", str(tmp_path / "data.pt"), "--windows", "1", "--length", "24"]
    with pytest.raises(FileExistsError, match="a training run's folder"):
        commands.dispatch("linear-transformers", [*argv, "--first-bucket", "4", "--out", str(run / "ctx")])


def test_the_linear_share_splits_the_hybrid_output_between_its_two_parts():
    """y = (1 - s) y_window + s y_linear per query: s, the linear part's share of the normaliser,
    weighs the window-only output (softmax over window and sinks) against the linear part's own."""
    model = linear_llama(mode="hybrid", window=4, sinks=2, heads=1, kv_heads=1)
    attn = model.model.layers[0].self_attn
    attn.cfg.eps = 0.0
    torch.manual_seed(1)
    T, D = 21, attn.head_dim
    q, k, v = (torch.randn(1, T, 1, D) for _ in range(3))
    with torch.no_grad():
        share = context.normaliser_share(attn, q[0], k[0])
        y = attn.attend(q, k, v)[0, :, 0]
        window = linear_transformers.linearize.hybrid_attention(q, k, v, None, None, 4, 2, 0.0)[0, :, 0]
        fq, fk = attn.feature_map_q(q)[0, :, 0], attn.feature_map_k(k)[0, :, 0]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None]
        weights = (fq @ fk.T) * ((j <= i - 4) & (j >= 2))
        linear = (weights @ v[0, :, 0]) / weights.sum(1, keepdim=True).clamp_min(1e-30)
    assert (share[:6] == 0).all() and (share[6:] > 0).all()  # (no key leaves the window before position 6)
    torch.testing.assert_close(y, (1 - share)[:, None] * window + share[:, None] * linear, rtol=1e-4, atol=1e-5)
