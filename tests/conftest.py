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
