"""The fused step's C interface is declared once (decode/model_step.h) and its ctypes mirror is
checked against the compiled library's own layout when the library loads."""

from __future__ import annotations

import ctypes

import pytest

from linear_transformers.decode import fused


@pytest.fixture
def lib():
    if not fused.available():
        pytest.skip(f"the fused step library is not built here: {fused.unavailable_reason()}")
    return fused.load()


def test_layout_matches_the_header(lib):
    fused.check_layout(lib)  # (it also ran when the library loaded)
    n = lib.lt_model_layout(None, 0)
    assert n == 1 + len(fused._LtModel._fields_)
    too_small = (ctypes.c_long * (n - 1))()
    assert lib.lt_model_layout(too_small, n - 1) == n and list(too_small) == [0] * (n - 1)  # nothing written


def test_a_wrong_mirror_is_refused(lib, monkeypatch):
    class Shifted(ctypes.Structure):  # one field of the wrong width: every later offset moves
        _fields_ = [("n_layers", ctypes.c_long), *fused._LtModel._fields_[1:]]

    monkeypatch.setattr(fused, "_LtModel", Shifted)
    with pytest.raises(RuntimeError, match="does not mirror lt_model in model_step.h"):
        fused.check_layout(lib)


def test_the_header_is_the_only_declaration():
    """model_step.c and the test harness include the header; no other file restates the struct."""
    from pathlib import Path

    here = Path(fused.__file__).parent
    harness = Path(__file__).parents[1] / "native" / "kernel_harness.c"
    for path in [here / "model_step.c", here / "mol_sample.c", here / "read_probe.c", harness]:
        text = path.read_text()
        assert '#include "model_step.h"' in text, path
        assert "} lt_model;" not in text, path
