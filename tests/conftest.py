import os

# Triton kernels run in its interpreter on machines without a GPU; the variable must be set before
# Triton is imported (it is read when the kernels are decorated). TRITON_INTERPRET=0 keeps the GPU.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# "auto" and the model take the compiled kernels without first timing them against PyTorch: the
# tests check what each path computes; tests/ops/test_cpu_kernel.py tests the timed choice itself.
os.environ.setdefault("LINEAR_TRANSFORMERS_AUTO_KERNELS", "always")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from a fixed seed, so failures reproduce; inputs are still fresh random draws."""
    torch.manual_seed(0)
    yield


# Every ISA level this machine runs, with gcc and clang: the native libraries built and loaded for it
# within the test (tests/ops/test_isa_levels.py, tests/decode/test_fused_step.py).
COMPILERS = ("gcc", "clang")


def _builds():
    from linear_transformers.native import build

    return [(level, cc) for level in build.supported_levels() for cc in COMPILERS]


BUILDS = _builds()


@pytest.fixture(params=BUILDS, ids=[f"{level}-{cc}" for level, cc in BUILDS])
def each_build(request):
    import shutil

    from linear_transformers import native
    from linear_transformers.decode import fused
    from linear_transformers.ops import cpu

    level, cc = request.param
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} is not installed (apt-get install {cc})")
    with native.use(level, cc):
        if not (cpu.available() and fused.available()):
            why = cpu.unavailable_reason() or fused.unavailable_reason()
            pytest.fail(f"{level} with {cc} does not build: {why}")
        info = native.build_info(fused.LIBRARY)
        assert info.level == level and cc in info.compiler.lower()
        yield level, cc
