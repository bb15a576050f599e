"""The image-generation experiment runs end to end (--quick) on MNIST and on CIFAR-10 binary batches
written here, and a finished method is not trained again."""

from __future__ import annotations

import csv

import numpy as np

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
    assert main(["image", "--quick", "--dataset", "cifar10", "--data-path", str(data), "--methods", "linear",
                 "softmax", "--out", str(out)]) == 0  # fmt: skip
    rows = _rows(out)
    assert [r["method"] for r in rows] == ["linear", "softmax", "softmax-cache"]
    assert {r["paper_bpd"] for r in rows} == {"3.4", "3.47", ""}
    assert (out / "samples_linear.png").exists()
