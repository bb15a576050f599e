"""The compiled CPU kernels: built once per ISA level into their cache, reused; when they cannot be
built, "auto" falls back to the PyTorch path with one warning while "cpu" says why; "auto" takes a
kernel only where it measured faster than PyTorch here, and says so once where it did not."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from linear_transformers import decode, native, ops
from linear_transformers.bench import measure
from linear_transformers.decode import fused
from linear_transformers.native import build
from linear_transformers.ops import cpu

from helpers import qkv, rel_err

needs_compiler = pytest.mark.skipif(not build.compilers(), reason="no C compiler on this machine")


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """Forget the loaded libraries and build into an empty cache directory."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_warned", set())
    monkeypatch.setattr(native, "_verdicts", {})
    monkeypatch.setenv("LINEAR_TRANSFORMERS_CACHE", str(tmp_path))
    monkeypatch.setattr(ops, "_warned_fallback", set())
    return tmp_path


def _auto_choice(q, v) -> str:
    return ops._causal_backend("test", "auto", q, v).name


@needs_compiler
def test_kernels_build_on_this_machine():
    assert cpu.available(), cpu.unavailable_reason()
    assert fused.available(), fused.unavailable_reason()
    info = native.build_info(cpu.LIBRARY)
    assert info.level == build.best_level()
    assert not any(f.startswith(("-march=native", "-mtune=native")) for f in info.flags)
    # the attention kernel is its own library, on OpenMP only where that is PyTorch's own runtime
    assert info.path != native.build_info(fused.LIBRARY).path
    assert info.openmp == build.shares_pytorch_openmp("clang" in info.compiler.lower())
    assert info.openmp == any("-fopenmp" in f for f in info.flags)
    _attention_matches_the_reference_on_threads(3)


def _attention_matches_the_reference_on_threads(n_threads: int) -> None:
    """Forward and backward of the kernel against the reference, with the sequences (B * H = 6)
    split unevenly over n_threads threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        q, k, v = qkv(2, 50, 3, 8, 5, requires_grad=True)
        got = ops.causal_linear_attention(q, k, v, backend="cpu", chunk_size=16)
        grads = torch.autograd.grad(got.square().sum(), (q, k, v))
        want = ops.causal_linear_attention(q, k, v, backend="naive")
        want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    finally:
        torch.set_num_threads(before)
    assert rel_err(got, want) < 1e-12
    for g, w in zip(grads, want_grads, strict=True):
        assert rel_err(g, w) < 1e-10


@needs_compiler
def test_the_attention_kernel_runs_on_pthreads_without_openmp(fresh_kernel, monkeypatch):
    """Where the compiler has no OpenMP, or not PyTorch's runtime (clang), the attention kernel
    threads itself with pthreads, silently: nothing is lost."""
    monkeypatch.setattr(build, "_openmp_flags", lambda clang, mode: [[]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.available(), cpu.unavailable_reason()
    info = native.build_info(cpu.LIBRARY)
    assert not info.openmp and info.describe().endswith(", pthreads")
    _attention_matches_the_reference_on_threads(4)


@needs_compiler
def test_an_openmp_attention_build_that_does_not_load_falls_back_to_pthreads(fresh_kernel, monkeypatch):
    """PyTorch's libgomp may be older than the compiler's and lack a symbol the library needs: the
    kernel is then rebuilt on pthreads rather than lost."""
    if not build.shares_pytorch_openmp("clang" in build.compiler_version(build.default_compiler()).lower()):
        pytest.skip("the default compiler does not build the attention kernel with OpenMP here")
    real, opened = native.ctypes.CDLL, []

    def cdll(path, *args, **kwargs):
        opened.append(path)
        if len(opened) == 1:
            raise OSError(f"{path}: version `GOMP_9.9' not found")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(native.ctypes, "CDLL", cdll)
    assert cpu.available(), cpu.unavailable_reason()
    assert len(opened) == 2 and opened[0] != opened[1]
    info = native.build_info(cpu.LIBRARY)
    assert not info.openmp and info.describe().endswith(", pthreads")
    monkeypatch.setattr(native.ctypes, "CDLL", real)
    _attention_matches_the_reference_on_threads(3)


@needs_compiler
def test_build_is_cached_and_reused(fresh_kernel, monkeypatch):
    assert cpu.available(), cpu.unavailable_reason()
    built = list(fresh_kernel.glob(f"causal_linear-{build.best_level()}-*.so"))
    assert len(built) == 1
    assert json.loads(built[0].with_suffix(".json").read_text())["flags"] == list(native.build_info(cpu.LIBRARY).flags)
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(build.tempfile, "TemporaryDirectory", lambda **kw: pytest.fail("recompiled a cached library"))
    assert cpu.available()
    assert built[0].stat().st_mtime_ns == stamp


def test_auto_falls_back_with_one_warning(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_kernel / "no-such-compiler"))
    q, k, v = qkv(1, 20, 2, 4, 4)
    with pytest.warns(RuntimeWarning, match="backend 'cpu' is unavailable .*no-such-compiler.*using 'chunked'"):
        out = ops.causal_linear_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per process
        ops.causal_linear_attention(q, k, v)
    assert rel_err(out, ops.causal_linear_attention(q, k, v, backend="naive")) < 1e-12
    with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable"):
        ops.causal_linear_attention(q, k, v, backend="cpu")


def test_disabled_by_environment(fresh_kernel, monkeypatch):
    monkeypatch.setenv("LINEAR_TRANSFORMERS_NO_CPU_KERNEL", "1")
    assert not cpu.available() and not fused.available()
    assert "LINEAR_TRANSFORMERS_NO_CPU_KERNEL" in cpu.unavailable_reason()


@needs_compiler
def test_compile_errors_are_reported(fresh_kernel, monkeypatch):
    # the build compiles the source read at import (not the files on disk, which may have changed since)
    monkeypatch.setitem(native._libraries["causal_linear"].sources, "causal_linear.c", b"this is not C\n")
    assert not cpu.available()
    assert "compiling causal_linear for" in cpu.unavailable_reason()
    assert fused.available()  # the other library is not affected


def test_isa_level_is_chosen_from_the_cpu_or_forced(monkeypatch):
    supported = build.supported_levels()
    assert supported[-1] == "generic" and build.best_level() == supported[0]
    monkeypatch.setenv("LINEAR_TRANSFORMERS_ISA", supported[-1])
    assert build.best_level() == "generic"
    monkeypatch.setenv("LINEAR_TRANSFORMERS_ISA", "pentium4")
    with pytest.raises(ValueError, match="unknown ISA level 'pentium4'; choose one of x86-64-v4-amx, "):
        build.best_level()
    foreign = "armv8-a" if build.machine() == "x86_64" else "x86-64-v3"
    monkeypatch.setenv("LINEAR_TRANSFORMERS_ISA", foreign)
    with pytest.raises(ValueError, match=f"ISA level '{foreign}' does not run on this CPU"):
        build.best_level()


def test_levels_follow_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(build, "machine", lambda: "x86_64")
    avx2 = build._V3 | {"sse2"}
    monkeypatch.setattr(build, "cpu_flags", lambda: avx2)
    assert build.supported_levels() == ["x86-64-v3", "x86-64", "generic"]
    monkeypatch.setattr(build, "cpu_flags", lambda: build._V4 | {"avx512_bf16", "avx512_vnni"})  # no AMX (Zen 4)
    assert build.supported_levels()[:2] == ["x86-64-v4-bf16", "x86-64-v4"]
    monkeypatch.setattr(build, "cpu_flags", lambda: build._V4 | {"avx512_bf16"})  # (no such CPU: VNNI missing)
    assert build.supported_levels()[0] == "x86-64-v4"
    monkeypatch.setattr(build, "cpu_flags", lambda: build._V4)
    assert build.supported_levels()[0] == "x86-64-v4"
    monkeypatch.setattr(build, "cpu_flags", lambda: None)  # no /proc/cpuinfo: PyTorch's view
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert build.supported_levels() == ["x86-64-v3", "x86-64", "generic"]
    monkeypatch.setattr(build, "machine", lambda: "aarch64")
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"fp", "asimd"}))
    assert build.supported_levels() == ["armv8-a", "generic"]


@needs_compiler
@pytest.mark.parametrize("winner", ["kernel", "pytorch"])
def test_auto_takes_the_kernel_only_where_it_measured_faster(fresh_kernel, monkeypatch, winner):
    monkeypatch.setenv("LINEAR_TRANSFORMERS_AUTO_KERNELS", "measure")
    calls = []

    def measure():
        calls.append(1)
        return (1.0, 2.0) if winner == "kernel" else (2.0, 1.0)

    monkeypatch.setattr(cpu, "_measure_attention", measure)
    q, _, v = qkv(1, 20, 2, 4, 4)
    if winner == "kernel":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _auto_choice(q, v) == "cpu"
    else:
        with pytest.warns(RuntimeWarning, match=r"measured slower than PyTorch .*\(2e\+03 vs 1e\+03 ms\).*'auto' uses"):
            assert _auto_choice(q, v) == "chunked"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            assert _auto_choice(q, v) == "chunked"
    # stored beside the library: a new process (here: forgotten libraries) does not measure again
    stored = json.loads(native.build_info(cpu.LIBRARY).info_path.read_text())["verdicts"]
    assert [v["faster"] for v in stored.values()] == [winner == "kernel"]
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_verdicts", {})
    _auto_choice(q, v)
    assert calls == [1]
    # explicit "cpu" is always honoured
    assert rel_err(ops.causal_linear_attention(q, q, v, backend="cpu"), ops.causal_linear_attention(q, q, v)) < 1e-12


@needs_compiler
def test_the_environment_overrides_the_verdict(fresh_kernel, monkeypatch):
    monkeypatch.setattr(cpu, "_measure_attention", lambda: pytest.fail("measured although overridden"))
    q, _, v = qkv(1, 20, 2, 4, 4)
    monkeypatch.setenv("LINEAR_TRANSFORMERS_AUTO_KERNELS", "always")
    assert _auto_choice(q, v) == "cpu"
    monkeypatch.setenv("LINEAR_TRANSFORMERS_AUTO_KERNELS", "never")
    assert _auto_choice(q, v) == "chunked"
    monkeypatch.setenv("LINEAR_TRANSFORMERS_AUTO_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="LINEAR_TRANSFORMERS_AUTO_KERNELS must be measure, always or never"):
        _auto_choice(q, v)


@needs_compiler
def test_the_real_measurements_run():
    """The verdicts' measurements themselves (what wins is this machine's business, not the test's)."""
    from linear_transformers.model import CausalTransformer

    for kernel_s, pytorch_s in (cpu._measure_attention(), CausalTransformer.measure_fused_step()):
        assert 0 < kernel_s < 1 and 0 < pytorch_s < 1


@needs_compiler
def test_cpu_backend_rejects_other_devices():
    q, k, v = (x.to("meta") for x in qkv(1, 4, 1, 2, 2, torch.float32))
    with pytest.raises(ValueError, match="backend 'cpu' runs on CPU tensors, got tensors on meta"):
        ops.causal_linear_attention(q, k, v, backend="cpu")


@needs_compiler
def test_the_step_builds_and_runs_without_openmp(fresh_kernel, monkeypatch):
    """A compiler without OpenMP (clang without libomp, say) still gives a working fused step,
    single-threaded, with one warning that says so."""
    from linear_transformers.model import CausalTransformer, ModelConfig

    monkeypatch.setattr(build, "_openmp_flags", lambda clang, mode: [[]])
    with pytest.warns(RuntimeWarning, match="built without OpenMP .* it runs single-threaded"):
        assert fused.available()
    assert not native.build_info(fused.LIBRARY).openmp
    cfg = ModelConfig(vocab_size=16, max_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64, head="mol")
    model = CausalTransformer(cfg).eval()
    tokens = torch.randint(0, 16, (3, 12))
    with torch.no_grad():
        _, state = model.prefill(tokens[:, :0])
        stepped = [model.step(tokens[:, t], state)[0] for t in range(11)]
        assert decode.built_step(model) is not None
        torch.testing.assert_close(torch.stack(stepped, 1), model(tokens)[:, 1:], atol=1e-5, rtol=1e-5)


@needs_compiler
def test_compilers_without_the_level_names_get_the_older_flags(fresh_kernel, monkeypatch):
    """GCC < 11 and clang < 12 do not know -march=x86-64-v3/v4: the same instruction set is asked
    for by an older name (haswell, skylake-avx512), and the kernel still builds and computes."""
    level = build.supported_levels()[0]
    if not build.LEVELS[level].older:
        pytest.skip(f"level {level} has no older spelling")
    old_gcc = fresh_kernel / "old-gcc"
    old_gcc.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in -march=x86-64-v*) echo "error: bad value for -march" >&2; exit 1;; esac; done\n'
        f'exec {build.compilers()[0]} "$@"\n'
    )
    old_gcc.chmod(0o755)
    monkeypatch.setenv("CC", str(old_gcc))
    assert cpu.available(), cpu.unavailable_reason()
    assert native.build_info(cpu.LIBRARY).flags[4:6] == build.LEVELS[level].older[:2]
    q, k, v = qkv(1, 70, 2, 8, 8)
    assert (
        rel_err(
            ops.causal_linear_attention(q, k, v, backend="cpu"), ops.causal_linear_attention(q, k, v, backend="naive")
        )
        < 1e-12
    )


@needs_compiler
@pytest.mark.parametrize("chunk_size", [2**32, 2**32 + 1, 10**9])
@pytest.mark.parametrize("backend", ["cpu", "chunked"])
def test_huge_chunk_sizes_are_clamped_to_the_sequence(backend, chunk_size):
    """A chunk longer than the sequence computes what one chunk of its length does: no division by
    a truncated 0, no wrap-around to 1, no allocation for a billion positions."""
    q, k, v = qkv(2, 37, 2, 8, 4)
    out = ops.causal_linear_attention(q, k, v, backend=backend, chunk_size=chunk_size)
    assert rel_err(out, ops.causal_linear_attention(q, k, v, backend="naive")) < 1e-12


@needs_compiler
@pytest.mark.parametrize("bad", [dict(C=0), dict(C=2**31), dict(Dk=0), dict(B=-1), dict(T=0)])
def test_the_c_entry_points_refuse_sizes_out_of_range(bad):
    """The kernel checks every size it is given (it does not trust the caller to have) and
    touches nothing when one is out of range."""
    sizes = dict(B=1, T=8, H=1, Dk=4, Dv=4, C=4) | bad
    buf = torch.zeros(4096, dtype=torch.float64)
    args = [buf.data_ptr()] * 11 + list(sizes.values()) + [1e-6, 1]
    with pytest.raises(ValueError, match=r"sizes out of range, got B=.* \(each >= 1"):
        cpu._call("cla_forward", torch.float64, *args)
    args = [buf.data_ptr()] * 15 + list(sizes.values()) + [1]
    with pytest.raises(ValueError, match="cla_backward.*sizes out of range"):
        cpu._call("cla_backward", torch.float64, *args)
    assert not buf.any()


@needs_compiler
def test_the_fused_step_c_entry_points_check_what_they_are_given():
    """The C step does not trust its caller: a model with an unusable size or a missing weight, or
    missing buffers, is refused (status 2) before anything is read or written."""
    import ctypes

    from linear_transformers.model import CausalTransformer, ModelConfig

    model = CausalTransformer(ModelConfig(vocab_size=16, max_len=16, d_model=16, n_layers=2, n_heads=2, d_ff=32)).eval()
    step = fused.from_model(model)
    lib = fused.load()
    S = [torch.zeros(1, 2, 8, 8) for _ in range(2)]
    z = [torch.zeros(1, 2, 8) for _ in range(2)]
    S_ptrs, z_ptrs = step._prepare(1, S, z)
    tokens, params = torch.ones(1, dtype=torch.int64), torch.empty(1, step.n_params)

    def call(m=step.model, s=S_ptrs, work=True):
        w = step._work.data_ptr() if work else None
        return lib.lt_model_token_f32(ctypes.byref(m), 1, tokens.data_ptr(), 0, s, z_ptrs, w, params.data_ptr())

    assert call() == 0
    for field, bad in [("n_layers", 0), ("dk", 0), ("bf16", 7), ("embed", None), ("head_w", None)]:
        broken = type(step.model).from_buffer_copy(step.model)
        setattr(broken, field, bad)
        assert call(broken) == 2, field
    broken = type(step.model).from_buffer_copy(step.model)
    broken.qkv_w = None
    assert call(broken) == 2
    assert call(s=(ctypes.c_void_p * 2)(S[0].data_ptr(), None)) == 2  # a layer without its state
    assert call(work=False) == 2
    before = [s.clone() for s in S]
    assert all(torch.equal(a, b) for a, b in zip(before, S, strict=True))
    assert fused.load().lt_mol_sample_f32(1, 0, 16, None, None, None, None) == -1
    assert measure.read_f32([torch.ones(10)]) == 10 and math.isnan(lib.lt_read_f32(1, None, None, 1))


@needs_compiler
def test_measuring_the_kernels_leaves_the_random_stream_alone():
    """The verdicts are measured in the middle of a user's program (the first "auto" call): they
    must not consume the global random stream, or a seeded run would differ on its first day."""
    from linear_transformers.model import CausalTransformer

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    cpu._measure_attention()
    CausalTransformer.measure_fused_step()
    assert torch.equal(torch.rand(4), expected)
