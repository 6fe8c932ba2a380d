"""Microbenchmark of the CPU linear layers: oneDNN's packed matmul vs kvmesh's AVX-512 kernel
(``kernels/csrc/linear_cpu.cpp``), as a model's step runs them, in float32 and bfloat16.

    flock /tmp/kvmesh-bench.lock .venv/bin/python bench/cpu_linear_bench.py \
        [--rows 1,16,64] [--dtypes float32,bfloat16]

The weights are SmolLM2-135M's shapes, distinct per layer as in the model (30 layers of the
fused qkv 576 -> 960, the output 576 -> 576, the fused gate/up 576 -> 3,072 and the down
projection 1,536 -> 576, then the 49,152-row LM head: 270 MB of bfloat16, far more than the
last-level cache), called one after another at each row count: 1 is a one-sequence decode
step, 16 and 64 batched decode, 256 and 512 prefill chunks. Each row count alternates the two
kernels for ``--repeats`` passes and reports each one's median milliseconds per pass and the
ratio. A dtype the kernel's build lacks here (bfloat16 without AVX512-BF16) is skipped;
prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvmesh.kernels import cpu_linear, cpu_native

LAYERS = 30
LAYER_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out)
LM_HEAD = (576, 49152)


def run_dtype(dtype: torch.dtype, rows_list: list[int], repeats: int) -> list[dict]:
    ops = cpu_native.native_ops()
    torch.manual_seed(0)
    shapes = LAYER_SHAPES * LAYERS + [LM_HEAD]
    weights = [torch.randn(n, k, dtype=dtype) * 0.05 for k, n in shapes]
    onednn = [cpu_linear.pack_for_onednn(w) for w in weights]
    dot = [ops.pack_dot_linear_weight(w) for w in weights]
    del weights

    def onednn_pass(xs: dict[int, torch.Tensor]) -> None:
        for (k, _), w in zip(shapes, onednn, strict=True):
            cpu_linear.packed_linear(xs[k], w, None)

    def dot_pass(xs: dict[int, torch.Tensor]) -> None:
        for (k, n), w in zip(shapes, dot, strict=True):
            ops.dot_linear(xs[k], w, None, n)

    results = []
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, dtype=dtype) for k in (576, 1536)}
        onednn_pass(xs), dot_pass(xs)  # warm-up
        times: dict[str, list[float]] = {"onednn_ms": [], "dot_ms": []}
        for _ in range(repeats):
            for key, run in (("onednn_ms", onednn_pass), ("dot_ms", dot_pass)):
                start = time.perf_counter()
                run(xs)
                times[key].append((time.perf_counter() - start) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        flops = 2 * rows * sum(k * n for k, n in shapes)
        results.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "rows": rows,
                **{k: round(v, 2) for k, v in med.items()},
                "dot_speedup": round(med["onednn_ms"] / med["dot_ms"], 3),
                "dot_gflops": round(flops / med["dot_ms"] / 1e6, 1),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,4,8,16,32,64,256,512")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    ops = cpu_native.native_ops()
    rows = [int(r) for r in args.rows.split(",")]
    results, skipped = [], []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        if ops is None or not ops.dot_linear_available(dtype):
            skipped.append(name)
            continue
        results += run_dtype(dtype, rows, args.repeats)
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "cpu_flags": cpu_native.cpu_flags(),
                "kernel_chosen_by_default": {
                    name: cpu_linear.dot_linear_kernel(getattr(torch, name)) is not None
                    for name in args.dtypes.split(",")
                },
                "skipped_dtypes": skipped,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
