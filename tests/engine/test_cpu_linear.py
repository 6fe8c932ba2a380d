"""Linear layers packed for oneDNN on a CPU (``kernels/cpu_linear``): the same products as
``F.linear`` at every row count, the weight not held twice, the switch honoured, and a packed
model's greedy tokens equal to the unpacked one's (the architecture tests compare packed models
with transformers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvmesh import LLM, SamplingParams
from kvmesh.kernels import PackableLinear, packing_enabled, packing_supported

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
