"""KV-cache benchmarks on SmolLM2 (float32, this CPU): prefix caching, chunked prefill, KV quant.

    .venv/bin/python bench/kv_cache_bench.py [--only prefix,chunked,quant]

Prints one JSON document. Each comparison runs in this one process, back to back, on the same
workload, so the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import itertools

from workloads import random_requests, shared_prefix_requests

from kvmesh import LLM, SamplingParams
from kvmesh.replicas.llm_engine import LLMEngine
from kvmesh.replicas.model_files import resolve_model_dir

MODEL = str(resolve_model_dir(None))


def run_batch(prompts: list[list[int]], max_tokens: int, **engine_args) -> dict:
    llm = LLM(MODEL, max_num_seqs=len(prompts), **engine_args)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    ttfts = [o.metrics.time_to_first_token for o in outs]
    total = sum(len(p) for p in prompts) + sum(len(o.outputs[0].token_ids) for o in outs)
    stats = llm.stats()
    return {
        "elapsed_s": elapsed,
        "total_tok_s": total / elapsed,
        "mean_ttft_s": statistics.mean(ttfts),
        "prefix_cache_hits": stats["prefix_cache_hits"],
        "prefix_cache_queries": stats["prefix_cache_queries"],
        "tokens": [o.outputs[0].token_ids for o in outs],
    }


def bench_prefix(args) -> dict:
    groups, per_group, prefix_len, suffix_len = 8, 8, 448, 32
    prompts = shared_prefix_requests(groups, per_group, prefix_len, suffix_len, seed=1)
    off = run_batch(prompts, 64, enable_prefix_caching=False)
    on = run_batch(prompts, 64, enable_prefix_caching=True)
    ideal = groups * (per_group - 1) * (prefix_len // 16) * 16
    unique = [p for p, _ in random_requests(64, (480, 480), (64, 64), seed=2)]
    cold_off = run_batch(unique, 64, enable_prefix_caching=False)
    cold_on = run_batch(unique, 64, enable_prefix_caching=True)
    return {
        "workload": f"{groups} groups x {per_group} requests, {prefix_len}-token shared prefix "
        f"+ {suffix_len} unique, 64 output tokens",
        "caching_off": {k: v for k, v in off.items() if k != "tokens"},
        "caching_on": {k: v for k, v in on.items() if k != "tokens"},
        "outputs_identical": off["tokens"] == on["tokens"],
        "hit_tokens": on["prefix_cache_hits"],
        "ideal_hit_tokens": ideal,
        "hit_rate_vs_ideal": on["prefix_cache_hits"] / ideal,
        "ttft_speedup": off["mean_ttft_s"] / on["mean_ttft_s"],
        "throughput_speedup": on["total_tok_s"] / off["total_tok_s"],
        "zero_hit_cost": {
            "caching_off_tok_s": cold_off["total_tok_s"],
            "caching_on_tok_s": cold_on["total_tok_s"],
            "on_over_off": cold_on["total_tok_s"] / cold_off["total_tok_s"],
            "hits": cold_on["prefix_cache_hits"],
        },
    }


def longest_gap(chunked: bool, budget: int) -> dict:
    engine = LLMEngine(
        model=MODEL,
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=budget if chunked else 8192,
        enable_prefix_caching=False,
    )
    streams = [p for p, _ in random_requests(8, (64, 64), (1, 1), seed=3)]
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    for i, p in enumerate(streams):
        engine.add_request(None, params, request_id=f"s{i}", prompt_token_ids=p)
    while min(engine.requests[f"s{i}"].num_output_tokens for i in range(8)) < 5:
        engine.step()
    long_prompt = random_requests(1, (4000, 4000), (1, 1), seed=4)[0][0]
    arrival = time.monotonic()
    engine.add_request(
        None, SamplingParams(temperature=0, max_tokens=1), "long", prompt_token_ids=long_prompt
    )
    long_done = None
    while "long" in engine.requests or long_done is None:
        for out in engine.step():
            if out.request_id == "long" and out.finished:
                long_done = time.monotonic()
    # Gaps between consecutive tokens of the running streams from the arrival on.
    gaps = []
    for i in range(8):
        times = [t for t in engine.output_processor.states[f"s{i}"].token_times]
        times = [t for t in times if t >= arrival - 1.0]
        gaps += [b - a for a, b in itertools.pairwise(times)]
    for i in range(8):
        engine.abort_request(f"s{i}")
    return {
        "longest_gap_s": max(gaps),
        "long_prompt_ttft_s": long_done - arrival,
        "budget": budget if chunked else None,
    }


def bench_chunked(args) -> dict:
    unchunked = longest_gap(False, 0)
    chunked = longest_gap(True, args.chunk_budget)
    return {
        "workload": "8 decoding streams + one 4,000-token prompt arriving",
        "unchunked": unchunked,
        "chunked": chunked,
        "gap_reduction": unchunked["longest_gap_s"] / chunked["longest_gap_s"],
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def bench_quant(args) -> dict:
    budget = 256 << 20
    reqs = random_requests(64, (32, 256), (64, 64), seed=5)
    prompts = [p for p, _ in reqs]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=0)
    results, base = {}, None
    for dtype in ("auto", "fp8", "int8"):
        llm = LLM(MODEL, kv_cache_memory_bytes=budget, kv_cache_dtype=dtype, max_num_seqs=64)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        elapsed = time.perf_counter() - start
        seqs = [o.outputs[0] for o in outs]
        entry = {
            "tokens_in_budget": llm.stats()["kv_blocks_total"] * 16,
            "total_tok_s": (sum(map(len, prompts)) + 64 * 64) / elapsed,
        }
        if base is None:
            base = seqs
        else:
            prefixes = [
                common_prefix(a.token_ids, b.token_ids) for a, b in zip(seqs, base, strict=False)
            ]
            diffs = [
                abs(a.logprobs[i][a.token_ids[i]] - b.logprobs[i][b.token_ids[i]])
                for a, b, n in zip(seqs, base, prefixes, strict=True)
                for i in range(n)
            ]
            same = sum(
                x == y
                for a, b in zip(seqs, base, strict=False)
                for x, y in zip(a.token_ids, b.token_ids, strict=False)
            )
            entry |= {
                "sequences_identical": sum(p == 64 for p in prefixes) / len(prefixes),
                "positionwise_agreement": same / (64 * 64),
                "mean_common_prefix_fraction": statistics.mean(prefixes) / 64,
                "mean_abs_logprob_diff_on_common_prefix": statistics.mean(diffs),
            }
        results[dtype] = entry
    return {
        "budget_bytes": budget,
        "workload": "64 prompts U[32,256] x 64 greedy tokens",
        **results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="prefix,chunked,quant")
    ap.add_argument("--chunk-budget", type=int, default=512)
    args = ap.parse_args()
    out = {}
    for name in args.only.split(","):
        out[name] = {"prefix": bench_prefix, "chunked": bench_chunked, "quant": bench_quant}[name](
            args
        )
        print(json.dumps({name: out[name]}), file=sys.stderr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
