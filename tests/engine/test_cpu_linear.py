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
from kvmesh.kernels.cpu_linear import DotWeight, dot_linear_kernel, packing_supported_by_onednn

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
    assert layer.packed_weight is not None


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


def greedy_tokens_off_and_on(path, monkeypatch, assert_all_blocks_free, switch, check, **llm_args):
    """Greedy tokens of three prompts from the model at ``path`` with the environment switch
    ``switch`` off, then on; ``check(llm, on)`` inspects each engine before it generates."""
    prompts = [[5, 9, 13, 2, 7], [1, 2, 3], list(range(10, 60))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = []
    for on in (False, True):
        monkeypatch.setenv(switch, "1" if on else "0")
        llm = LLM(str(path), max_num_seqs=4, num_kv_blocks=64, **llm_args)
        check(llm, on)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        runs.append([o.outputs[0].token_ids for o in outs])
        assert_all_blocks_free(llm)
    return runs


@pytest.mark.parametrize("tied", [True, False])
def test_packed_and_plain_models_give_the_same_greedy_tokens(
    make_tiny_model, monkeypatch, assert_all_blocks_free, tied
):
    def packed_when_on(llm, on):
        assert llm.engine.runner.packed_linear_layers == on

    off, on = greedy_tokens_off_and_on(
        make_tiny_model("llama", tie_word_embeddings=tied),
        monkeypatch,
        assert_all_blocks_free,
        "KVMESH_CPU_PACKED_LINEAR",
        packed_when_on,
    )
    assert off == on


# ---- kvmesh's AVX-512 kernel (csrc/linear_cpu.h) ---------------------------------------------

needs_dot = {
    dtype: pytest.mark.skipif(
        dot_linear_kernel(dtype) is None, reason=f"oneDNN serves {dtype} here, not the kernel"
    )
    for dtype in (torch.float32, torch.bfloat16)
}
DOT_DTYPES = [pytest.param(d, marks=needs_dot[d]) for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtype", DOT_DTYPES)
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
def test_dot_kernel_products_match_float32_sums(dtype, rows, in_features, out_features, bias):
    torch.manual_seed(rows * 1000 + out_features)
    layer = PackableLinear(in_features, out_features, bias=bias).to(dtype)
    weight = layer.weight.detach().clone()
    b = None if layer.bias is None else layer.bias.detach().clone()
    x = torch.randn(rows, in_features, dtype=dtype)
    # The exact products of the inputs, summed in float32 (rounded once to bfloat16).
    want = F.linear(x.float(), weight.float(), None if b is None else b.float()).to(dtype)
    layer.pack()
    assert isinstance(layer.packed_weight, DotWeight)
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == dtype and got.shape == want.shape
    # Only the order of the float32 sums differs: float32 to its rounding, bfloat16 at most
    # one bfloat16 step apart.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_dot_kernel_keeps_leading_dims_and_strided_rows(dtype):
    torch.manual_seed(1)
    weight = torch.randn(40, 64, dtype=dtype)
    packed = pack_linear_weight(weight)
    assert isinstance(packed, DotWeight) and packed.out_features == 40
    x = torch.randn(2, 3, 128, dtype=dtype)[..., :64]  # rows 128 apart
    want = F.linear(x.float(), weight.float()).to(dtype)
    got = packed_linear(x, packed, None)
    assert got.shape == (2, 3, 40) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_dot_kernel_gives_the_same_bits_on_one_thread_or_several(dtype):
    # The threads pull runs of column groups from a shared counter, so which thread computes
    # which columns changes from call to call; each column's sum must not.
    torch.manual_seed(3)
    weight = torch.randn(3072 + 40, 576, dtype=dtype)  # 68 groups: many runs, a partial tile
    packed = pack_linear_weight(weight)
    assert isinstance(packed, DotWeight)
    x = torch.randn(37, 576, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = packed_linear(x, packed, None)
        torch.set_num_threads(max(2, threads))
        shared = [packed_linear(x, packed, None) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for got in shared:
        assert torch.equal(got, alone)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_dot_kernel_rejects_an_input_of_another_dtype_clearly(dtype):
    packed = pack_linear_weight(torch.randn(16, 32, dtype=dtype))
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match=r"x must be .* like the weight"):
        packed_linear(torch.randn(4, 32, dtype=other), packed, None)


@needs_dot[torch.bfloat16]
def test_dot_kernel_is_chosen_only_where_it_should_be(monkeypatch):
    bf16 = torch.randn(32, 64, dtype=torch.bfloat16)
    assert isinstance(pack_linear_weight(bf16), DotWeight)
    assert dot_linear_kernel(torch.float16) is None
    if packing_supported_by_onednn(torch.bfloat16):
        # in_features odd: no pairs to read, oneDNN packs it
        assert pack_linear_weight(torch.randn(32, 63, dtype=torch.bfloat16)).is_mkldnn
        monkeypatch.setenv("KVMESH_CPU_DOT_LINEAR", "0")
        assert pack_linear_weight(bf16).is_mkldnn
        assert pack_linear_weight(bf16.float()).is_mkldnn
        monkeypatch.delenv("KVMESH_CPU_DOT_LINEAR")
        # with AMX, oneDNN's tiles are the fast path for bfloat16; float32 keeps the kernel
        flags = cpu_native.cpu_flags() + " amx_bf16 amx_tile"
        monkeypatch.setattr(cpu_native, "cpu_flags", lambda: flags)
        assert pack_linear_weight(bf16).is_mkldnn
        assert isinstance(pack_linear_weight(bf16.float()), DotWeight)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_models_agree_through_either_kernel(
    make_tiny_model, monkeypatch, assert_all_blocks_free, dtype
):
    """The whole model through the kernel and through oneDNN: float32 gives the same greedy
    tokens; bfloat16 the same first token for every prompt (the two sum in different orders,
    so later bfloat16 tokens may part where two logits tie within its precision)."""
    if not packing_supported_by_onednn(dtype):
        pytest.skip("oneDNN cannot pack this dtype here: nothing to compare with")

    def kernel_when_on(llm, on):
        layers = [
            m.packed_weight
            for m in llm.engine.runner.model.modules()
            if isinstance(m, PackableLinear)
        ]
        assert layers and all(isinstance(w, DotWeight) == on for w in layers)

    onednn, kernel = greedy_tokens_off_and_on(
        make_tiny_model("llama", tie_word_embeddings=False),
        monkeypatch,
        assert_all_blocks_free,
        "KVMESH_CPU_DOT_LINEAR",
        kernel_when_on,
        dtype=str(dtype).removeprefix("torch."),
    )
    if dtype == torch.float32:
        assert onednn == kernel
    else:
        assert [t[0] for t in onednn] == [t[0] for t in kernel]
