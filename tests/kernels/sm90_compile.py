"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter checks what a kernel computes but not whether the compiler accepts it (dot
shapes, loop-carried types, constexpr use) nor what it costs (registers, spills, shared memory).
This script runs the real ops on CPU tensors with a stand-in driver: each launch is caught by
Triton's JIT cache hook, compiled for sm_90 with ptxas, and skipped. Run it without
``TRITON_INTERPRET``; it prints one JSON line per compiled kernel variant.

    python tests/kernels/sm90_compile.py [--all]
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.driver import driver

TARGET = GPUTarget("cuda", 90, 32)
RESULTS: list[dict] = []


class _Sm90Driver:
    """Just enough of a driver for the JIT to specialise and hand us the launch."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET


def _resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    usage = {}
    for key, pattern in (
        ("regs", r"REG:(\d+)"),
        ("stack", r"STACK:(\d+)"),
        ("smem", r"SHARED:(\d+)"),
    ):
        m = re.search(pattern, text)
        if m:
            usage[key] = int(m.group(1))
    return usage


def _compile_hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    jit_fn = fn.jit_function
    src = ASTSource(jit_fn, compile["signature"], compile["constants"], compile["configs"][0])
    options = {
        "num_warps": compile["num_warps"],
        "num_stages": compile["num_stages"],
        "num_ctas": compile["num_ctas"],
    }
    record = {"kernel": fn.name, "warps": options["num_warps"], "stages": options["num_stages"]}
    constexprs = {k[0] if isinstance(k, tuple) else k: v for k, v in compile["constants"].items()}
    names = jit_fn.arg_names
    record["constexprs"] = {
        names[k]: str(v) for k, v in constexprs.items() if isinstance(k, int) and names[k].isupper()
    }
    try:
        compiled = triton.compile(src, target=TARGET, options=options)
        record.update(_resource_usage(compiled.asm["cubin"]))
        record["smem"] = compiled.metadata.shared  # dynamic shared memory, what Triton uses
        ptx = compiled.asm["ptx"]
        record["wgmma"] = "wgmma" in ptx
        record["mma"] = "mma.sync" in ptx
        record["ok"] = True
    except Exception as exc:  # report every variant, not just the first failure
        record["ok"] = False
        causes, err = [], exc
        while err is not None:  # the innermost error names the line inside helper functions
            causes.append(f"{type(err).__name__}: {err}")
            err = err.__cause__ or err.__context__
        record["error"] = "\n".join(causes)[-3000:]
    RESULTS.append(record)
    print(json.dumps(record), flush=True)
    return True  # tells the JIT to skip compiling and launching


def _paged(num_seqs, ctx, qlen, heads, kv_heads, dim, page, dtype, kv_dtype=None):
    from kvmesh.kernels.metadata import AttentionMetadata, KVCacheLayer

    kv_dtype = kv_dtype or dtype
    blocks = num_seqs * triton.cdiv(ctx + qlen, page)
    shape = (blocks, page, kv_heads, dim)
    quant = kv_dtype in (torch.int8, torch.float8_e4m3fn)
    cache = KVCacheLayer(
        torch.zeros(shape, dtype=kv_dtype),
        torch.zeros(shape, dtype=kv_dtype),
        torch.zeros(shape[:3]) if quant else None,
        torch.zeros(shape[:3]) if quant else None,
    )
    qlens, slens = [qlen] * num_seqs, [ctx + qlen] * num_seqs
    meta = AttentionMetadata(
        query_start_loc=torch.arange(0, num_seqs + 1, dtype=torch.int32) * qlen,
        seq_lens=torch.tensor(slens, dtype=torch.int32),
        block_tables=torch.zeros(num_seqs, blocks // num_seqs, dtype=torch.int32),
        slot_mapping=torch.zeros(num_seqs * qlen, dtype=torch.int64),
        max_query_len=qlen,
        max_seq_len=ctx + qlen,
        query_lens_cpu=qlens,
        seq_lens_cpu=slens,
    )
    q = torch.zeros(num_seqs * qlen, heads, dim, dtype=dtype)
    return q, cache, meta


def main(everything: bool) -> int:
    driver.set_active(_Sm90Driver())
    knobs.runtime.jit_cache_hook = _compile_hook
    from kvmesh.kernels import triton_attention_decode
    from kvmesh.kernels import triton_ops as ops

    triton_attention_decode.num_sms = lambda device: 132  # plan splits as on an H100

    bf16, fp16 = torch.bfloat16, torch.float16
    x = torch.zeros(4, 4096, dtype=bf16)
    ops.rms_norm(x, torch.zeros(4096, dtype=bf16), 1e-6, x)
    ops.silu_and_mul(torch.zeros(4, 2 * 14336, dtype=bf16))
    qkv = torch.zeros(4, 48 * 128, dtype=bf16)
    q, k = qkv[:, : 32 * 128].view(4, 32, 128), qkv[:, 32 * 128 : 40 * 128].view(4, 8, 128)
    ops.rotary_embedding(torch.zeros(4, dtype=torch.long), q, k, torch.zeros(64, 128))
    for kv_dtype in (bf16, torch.float8_e4m3fn) + ((torch.int8,) if everything else ()):
        _, cache, meta = _paged(4, 0, 1, 32, 8, 128, 16, bf16, kv_dtype)
        ops.reshape_and_cache(k, k, cache, meta.slot_mapping)

    variants = [  # (seqs, ctx, qlen, heads, kv_heads, dim, page, dtype, kv_dtype, window)
        (64, 2047, 1, 32, 8, 128, 16, bf16, None, None),  # decode, split-KV
        (8, 0, 2048, 32, 8, 128, 16, bf16, None, None),  # prefill
        (2, 100, 300, 12, 4, 64, 32, fp16, torch.float8_e4m3fn, 64),  # extend, fp8, window
        (2, 100, 1, 14, 2, 64, 16, torch.float32, None, None),  # fp32 decode
        (2, 100, 30, 14, 2, 64, 16, torch.float32, None, None),  # fp32 extend
    ]
    if everything:
        variants += [
            (2, 100, 1, 12, 1, 96, 8, fp16, torch.int8, 32),  # MQA, head dim 96, int8
            (2, 100, 30, 12, 1, 96, 64, fp16, torch.int8, None),
            (2, 100, 30, 4, 2, 16, 16, fp16, None, None),  # tiny-model head dim
        ]
    for seqs, ctx, qlen, heads, kvh, dim, page, dtype, kv_dtype, window in variants:
        q, cache, meta = _paged(seqs, ctx, qlen, heads, kvh, dim, page, dtype, kv_dtype)
        ops.paged_attention(q, cache, meta, dim**-0.5, window)
    failed = [r for r in RESULTS if not r["ok"]]
    return 1 if failed or not RESULTS else 0


if __name__ == "__main__":
    sys.exit(main("--all" in sys.argv))
