"""Linear layers packed for oneDNN on a CPU (``kernels/cpu_linear``): the same products as
``F.linear`` at every row count, the weight not held twice, the switch honoured, and a packed
model's greedy tokens equal to the unpacked one's (the architecture tests compare packed models
with transformers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvmesh import LLM, SamplingParams
from kvmesh.kernels import (
    PackableLinear,
    cpu_native,
    pack_linear_weight,
    packed_linear,
    packing_enabled,
    packing_supported,
)
from kvmesh.kernels.cpu_linear import BF16DotWeight, bf16_dot_kernel, packing_supported_by_onednn

pytestmark = pytest.mark.skipif(
    not packing_supported(torch.float32), reason="this torch build cannot pack for oneDNN"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 7, 64, 300])
def test_packed_products_match_f_linear(rows, bias):
    torch.manual_seed(rows)
    layer = PackableLinear(96, 200, bias=bias)
    weight, b = layer.weight.detach().clone(), None if layer.bias is None else layer.bias.detach()
    x = torch.randn(rows, 96)
    want = F.linear(x, weight, b)
    layer.pack()
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packing_frees_the_weight_but_keeps_its_shape_and_bytes():
    layer = PackableLinear(64, 32, bias=False)
    layer.pack()
    layer.pack()  # idempotent: a second runner over the same model packs nothing again
    assert layer.weight.device.type == "meta"
    assert tuple(layer.weight.shape) == (32, 64) and layer.weight.dtype == torch.float32
    assert layer.packed_weight is not None and layer.packed_weight.is_mkldnn


@pytest.mark.skipif(
    not packing_supported(torch.bfloat16), reason="oneDNN has no bfloat16 path on this CPU"
)
def test_packed_bfloat16_matches_f_linear():
    torch.manual_seed(0)
    layer = PackableLinear(128, 64, bias=True).to(torch.bfloat16)
    x = torch.randn(16, 128, dtype=torch.bfloat16)
    want = F.linear(x, layer.weight.detach().clone(), layer.bias.detach())
    layer.pack()
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_switch_values(monkeypatch):
    monkeypatch.setenv("KVMESH_CPU_PACKED_LINEAR", "0")
    assert not packing_enabled()
    monkeypatch.setenv("KVMESH_CPU_PACKED_LINEAR", "1")
    assert packing_enabled()
    monkeypatch.setenv("KVMESH_CPU_PACKED_LINEAR", "maybe")
    with pytest.raises(ValueError, match="KVMESH_CPU_PACKED_LINEAR must be 0 or 1"):
        packing_enabled()


@pytest.mark.parametrize("tied", [True, False])
def test_packed_and_plain_models_give_the_same_greedy_tokens(
    make_tiny_model, monkeypatch, assert_all_blocks_free, tied
):
    path = make_tiny_model("llama", tie_word_embeddings=tied)
    prompts = [[5, 9, 13, 2, 7], [1, 2, 3], list(range(10, 60))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("KVMESH_CPU_PACKED_LINEAR", setting)
        llm = LLM(str(path), max_num_seqs=4, num_kv_blocks=64)
        assert llm.engine.runner.packed_linear_layers == (setting == "1")
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        results[setting] = [o.outputs[0].token_ids for o in outs]
        assert_all_blocks_free(llm)
    assert results["0"] == results["1"]


# ---- bfloat16 through AVX512-BF16 pair dot products (csrc/linear_bf16_cpu.h) ----------------

needs_bf16_dot = pytest.mark.skipif(
    bf16_dot_kernel() is None, reason="no AVX512-BF16 without AMX here: oneDNN serves bfloat16"
)


@needs_bf16_dot
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("rows", "in_features", "out_features"),
    [
        (0, 64, 48),
        (1, 576, 960),  # one decode row; 60 blocks = 20 full tiles of 3
        (7, 96, 200),  # rows and columns both end in partial tiles (200 = 12.5 blocks)
        (8, 64, 16),
        (9, 130, 33),
        (17, 576, 49),
        (300, 256, 80),
    ],
)
def test_bf16_dot_products_match_float32_sums(rows, in_features, out_features, bias):
    torch.manual_seed(rows * 1000 + out_features)
    layer = PackableLinear(in_features, out_features, bias=bias).to(torch.bfloat16)
    weight = layer.weight.detach().clone()
    b = None if layer.bias is None else layer.bias.detach().clone()
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    # The exact products of the bfloat16 inputs, summed in float32, rounded once.
    want = F.linear(x.float(), weight.float(), None if b is None else b.float()).bfloat16()
    layer.pack()
    assert isinstance(layer.packed_weight, BF16DotWeight)
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # Only the order of the float32 sums differs: at most one bfloat16 step apart.
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)


@needs_bf16_dot
def test_bf16_dot_keeps_leading_dims_and_strided_rows():
    torch.manual_seed(1)
    weight = torch.randn(40, 64, dtype=torch.bfloat16)
    packed = pack_linear_weight(weight)
    assert isinstance(packed, BF16DotWeight) and packed.out_features == 40
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)[..., :64]  # rows 128 apart
    want = F.linear(x.float(), weight.float()).bfloat16()
    got = packed_linear(x, packed, None)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)


@needs_bf16_dot
def test_bf16_dot_rejects_a_float32_input_clearly():
    packed = pack_linear_weight(torch.randn(16, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="x must be bfloat16"):
        packed_linear(torch.randn(4, 32), packed, None)


@needs_bf16_dot
def test_bf16_dot_is_chosen_only_where_it_should_be(monkeypatch):
    bf16 = torch.randn(32, 64, dtype=torch.bfloat16)
    assert isinstance(pack_linear_weight(bf16), BF16DotWeight)
    assert pack_linear_weight(bf16.float()).is_mkldnn  # float32 stays with oneDNN
    if packing_supported_by_onednn(torch.bfloat16):
        # in_features odd: no pairs to read, oneDNN packs it
        assert pack_linear_weight(torch.randn(32, 63, dtype=torch.bfloat16)).is_mkldnn
        monkeypatch.setenv("KVMESH_CPU_BF16_DOT_LINEAR", "0")
        assert pack_linear_weight(bf16).is_mkldnn
        monkeypatch.delenv("KVMESH_CPU_BF16_DOT_LINEAR")
        # with AMX, oneDNN's tiles are the fast path
        flags = cpu_native.cpu_flags() + " amx_bf16 amx_tile"
        monkeypatch.setattr(cpu_native, "cpu_flags", lambda: flags)
        assert pack_linear_weight(bf16).is_mkldnn


@needs_bf16_dot
def test_bf16_models_agree_through_either_kernel(
    make_tiny_model, monkeypatch, assert_all_blocks_free
):
    """The whole bfloat16 model through the kernel and through oneDNN: same first greedy token
    for every prompt (the two sum in different orders, so later tokens may part where two
    logits tie within bfloat16's precision)."""
    if not packing_supported_by_onednn(torch.bfloat16):
        pytest.skip("oneDNN has no bfloat16 path to compare with")
    path = make_tiny_model("llama", tie_word_embeddings=False)
    prompts = [[5, 9, 13, 2, 7], [1, 2, 3], list(range(10, 60))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    runs = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("KVMESH_CPU_BF16_DOT_LINEAR", setting)
        llm = LLM(str(path), dtype="bfloat16", max_num_seqs=4, num_kv_blocks=64)
        heads = [
            m.packed_weight
            for m in llm.engine.runner.model.modules()
            if isinstance(m, PackableLinear)
        ]
        assert heads and all(isinstance(h, BF16DotWeight) == (setting == "1") for h in heads)
        runs[setting] = [
            o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        ]
        assert_all_blocks_free(llm)
    for onednn, dot in zip(runs["0"], runs["1"], strict=True):
        assert onednn.token_ids[0] == dot.token_ids[0]
