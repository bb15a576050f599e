"""Context parallelism on torch.distributed (gloo on loopback): 2 and 4 processes each holding a segment
of the sequences give the outputs, final state and gradients (inputs and initial state) of one
process running the whole sequence; with data parallelism beside it; the numbers exchanged do not
depend on the sequence length."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from linear_transformers import ops
from linear_transformers.ops import LinearState, parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(seed: int, T: int, B=2, H=2, Dk=6, Dv=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.elu(torch.randn(B, T, H, Dk, generator=g, dtype=torch.float64)) + 1 for _ in "qk")
    v = torch.randn(B, T, H, Dv, generator=g, dtype=torch.float64)
    S0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
    z0 = torch.rand(B, H, Dk, generator=g, dtype=torch.float64) * 5
    return [x.to(dtype) for x in (q, k, v, S0, z0)]


def _loss_weights(out, S, z, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (out, S, z)]


def _reference(seed, T, backend, with_state):
    q, k, v, S0, z0 = (x.requires_grad_() for x in _inputs(seed, T))
    state = LinearState(S0, z0, 3) if with_state else None
    out, final = ops.causal_linear_attention(q, k, v, initial_state=state, return_state=True, backend=backend)
    w = _loss_weights(out, final.S, final.z)
    loss = (out * w[0]).sum() + (final.S * w[1]).sum() + (final.z * w[2]).sum()
    grads = torch.autograd.grad(loss, [q, k, v, S0, z0] if with_state else [q, k, v])
    return out, final, w, grads


def _worker(rank, world, port, T, backend, with_state, data_parallel, lengths_to_record, failures):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # with data parallelism, ranks [0, cp) share sequence 0 and [cp, 2 cp) sequence 1
        cp = world // 2 if data_parallel else world
        groups = [dist.new_group(list(range(g, g + cp))) for g in range(0, world, cp)]
        group, seed = groups[rank // cp], rank // cp
        r = rank % cp
        out_ref, final_ref, w, grads_ref = _reference(seed, T, backend, with_state)
        q, k, v, S0, z0 = (x.requires_grad_() for x in _inputs(seed, T))
        a, b = parallel.segment(T, r, cp)
        state = LinearState(S0, z0, 3) if with_state and r == 0 else None
        out, final = ops.context_parallel_causal_linear_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], group, initial_state=state, return_state=True, backend=backend
        )
        torch.testing.assert_close(out, out_ref[:, a:b], rtol=1e-5, atol=1e-5)
        assert final.n_tokens == (3 if with_state else 0) + b, (final.n_tokens, b)
        loss = (out * w[0][:, a:b]).sum()
        if r == cp - 1:  # the last rank holds the state after the whole sequence
            torch.testing.assert_close(final.S, final_ref.S, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(final.z, final_ref.z, rtol=1e-5, atol=1e-4)
            loss = loss + (final.S * w[1]).sum() + (final.z * w[2]).sum()
        inputs = [q, k, v, S0, z0] if with_state else [q, k, v]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        for name, g, ref in zip(["dq", "dk", "dv"], grads[:3], grads_ref[:3], strict=True):
            torch.testing.assert_close(
                g[:, a:b], ref[:, a:b], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
            )
            assert not g[:, :a].any() and not g[:, b:].any()
        if with_state:  # the initial state's gradient is rank 0's alone
            for name, g, ref in zip(["dS0", "dz0"], grads[3:], grads_ref[3:], strict=True):
                if r == 0:
                    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
                else:
                    assert g is None or not g.any()
        if lengths_to_record:  # what one rank receives, at two lengths
            sizes = {}
            real = parallel._all_gather

            def recording(x, grp):
                parts = real(x, grp)
                sizes[n].append(sum(p.numel() for p in parts))
                return parts

            parallel._all_gather = recording
            for n in lengths_to_record:
                sizes[n] = []
                q, k, v = (x[:, : n // cp].requires_grad_() for x in _inputs(0, n)[:3])
                out = ops.context_parallel_causal_linear_attention(q, k, v, group, backend=backend)
                out.sum().backward()
            assert len({tuple(s) for s in sizes.values()}) == 1, sizes
            B, _, H, Dk = q.shape
            expected = parallel.exchanged_numbers(cp, B, H, Dk, v.shape[-1])
            assert sizes[lengths_to_record[0]] == [expected, expected], sizes
    except BaseException as e:
        failures.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()


def _spawn(world, T, backend="chunked", with_state=True, data_parallel=False, record=()):
    failures = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(
            _worker,
            args=(world, _free_port(), T, backend, with_state, data_parallel, list(record), failures),
            nprocs=world,
            join=True,
        )
    except Exception:
        messages = []
        while not failures.empty():
            messages.append(failures.get())
        pytest.fail("\n".join(messages) or "a worker failed")


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_equals_one_process(world):
    _spawn(world, T=37, record=(64, 512))  # 37 tokens: uneven segments


def test_context_parallel_with_the_cpu_kernel_and_no_initial_state():
    _spawn(2, T=130, backend="cpu", with_state=False)


def test_context_parallel_beside_data_parallel():
    _spawn(4, T=50, data_parallel=True)


def test_segments_cover_the_sequence():
    for T in (0, 1, 7, 64):
        for world in (1, 2, 3, 4):
            parts = [parallel.segment(T, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == T
            assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_context_parallel_needs_a_process_group():
    q = torch.rand(1, 4, 1, 2)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        ops.context_parallel_causal_linear_attention(q, q, q)
