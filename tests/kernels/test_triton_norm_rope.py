"""RMSNorm (+ residual), rotary embedding and SiLU-and-mul: Triton (interpreted) vs torch twin."""

from __future__ import annotations

import pytest
import torch

from kvmesh.kernels import torch_ops, triton_ops

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 200)])
def test_rms_norm_matches_twin(seed, tol, dtype, with_residual, shape):
    x = torch.randn(shape, dtype=dtype) * 3
    weight = torch.randn(shape[-1], dtype=dtype)
    residual = torch.randn(shape, dtype=dtype) if with_residual else None
    out, res = triton_ops.rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = torch_ops.rms_norm(x, weight, 1e-5, residual)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, **tol(dtype), msg=f"seed={seed}")
    # The residual sum is one rounding of the same add: exact.
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0, msg=f"seed={seed}")


def _qkv_views(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """q and k as the model makes them: strided views into one fused QKV output."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return qkv, q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "rotary_dim"),
    [(4, 4, 16, 16), (6, 2, 32, 32), (8, 1, 32, 16)],  # GQA 1, 3, 8; the last rotates half
)
def test_rotary_embedding_in_place_matches_twin(
    seed, tol, dtype, heads, kv_heads, head_dim, rotary_dim
):
    tokens, max_pos = 7, 300
    qkv, q, k = _qkv_views(tokens, heads, kv_heads, head_dim, dtype)
    ref_qkv = qkv.clone()
    ref_q = ref_qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    ref_k = ref_qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(
        tokens, kv_heads, head_dim
    )
    angles = torch.rand(max_pos, rotary_dim // 2) * 6.3
    table = torch.cat([angles.cos(), angles.sin()], dim=-1)  # float32, as the model keeps it
    positions = torch.randint(0, max_pos, (tokens,))
    triton_ops.rotary_embedding(positions, q, k, table)
    torch_ops.rotary_embedding(positions, ref_q, ref_k, table)
    # Whole buffer: rotated parts match, and V / unrotated dims are untouched.
    torch.testing.assert_close(qkv, ref_qkv, **tol(dtype), msg=f"seed={seed}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 80), (2, 2, 2 * 1500)])  # 1500 > one 1024-wide tile
def test_silu_and_mul_matches_twin(seed, tol, dtype, shape):
    x = torch.randn(shape, dtype=dtype) * 4
    out = triton_ops.silu_and_mul(x)
    ref = torch_ops.silu_and_mul(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, **tol(dtype), msg=f"seed={seed}")
