"""The fused C++ elementwise ops (RMSNorm + residual, SiLU-and-mul, RoPE) vs their torch twins.

Shapes cover a hidden size that is not a multiple of the 16-float vector, 3-D inputs, q and k
as strided views into one fused QKV output, GQA, and values large enough to saturate SiLU's
sigmoid on both sides. The residual sum is one rounding of the same add, so it must match
exactly; the norm and the exponential may differ in the last bits (another summation order, a
polynomial 2^x).
"""

from __future__ import annotations

import pytest
import torch

from kvmesh.kernels import cpu_native, torch_ops


@pytest.fixture(autouse=True, scope="module")
def _kernels_built():
    if cpu_native.native_ops() is None:
        pytest.skip(f"the C++ CPU kernels cannot be built here: {cpu_native.STATUS}")


def twin(fn, *args, **kwargs):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch_ops, "USE_CPU_NATIVE", False)
        return fn(*args, **kwargs)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 576), (37, 200), (2, 3, 64), (0, 48)])
def test_rms_norm_matches_twin(seed, with_residual, shape):
    x = torch.randn(shape) * 3
    weight = torch.randn(shape[-1])
    residual = torch.randn(shape) if with_residual else None
    saved = None if residual is None else residual.clone()
    assert torch_ops._native_elementwise(x, weight, residual) is not None
    out, res = torch_ops.rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = twin(torch_ops.rms_norm, x, weight, 1e-5, residual)
    assert out.shape == ref_out.shape == x.shape and res.shape == x.shape
    torch.testing.assert_close(out, ref_out, rtol=2e-6, atol=2e-6, msg=f"seed={seed}")
    torch.testing.assert_close(res, ref_res, rtol=0, atol=0, msg=f"seed={seed}")
    if residual is not None:  # inputs are never written
        assert torch.equal(residual, saved)


@pytest.mark.parametrize("shape", [(1, 2 * 1536), (33, 2 * 100), (2, 5, 2 * 24), (0, 8)])
def test_silu_and_mul_matches_twin(seed, shape):
    x = torch.randn(shape) * 8  # reaches sigmoid's saturation on both sides
    x.view(-1)[:4] = torch.tensor([0.0, -100.0, 100.0, -0.0])[: x.numel()]
    out = torch_ops.silu_and_mul(x)
    ref = twin(torch_ops.silu_and_mul, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6, msg=f"seed={seed}")


def test_silu_and_mul_takes_a_strided_batch(seed):
    wide = torch.randn(6, 3 * 64)
    x = wide[:, : 2 * 64]  # rows strided, each row dense
    torch.testing.assert_close(
        torch_ops.silu_and_mul(x), twin(torch_ops.silu_and_mul, x), rtol=2e-6, atol=2e-6
    )


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 16), (8, 1, 128)])
def test_rotary_matches_twin_on_qkv_views(seed, heads, kv_heads, head_dim):
    tokens, max_pos = 23, 300
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    table = torch.randn(max_pos, head_dim)
    positions = torch.randint(0, max_pos, (tokens,))
    results = []
    for native in (True, False):
        buf = qkv.clone()
        q = buf[:, : heads * head_dim].view(tokens, heads, head_dim)
        k = buf[:, heads * head_dim : (heads + kv_heads) * head_dim].view(
            tokens, kv_heads, head_dim
        )
        if native:
            torch_ops.rotary_embedding(positions, q, k, table)
        else:
            twin(torch_ops.rotary_embedding, positions, q, k, table)
        results.append(buf)
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6, msg=f"seed={seed}")
    # V (the last part of the fused output) is untouched.
    v0 = (heads + kv_heads) * head_dim
    assert torch.equal(results[0][:, v0:], qkv[:, v0:])


def test_rotary_refuses_a_position_outside_the_table():
    native = cpu_native.native_ops()
    q, k = torch.zeros(1, 2, 8), torch.zeros(1, 1, 8)
    with pytest.raises(RuntimeError, match="position 5 is outside the table of 4"):
        native.rotary_embedding(torch.tensor([5]), q, k, torch.zeros(4, 8))


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_cache_matches_the_ops_it_fuses(seed, dtype, kv_dtype):
    """One pass (RoPE, float32 queries out, K and V into the cache) gives what widening,
    rotating and copying one after the other give; a slot of -1 writes nothing."""
    from kvmesh.kernels.metadata import KVCacheLayer

    heads, kv_heads, head_dim, tokens, max_pos = 9, 3, 64, 21, 300
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim) * 4).to(dtype)
    table = torch.randn(max_pos, head_dim)
    positions = torch.randint(0, max_pos, (tokens,))
    slots = torch.randperm(8 * 16)[:tokens]
    slots[5] = -1
    before = qkv.clone()
    results = []
    for native in (True, False):
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        views = [x.reshape(tokens, -1, head_dim) for x in (q, k, v)]
        cache = KVCacheLayer(
            torch.full((8, 16, kv_heads, head_dim), 7.0, dtype=kv_dtype),
            torch.full((8, 16, kv_heads, head_dim), 7.0, dtype=kv_dtype),
        )
        args = (positions, *[x.clone() if not native else x for x in views], table, cache, slots)
        if native:
            assert torch_ops._native_elementwise(*views, dtypes=torch_ops.NATIVE_DTYPES)
            q_out = torch_ops.rotary_and_cache(*args)
        else:
            q_out = twin(torch_ops.rotary_and_cache, *args)
        results.append((q_out, cache))
    (q_native, c_native), (q_twin, c_twin) = results
    assert q_native.dtype == q_twin.dtype == torch.float32
    torch.testing.assert_close(q_native, q_twin, rtol=1e-6, atol=1e-6, msg=f"{seed=}")
    for got, want in ((c_native.k, c_twin.k), (c_native.v, c_twin.v)):
        tol = 8e-3 if kv_dtype == torch.bfloat16 else 1e-6  # one rounding may tip
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=1e-5)
    assert torch.equal(qkv, before)  # the projection output is only read
    written = torch.zeros(8 * 16, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert (c_native.k.view(8 * 16, -1)[~written] == 7).all()


def test_rotary_and_cache_refuses_a_slot_outside_the_cache():
    native = cpu_native.native_ops()
    q, k = torch.zeros(1, 2, 8), torch.zeros(1, 1, 8)
    caches = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="slot 8 is outside the cache of 8"):
        native.rotary_and_cache(
            torch.tensor([0]), q, k, k.clone(), torch.zeros(4, 8), *caches, torch.tensor([8])
        )


def _close_in_bfloat16(got: torch.Tensor, want: torch.Tensor, seed: int) -> None:
    """Equal but for rare differences of a unit or two: the float32 steps between the twins'
    bfloat16 roundings sum in another order, which can tip an intermediate rounding by one
    unit, and the next rounding (after a product) can carry that to two."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-5, msg=f"{seed=}")
    assert (got != want).float().mean() < 0.01, f"{seed=}: more than rare differences"
    if got.numel():
        assert (got != want).float().mean().item() < 0.01, f"seed={seed}"


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(1, 576), (37, 200), (2, 3, 64)])
def test_bfloat16_rms_norm_matches_twin(seed, with_residual, shape):
    x = (torch.randn(shape) * 3).to(torch.bfloat16)
    weight = torch.randn(shape[-1]).to(torch.bfloat16)
    residual = torch.randn(shape).to(torch.bfloat16) if with_residual else None
    assert torch_ops._native_elementwise(x, weight, residual, dtypes=(torch.bfloat16,))
    out, res = torch_ops.rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = twin(torch_ops.rms_norm, x, weight, 1e-5, residual)
    assert torch.equal(res, ref_res)  # one bfloat16 rounding of the same float sum
    _close_in_bfloat16(out, ref_out, seed)


def test_bfloat16_silu_and_mul_matches_twin(seed):
    x = (torch.randn(29, 2 * 1536) * 8).to(torch.bfloat16)
    _close_in_bfloat16(torch_ops.silu_and_mul(x), twin(torch_ops.silu_and_mul, x), seed)


def test_mixed_dtypes_take_the_twin():
    x = torch.randn(4, 32)
    assert torch_ops._native_elementwise(x, x.to(torch.bfloat16)) is None
    assert torch_ops._native_elementwise(x.to(torch.float16), dtypes=(torch.float32,)) is None
