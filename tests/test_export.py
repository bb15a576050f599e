"""ONNX export of the recurrent step: the graph against the model's own step, run by onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from linear_transformers import export as export_module
from linear_transformers.cli import main as cli_main
from linear_transformers.export import RecurrentStep, check_exportable, export, names
from linear_transformers.model import CausalTransformer, ModelConfig
from linear_transformers.ops import step as step_module

from helpers import cli_error

pytest.importorskip("onnxruntime")

TINY = dict(vocab_size=11, max_len=23, d_model=24, n_layers=2, n_heads=3, d_ff=40)


def tiny_model(**overrides) -> CausalTransformer:
    model = CausalTransformer(ModelConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # away from the initialisation, so every weight matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_classes=4),
        dict(head="mol", vocab_size=256, mol_components=3),
        dict(positional="learned", norm="post", feature_map="relu"),
        dict(n_classes=3, feature_map="favor", positional="none"),
        dict(feature_map="hedgehog"),
    ],
    ids=["conditional", "mixture-of-logistics", "learned-post-relu", "favor", "hedgehog"],
)
def test_recurrent_step_matches_the_model_step(overrides):
    """The exported module, in PyTorch, against prefill + step (fused C step included), every token."""
    model = tiny_model(**overrides)
    rnn, cfg = RecurrentStep(model), model.cfg
    B = 3
    labels = torch.tensor([0, 2, 1]) if cfg.n_classes else None
    with torch.no_grad():
        params, state = model.prefill(torch.zeros(B, 0, dtype=torch.long), labels)
        start = cfg.vocab_size + (labels if labels is not None else torch.zeros(B, dtype=torch.long))
        got = rnn(start, torch.zeros(1, dtype=torch.long), *rnn.initial_state(B))
        for t in range(cfg.max_len):
            torch.testing.assert_close(got[0], params, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[1], model.head.log_probs(params).float(), atol=1e-4, rtol=1e-4)
            assert int(got[2]) == state.position == t + 1
            for g, s in zip(got[3::2], state.layers, strict=True):
                torch.testing.assert_close(g, s.S, atol=1e-4, rtol=1e-5)
            token = torch.randint(cfg.vocab_size, (B,))
            if t + 1 < cfg.max_len:
                params, state = model.step(token, state)
                got = rnn(token, got[2], *got[3:])


@pytest.mark.parametrize(
    ("overrides", "exporter"),
    [
        (dict(n_classes=4), "torchscript"),
        (dict(head="mol", vocab_size=256, mol_components=3), "torchscript"),
        (dict(n_classes=4, feature_map="favor"), "dynamo"),
    ],
    ids=["conditional", "mixture-of-logistics", "dynamo-exporter"],
)
def test_export_verifies_with_onnxruntime_and_writes_the_sidecar(tmp_path, overrides, exporter):
    import onnx

    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    model = tiny_model(**overrides)
    data = {"image_shape": [23], "alphabet": None}
    sidecar = export(model, tmp_path / "step.onnx", data=data, exporter=exporter, verify_steps=300)
    assert (tmp_path / "step.onnx").is_file() and not list(tmp_path.glob(".*"))  # no temporary files left
    written = json.loads((tmp_path / "step.json").read_text())
    assert written == sidecar and written["data"] == data and written["model"] == model.cfg.to_dict()
    v = written["verified"]
    assert v["steps"] == 300 and max(v["max_abs_diff"].values()) < 1e-4
    graph = onnx.load(str(tmp_path / "step.onnx")).graph
    inputs, outputs = names(model.cfg.n_layers)
    assert [i.name for i in graph.input] == inputs == [i["name"] for i in written["inputs"]]
    assert [o.name for o in graph.output] == outputs == written["outputs"]
    S0 = next(i for i in written["inputs"] if i["name"] == "S_0")
    H, d = model.cfg.n_heads, model.cfg.d_model // model.cfg.n_heads
    assert S0["shape"] == ["batch", H, d, d]


def test_export_runs_at_any_batch_and_feeds_its_own_state_back(tmp_path):
    """The batch axis is dynamic and the outputs are the next call's inputs."""
    import onnxruntime as ort

    model = tiny_model(n_classes=2)
    export(model, tmp_path / "m.onnx", verify_steps=0)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    rnn = RecurrentStep(model)
    inputs, _ = names(model.cfg.n_layers)
    B = 5
    tokens = torch.randint(model.cfg.vocab_size, (B, 10))
    feeds = [torch.full((B,), model.cfg.vocab_size + 1), torch.zeros(1, dtype=torch.long), *rnn.initial_state(B)]
    feeds = {k: v.numpy() for k, v in zip(inputs, feeds, strict=True)}
    for t in range(10):
        out = session.run(None, feeds)
        feeds = dict(zip(inputs, [tokens[:, t].numpy(), out[2], *out[3:]], strict=True))
    assert int(out[2][0]) == 10  # start token and tokens 0..8 fed: the last output is the distribution of token 9
    full = model(tokens, torch.ones(B, dtype=torch.long))
    np.testing.assert_allclose(out[0], full[:, 9].detach().numpy(), atol=1e-4)


def test_a_graph_that_disagrees_is_not_written(tmp_path, monkeypatch):
    """Verification fails, and nothing is left behind, when the exported graph computes something else."""
    model = tiny_model()

    def wrong(q, k, v, S, z, eps):  # forgets the normaliser
        S = S + k.unsqueeze(-1) * v.unsqueeze(-2)
        return torch.matmul(q.unsqueeze(-2), S).squeeze(-2), S, z + k

    monkeypatch.setattr(export_module, "step_functional", wrong)
    with pytest.raises(ValueError, match="more than rounding explains.*Try --exporter dynamo"):
        export(model, tmp_path / "bad.onnx", verify_steps=30)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(export_module, "step_functional", step_module.step_functional)


def test_the_bound_is_the_tolerance_or_pytorchs_own_rounding(tmp_path):
    """A graph may differ from PyTorch by the tolerance, or by twice what PyTorch's own float32 step
    is off float64 where the model is that sensitive; verify measures that error on the way."""
    v = {"max_abs_diff": {"params": 3e-3, "probs": 5e-5, "state_rel": 1e-6}, "float32_error": {"params": 2e-3}}
    assert export_module.within(v, 1e-4) == []  # 3e-3 <= 2 x 2e-3
    v["float32_error"]["params"] = 1e-3
    assert export_module.within(v, 1e-4) == ["params by 3.00e-03 (allowed 2.0e-03)"]
    v["max_abs_diff"]["state_rel"] = 1e-3  # the states: the tolerance alone
    assert len(export_module.within(v, 1e-4)) == 2
    written = export(tiny_model(), tmp_path / "m.onnx", verify_steps=20)["verified"]
    assert set(written["float32_error"]) == {"params", "probs"} and 0 < written["float32_error"]["params"] < 1e-4


@pytest.mark.parametrize(
    ("attention", "message"), [("causal-softmax", "no fixed-size state"), ("causal-lsh", "no recurrent step")]
)
def test_kinds_without_a_fixed_state_are_refused(tmp_path, attention, message):
    model = tiny_model(attention=attention)
    with pytest.raises(ValueError, match=message):
        check_exportable(model)
    with pytest.raises(ValueError, match=message):
        export(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_unknown_exporter_is_refused(tmp_path):
    with pytest.raises(ValueError, match="exporter must be one of"):
        export(tiny_model(), tmp_path / "m.onnx", exporter="tflite")


def test_export_command(tmp_path, capsys):
    """The CLI on the checkpoint shipped with the web demo."""
    from linear_transformers.web import WEB_DIR

    out = tmp_path / "demo.onnx"
    assert (
        cli_main(["export", "--checkpoint", str(WEB_DIR / "checkpoint"), "--onnx", str(out), "--verify-steps", "250"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "verified with onnxruntime against PyTorch over 250 steps" in printed
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["data"]["image_shape"] == [14, 14] and sidecar["model"]["n_classes"] == 10
    cli_error(capsys, ["export", "--checkpoint", str(tmp_path / "nowhere"), "--onnx", str(out)], "no checkpoint at")
