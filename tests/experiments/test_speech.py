"""The speech-recognition experiment: CTC decoding and scoring, padding-invariant models, and the
whole pipeline (--quick) on a corpus synthesised here."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import pytest
import torch

from linear_transformers.data import speech
from linear_transformers.experiments import speech as exp
from linear_transformers.experiments.__main__ import main


def test_greedy_ctc_and_edit_distance():
    blank, a, b = 0, 1, 2  # phone indices 0 and 1 after the blank
    steps = [a, a, blank, a, b, b, blank, blank, a]
    logits = torch.nn.functional.one_hot(torch.tensor([steps, [b] * 9]), exp.N_OUT).float()
    assert exp.greedy_ctc(logits, torch.tensor([9, 3])) == [[0, 0, 1, 0], [1]]
    assert exp.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert exp.edit_distance([1, 2, 3], [1, 3]) == 1  # a deletion
    assert exp.edit_distance([], [4, 5]) == 2
    assert exp.edit_distance([1, 2, 3, 4], [2, 1, 3, 5]) == 3


@pytest.mark.parametrize("method", ["bilstm", "softmax", "linear", "lsh-4"])
def test_models_ignore_padding(method):
    """Padded steps never reach the real ones: whatever the padding holds, an utterance's outputs are
    the same; and, except for LSH (its chunks follow the padded length), the same as alone."""
    s = replace(
        exp.SpeechSettings(),
        lstm_hidden=16,
        lstm_layers=2,
        n_layers=2,
        n_heads=2,
        d_model=16,
        d_ff=32,
        dropout=0.0,
        lsh_buckets=2,
    )
    model = exp.make_model(method, s).eval()
    short, long = torch.randn(1, 13, 120), torch.randn(1, 21, 120)
    lengths = torch.tensor([13, 21])
    outs = []
    with torch.no_grad():
        for fill in (torch.zeros(1, 8, 120), 100 * torch.randn(1, 8, 120)):
            torch.manual_seed(1)  # LSH draws its rotations per forward: the same ones every call
            outs.append(model(torch.cat([torch.cat([short, fill], 1), long]), lengths))
        torch.manual_seed(1)
        alone = model(short, torch.tensor([13]))
    assert outs[0].shape == (2, 21, exp.N_OUT)
    torch.testing.assert_close(outs[0][:, :13], outs[1][:, :13], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
    if method != "lsh-4":
        torch.testing.assert_close(outs[0][0, :13], alone[0], atol=1e-5, rtol=1e-5)


def test_stack_frames():
    f = torch.arange(14.0).reshape(7, 2)
    assert exp.stack_frames(f, 3).tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 0, 0, 0, 0]]


@pytest.mark.skipif(bool(speech.synthesizers_missing()), reason="espeak-ng / flite not installed")
def test_splice_frames_gives_each_step_its_neighbours():
    f = torch.arange(12, dtype=torch.float32).view(4, 3)
    out = exp.splice_frames(f, 1)
    assert out.shape == (4, 9)
    torch.testing.assert_close(out[1], torch.cat([f[0], f[1], f[2]]))
    torch.testing.assert_close(out[0, :3], torch.zeros(3))  # (zeros past the ends)
    torch.testing.assert_close(out[3, 6:], torch.zeros(3))
    assert exp.splice_frames(f, 0) is f
    model = exp.make_model("linear", replace(exp.SpeechSettings(), stack=1, splice=2, n_layers=1, d_model=16, d_ff=32))
    assert model.inp.in_features == 40 * 5


def test_quick_speech_experiment(tmp_path, capsys):
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (6,), generator=g)) + "." for _ in range(40)]
    (tmp_path / "text.txt").write_text("\n".join(lines))
    args = [
        "speech",
        "--quick",
        "--text",
        str(tmp_path / "text.txt"),
        "--corpus",
        str(tmp_path / "corpus"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "corpus: train 12 utterances" in out and "test 4 utterances" in out
    assert "estimated" in out and "minutes here for bilstm, softmax, linear, lsh-4" in out
    rows = list(csv.DictReader((tmp_path / "out" / "speech.csv").read_text().splitlines()))
    assert [r["method"] for r in rows] == ["bilstm", "softmax", "linear", "lsh-4"]
    assert all(float(r["test_per"]) > 0 and float(r["seconds_per_epoch"]) > 0 for r in rows)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (
        "speech --quick" in record["command"]
        and record["host"]
        and set(record["models"]) == {m["method"] for m in rows}
    )
    assert {r["paper_per"] for r in rows} == {"10.94", "5.12", "8.08", "9.33"}
    assert (tmp_path / "out" / "speech.png").read_bytes()[:4] == b"\x89PNG"
    assert "paper PER % (WSJ)" in (tmp_path / "out" / "table.md").read_text()
    for r in rows:  # the held-out PER after every epoch (--per-every 1), the last one the table's
        curve = list(csv.DictReader((tmp_path / "out" / r["method"] / "per_epoch.csv").read_text().splitlines()))
        assert len(curve) == 2 and float(curve[0]["epoch"]) < float(curve[1]["epoch"]), r["method"]
        assert float(curve[-1]["test_per"]) == pytest.approx(float(r["test_per"]))
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier with these settings") == 4
    assert main([*args, "--corpus-only"]) == 0


@pytest.mark.skipif(bool(speech.synthesizers_missing()), reason="espeak-ng / flite not installed")
def test_utterances_of_several_sentences_and_the_wsj_length_preset(tmp_path, capsys, monkeypatch):
    """--sentences-per-utterance k speaks k sentences as one utterance (one voice): about k times as
    long; --wsj-length sets 3 sentences, no stacking and equal epochs, in folders of its own."""
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (5,), generator=g)) + "." for _ in range(60)]
    (tmp_path / "text.txt").write_text("\n".join(lines))
    frames = {}
    for k in (1, 3):
        settings = speech.CorpusSettings(
            6, 2, min_words=4, max_words=14, text=str(tmp_path / "text.txt"), sentences_per_utterance=k
        )
        info = speech.build_corpus(tmp_path / f"c{k}", settings, log=lambda *a: None)
        assert info["splits"]["train"]["utterances"] == 6
        train, _ = speech.load_corpus(tmp_path / f"c{k}")
        frames[k] = sum(len(f) for f in train.features)
    assert 2.2 < frames[3] / frames[1] < 3.8
    monkeypatch.chdir(tmp_path)
    args = ["speech", "--wsj-length", "--quick", "--text", str(tmp_path / "text.txt"), "--methods", "linear"]
    assert main([*args, "--train-utterances", "6", "--test-utterances", "2"]) == 0
    out = capsys.readouterr().out
    assert "minutes here for linear" in out and "1 frame(s) per model step" in out
    assert (tmp_path / "results" / "speech-corpus-3sent" / "corpus.json").exists()
    assert (tmp_path / "results" / "speech-wsj-length-quick" / "table.md").exists()
    s = exp.settings_from(_parse(["--wsj-length"]))
    assert (s.sentences_per_utterance, s.stack, s.minutes) == (3, 1, 0.0)
    assert exp.settings_from(_parse(["--wsj-length", "--stack", "2"])).stack == 2  # given options win


def _parse(argv):
    import argparse

    from linear_transformers.commands import given_options

    p = argparse.ArgumentParser()
    exp.add_arguments(p)
    args = p.parse_args(argv)
    args.given = given_options(p, argv)
    return args


def test_paired_bootstrap():
    phones = [10, 20, 30, 40]
    same = exp.paired_bootstrap({"linear": [1, 2, 3, 4], "softmax": [1, 2, 3, 4]}, phones, "linear", n=500)
    assert same[0]["per_difference"] == same[0]["ci_low"] == same[0]["ci_high"] == 0
    assert same[0]["share_at_or_below_zero"] == 1.0
    worse = exp.paired_bootstrap({"linear": [1, 2, 3, 4], "lsh-4": [2, 3, 4, 6]}, phones, "linear", n=500)[0]
    assert worse["method"] == "lsh-4" and worse["per_difference"] == 100 * 5 / 100
    assert 0 < worse["ci_low"] <= worse["per_difference"] <= worse["ci_high"]
    assert worse["share_at_or_below_zero"] == 0.0


@pytest.mark.skipif(bool(speech.synthesizers_missing()), reason="espeak-ng / flite not installed")
def test_seeds_and_the_paired_bootstrap(tmp_path, capsys):
    """--seeds runs each method once per seed in its own folder; the table gives each run, each
    method's mean, and PER minus linear's with a paired bootstrap interval over test utterances."""
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()
    g = torch.Generator().manual_seed(2)
    lines = [" ".join(words[i] for i in torch.randint(len(words), (6,), generator=g)) + "." for _ in range(40)]
    (tmp_path / "text.txt").write_text("\n".join(lines))
    out = tmp_path / "out"
    args = ["speech", "--quick", "--text", str(tmp_path / "text.txt"), "--corpus", str(tmp_path / "corpus")]
    args += ["--out", str(out), "--methods", "softmax", "linear", "--seeds", "0", "1"]
    assert main(args) == 0
    assert all((out / f"{m}-seed{k}" / "result.json").exists() for m in ("softmax", "linear") for k in (0, 1))
    rows = list(csv.DictReader((out / "speech.csv").read_text().splitlines()))
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("softmax", "0"),
        ("softmax", "1"),
        ("linear", "0"),
        ("linear", "1"),
    ]
    boot = list(csv.DictReader((out / "bootstrap.csv").read_text().splitlines()))
    assert [(b["method"], b["base"]) for b in boot] == [("softmax", "linear")]
    assert all(float(b["ci_low"]) <= float(b["per_difference"]) <= float(b["ci_high"]) for b in boot)
    table = (out / "table.md").read_text()
    assert "linear, mean of 2" in table and "paired bootstrap over the 4 test utterances" in table
    capsys.readouterr()
    assert main(args) == 0  # every run finished: read back, the same table
    assert capsys.readouterr().out.count("finished earlier with these settings") == 4
    assert (out / "table.md").read_text() == table
