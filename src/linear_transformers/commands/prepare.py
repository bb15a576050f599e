"""compile and time the C kernels ahead of time (after install, or in a Docker layer)

Every command compiles the C kernels it needs on first use (a few seconds each, cached per
machine under ~/.cache/linear_transformers) and times them once against PyTorch (under a second
each) before it chooses them. `prepare` does all of it now, so that a first run starts at once:

    linear-transformers prepare                # the best ISA level of this CPU, this thread count
    linear-transformers prepare --threads 4
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from ..options import add_options, check_threads, from_args, option


@dataclass
class PrepareOptions:
    threads: int = option(0, "threads the verdicts are measured for (0: torch's default)")

    def __post_init__(self) -> None:
        check_threads("prepare", self.threads)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, PrepareOptions, title="prepare")


def main(args: argparse.Namespace) -> int:
    from .. import native
    from ..decode import fused, llama  # noqa: F401 (registers their libraries)
    from ..model import CausalTransformer
    from ..ops import cpu

    cfg = from_args(PrepareOptions, args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    for name in native.registered():
        loaded = native.load(name)
        print(f"{name}: {loaded.build.describe() if loaded.build else 'unavailable: ' + str(loaded.error)}")
    verdicts = {
        "attention": cpu.auto_uses_kernel,
        "fused_step": lambda: native.verdict("fused_step", CausalTransformer.measure_fused_step, fused.LIBRARY),
    }
    for kind, choose in verdicts.items():
        faster = choose()
        print(
            f"{kind}: the compiled kernel {'is' if faster else 'is not'} the faster here "
            f"({torch.get_num_threads()} threads)"
        )
    print(f"ready in {time.perf_counter() - start:.1f} s")
    return 0
