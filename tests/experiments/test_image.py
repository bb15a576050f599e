"""The image-generation experiment runs end to end (--quick) on MNIST and on CIFAR-10 binary batches
written here, and a finished method is not trained again."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from linear_transformers.data import images as img
from linear_transformers.experiments.__main__ import main


def _rows(out):
    return list(csv.DictReader((out / "image.csv").read_text().splitlines()))


def test_quick_mnist_experiment(tmp_path, capsys):
    args = ["image", "--quick", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = _rows(tmp_path)
    assert [r["method"] for r in rows] == ["softmax", "softmax-cache", "lsh-1", "lsh-4", "linear"]
    assert all(float(r["test_bpd"]) > 0 and float(r["images_per_s"]) > 0 and r["steps"] == "3" for r in rows)
    assert {r["paper_bpd"] for r in rows} == {"0.621", "0.745", "0.676", "0.644", ""}
    table = (tmp_path / "table.md").read_text()
    assert "| linear | 3 |" in table and "paper bits/dim" in table
    for m in ("softmax", "lsh-1", "lsh-4", "linear"):
        assert (tmp_path / f"samples_{m}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "samples.png").stat().st_size > 5_000  # the four grids side by side
    import json

    record = json.loads((tmp_path / "run.json").read_text())
    assert "image --quick" in record["command"] and record["git_commit"] and record["date"]
    assert record["models"]["linear"]["norm"] == "pre" and record["models"]["linear"]["feature_map"] == "elu"
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier with these settings") == 4


def test_quick_cifar10_experiment_on_generated_binary_batches(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "cifar"
    data.mkdir()
    for name in img.CIFAR_FILES["train"] + img.CIFAR_FILES["test"]:
        records = rng.integers(0, 256, (4, img.CIFAR_RECORD), dtype=np.uint8)
        records[:, 0] %= 10
        (data / name).write_bytes(records.tobytes())
    out = tmp_path / "out"
    assert (
        main(
            [
                "image",
                "--quick",
                "--dataset",
                "cifar10",
                "--data-path",
                str(data),
                "--methods",
                "linear",
                "softmax",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = _rows(out)
    assert [r["method"] for r in rows] == ["linear", "softmax", "softmax-cache"]
    assert {r["paper_bpd"] for r in rows} == {"3.4", "3.47", ""}
    assert (out / "samples_linear.png").exists()


def test_equal_steps_all_test_images_curves_and_parallel_methods(tmp_path, monkeypatch, capsys):
    """--epochs sets the same steps for every method, --eval-images 0 scores every test image, the
    held-out curve is logged and plotted, --jobs 2 trains two methods at once, and --quick results
    go to a folder of their own."""
    monkeypatch.chdir(tmp_path)
    args = [
        "image",
        "--quick",
        "--methods",
        "softmax",
        "linear",
        "--eval-images",
        "0",
        "--eval-every",
        "2",
        "--jobs",
        "2",
        "--epochs",
        "0.0004",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "hours here for softmax, linear" in out
    folder = tmp_path / "results" / "image-mnist-quick"
    rows = _rows(folder)
    steps = -(-60000 * 0.0004 // 4)  # ceil(epochs * train images / batch)
    assert {r["steps"] for r in rows} == {str(int(steps))}
    assert {r["eval_images"] for r in rows} == {"10000"}
    assert (folder / "curves.png").stat().st_size > 5_000
    assert "linear - softmax:" in (folder / "table.md").read_text() and "(the paper: +0.023)" in out
    with pytest.raises(SystemExit):  # refused while parsing, in one line
        main(["image", "--quick", "--jobs", "0"])
    assert "--jobs: must be >= 1, got 0" in capsys.readouterr().err


def test_paper_preset_is_the_papers_budget():
    import argparse

    from linear_transformers.commands import given_options
    from linear_transformers.experiments import image as exp

    def settings(argv):
        p = argparse.ArgumentParser()
        exp.add_arguments(p)
        args = p.parse_args(argv)
        args.given = given_options(p, argv)
        return exp.settings_from(args)

    mnist = settings(["--paper"])
    assert (mnist.n_layers, mnist.epochs, mnist.eval_images, mnist.minutes, mnist.lr) == (8, 250, 0, 0.0, 1e-4)
    cifar = settings(["--paper", "--dataset", "cifar10", "--data-path", "x"])
    assert cifar.n_layers == 16


def test_norm_and_feature_map_reach_the_model_and_old_results_still_count(tmp_path):
    """--norm post and --feature-map hedgehog build the model they name, and the result records
    them; a result written before these settings existed counts as one with their old values."""
    import json

    from linear_transformers.checkpoint import load_model
    from linear_transformers.experiments import load_finished

    out = tmp_path / "out"
    assert (
        main(
            [
                "image",
                "--quick",
                "--methods",
                "linear",
                "--norm",
                "post",
                "--feature-map",
                "hedgehog",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = json.loads((out / "linear" / "result.json").read_text())
    assert saved["settings"]["norm"] == "post" and saved["settings"]["feature_map"] == "hedgehog"
    model, _ = load_model(out / "linear" / "run")
    assert model.cfg.norm == "post" and model.cfg.feature_map == "hedgehog"
    old = {k: v for k, v in saved["settings"].items() if k not in ("norm", "feature_map")}
    (tmp_path / "old.json").write_text(json.dumps({"settings": old, "rows": [1]}))
    assert load_finished(tmp_path / "old.json", {**old, "norm": "pre", "feature_map": "elu"}) == [1]
    assert load_finished(tmp_path / "old.json", saved["settings"]) is None


def test_image_gap_reads_the_runs_and_plots_the_gap(tmp_path, capsys):
    """experiment image-gap: per arm and seed, linear - softmax from two quick runs' result.json and
    logs; an arm that changes linear attention only takes its softmax from another folder."""
    import json

    base = ["image", "--quick", "--eval-every", "1", "--steps", "3"]
    assert main([*base, "--methods", "softmax", "linear", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--methods", "linear", "--feature-map", "hedgehog", "--out", str(tmp_path / "h")]) == 0
    runs = [f"baseline={tmp_path / 'a'}", f"hedgehog={tmp_path / 'h'},{tmp_path / 'a'}"]
    assert main(["image-gap", "--runs", *runs, "--out", str(tmp_path / "gap")]) == 0
    rows = list(csv.DictReader((tmp_path / "gap" / "gap.csv").read_text().splitlines()))
    assert {r["arm"] for r in rows} == {"baseline", "hedgehog"} and all(r["seed"] == "0" for r in rows)
    for r in rows:
        assert abs(float(r["gap"]) - (float(r["linear"]) - float(r["softmax"]))) < 1e-12
    table = (tmp_path / "gap" / "table.md").read_text()
    lin = json.loads((tmp_path / "h" / "linear" / "result.json").read_text())["rows"][0]["test_bpd"]
    soft = json.loads((tmp_path / "a" / "softmax" / "result.json").read_text())["rows"][0]["test_bpd"]
    assert "| hedgehog | 0 | 3 | pre | hedgehog |" in table and f"{lin - soft:+.3f} |" in table
    assert (tmp_path / "gap" / "gap.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="is missing: is .* a finished run of experiment image with linear"):
        main(["image-gap", "--runs", f"x={tmp_path / 'nowhere'}", "--out", str(tmp_path / "gap3")])
    with pytest.raises(ValueError, match="NAME=FOLDER"):
        main(["image-gap", "--runs", str(tmp_path / "a"), "--out", str(tmp_path / "gap2")])
