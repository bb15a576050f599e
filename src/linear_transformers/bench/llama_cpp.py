"""llama.cpp (llama-cpp-python, an optional extra) on the teacher's own GGUF, requantised to the widths
bench linearized compares: its decoder, beside ours."""

from __future__ import annotations

import os
import time

import torch

LLAMA_CPP_TYPES = {"f32": "ALL_F32", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on the teacher's GGUF in a given type (requantised from the
    shipped Q4_1 where asked: the values do not matter for speed, the widths do; the requantised
    files are kept in the cache folder, ~/.cache/linear_transformers/gguf, not in --out)."""

    def __init__(self, tag: str, n_ctx: int) -> None:
        import ctypes

        import llama_cpp

        from ..linearize.transfer import teacher_path

        folder, name = teacher_path()
        path = folder / name
        if tag != "q4_1":
            from ..native.build import cache_dir

            path = cache_dir() / "gguf" / f"{name.removesuffix('.gguf')}-{tag}.gguf"  # (made once, kept)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                p = llama_cpp.llama_model_quantize_default_params()
                p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{LLAMA_CPP_TYPES[tag]}")
                p.allow_requantize = True
                tmp = path.with_suffix(".partial")  # (a run cut short leaves no file that looks finished)
                if llama_cpp.llama_model_quantize(str(folder / name).encode(), str(tmp).encode(), ctypes.byref(p)):
                    raise RuntimeError(f"bench linearized: llama.cpp could not write {tmp}")
                os.replace(tmp, path)
        self.tag = tag
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=torch.get_num_threads(),
            n_batch=512,
            verbose=False,
            logits_all=False,
        )

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def decode(self, tokens: int) -> list[float]:
        times, tok = [], 1
        for _ in range(tokens):
            t0 = time.perf_counter()
            self.llm.eval([tok])
            times.append(time.perf_counter() - t0)
            tok = (tok * 7 + 3) % 49152
        return times
