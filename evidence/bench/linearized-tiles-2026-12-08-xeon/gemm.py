"""One projection of SmolLM2-135M's shapes through the Llama step's GEMV entry point
(lt_llama_gemv_f32, one thread, weights converted beforehand), the dot formats in the row layout
and on AMX tiles, 9 turns each in alternation; medians and GFLOP/s (2 B n_in n_out per call).
Behind BENCHMARKS.md's "Batched rows on AMX tiles". Run from the repository root:
    PYTHONPATH=src python evidence/bench/linearized-tiles-2026-12-08-xeon/gemm.py > gemm.txt
"""

import statistics
import time

import torch

from linear_transformers.decode import llama
from linear_transformers.results import machine_info

lib = llama.load()
assert llama.has_tiles(torch.bfloat16, torch.bfloat16) and llama.has_tiles(torch.int8, torch.int8)
print(f"# {machine_info()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
print("shape,B,format,rows_ms,tiles_ms,rows_gflops,tiles_gflops,max_rel_difference")
g = torch.Generator().manual_seed(0)
for name, n_out, n_in in [("q/o", 576, 576), ("gate/up", 1536, 576), ("down", 576, 1536), ("head", 49152, 576)]:
    w = torch.randn(n_out, n_in, generator=g)
    for B in (16, 64):
        x = torch.randn(B, n_in, generator=g)
        for fmt, dtype in (("bf16", torch.bfloat16), ("int8-dot", torch.int8)):
            packed, kind = llama.convert(w, dtype), llama.FORMATS[(dtype, dtype)]
            out = {0: torch.empty(B, n_out), 1: torch.empty(B, n_out)}
            times = {0: [], 1: []}
            for _ in range(9):
                for tiles in (0, 1):
                    t0 = time.perf_counter()
                    code = lib.lt_llama_gemv_f32(
                        kind, tiles, B, n_in, n_out, packed.data_ptr(), None, x.data_ptr(), out[tiles].data_ptr()
                    )
                    times[tiles].append(time.perf_counter() - t0)
                    assert code == 0
            diff = ((out[1] - out[0]).abs().max() / out[0].abs().max()).item()
            assert diff < 1e-5, (name, B, fmt, diff)
            med = {t: statistics.median(v) for t, v in times.items()}
            flops = 2 * B * n_in * n_out
            print(
                f"{name} {n_out}x{n_in},{B},{fmt},{1e3 * med[0]:.3f},{1e3 * med[1]:.3f},"
                f"{flops / med[0] / 1e9:.0f},{flops / med[1] / 1e9:.0f},{diff:.1e}"
            )
