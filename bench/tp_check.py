"""Tensor-parallel sanity check on one GPU, for ``bench/gpu_check.py`` to import and record.

    from tp_check import run_tp_check
    run_tp_check(out)  # fills out["tp_check"]

One GPU cannot host two NCCL ranks, so this runs the embedded SmolLM2 through ``TPEngine`` at
``tensor_parallel_size=1``: the whole sharded code path (one-rank NCCL + gloo groups,
``get_slice`` loading, vocabulary-parallel embedding and logits gather, packed step messages)
without Ray. Its greedy tokens must equal the plain ``LLMEngine``'s, in bfloat16 and float32,
since a one-rank all-reduce and gather change no bits. Also records decode throughput of both.
Standalone: ``.venv/bin/python bench/tp_check.py`` prints the record as JSON.
"""

from __future__ import annotations

import json
import time
import traceback
from typing import Any

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "The speed of light is approximately",
    "In 1969, astronauts",
    "A haiku about the sea:",
]


def _greedy(engine, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    """Run every prompt to completion; returns (tokens per prompt, tokens/s after the first
    output). A short warm-up run first keeps one-time costs (kernel compilation, allocator
    growth) out of the rate."""
    from kvmesh.replicas.sampling_params import SamplingParams

    warm = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request(None, warm, prompt_token_ids=prompts[0])
    while engine.has_unfinished_requests():
        engine.step()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(None, params, prompt_token_ids=p) for p in prompts]
    done: dict[str, list[int]] = {}
    start, first_decode, decoded = time.perf_counter(), None, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first_decode is None and out.outputs[0].token_ids:
                first_decode = time.perf_counter()
            decoded += len(out.delta_token_ids)
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    elapsed = time.perf_counter() - (first_decode or start)
    return [done[i] for i in ids], decoded / max(elapsed, 1e-9)


def run_tp_check(out: dict[str, Any], max_tokens: int = 48, device: str = "auto") -> dict:
    """Fill ``out["tp_check"]`` (and return it); never raises, records the error instead."""
    rec: dict[str, Any] = out.setdefault("tp_check", {})
    try:
        import torch

        from kvmesh import kernels
        from kvmesh.replicas.engine_args import EngineArgs
        from kvmesh.replicas.llm_engine import LLMEngine
        from kvmesh.replicas.model_files import resolve_model_dir
        from kvmesh.replicas.tp.tp_engine import TPEngine

        model_dir = resolve_model_dir(None)
        rec.update(
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            kernels=kernels.kernel_backend(),
            max_tokens=max_tokens,
            num_prompts=len(PROMPTS),
        )
        rec["ok"] = True
        for dtype in ("bfloat16", "float32"):
            args = EngineArgs(
                model=str(model_dir),
                dtype=dtype,
                device=device,
                max_model_len=1024,
                num_kv_blocks=256,
                tensor_parallel_size=1,
            )
            plain = LLMEngine(args)
            prompts = [plain.tokenizer.encode(p) for p in PROMPTS]
            want, plain_tps = _greedy(plain, prompts, max_tokens)
            del plain
            start = time.perf_counter()
            tp = TPEngine(args)
            load_s = time.perf_counter() - start
            try:
                got, tp_tps = _greedy(tp, prompts, max_tokens)
                backend = type(tp.group.compute).__name__
                rank_bytes = tp.rank_param_bytes
            finally:
                tp.shutdown()
            same = got == want
            rec["ok"] = rec["ok"] and same
            rec[dtype] = {
                "tokens_equal": same,
                "first_mismatch_prompt": next(
                    (i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None
                ),
                "plain_decode_tokens_per_s": round(plain_tps, 1),
                "tp1_decode_tokens_per_s": round(tp_tps, 1),
                "tp1_load_s": round(load_s, 2),
                "compute_group": backend,
                "rank_param_bytes": rank_bytes,
                "sample": {"prompt": PROMPTS[0], "tokens": got[0][:16]},
            }
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    except Exception as exc:  # the GPU script records failures rather than dying
        rec["ok"] = False
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc()[-4000:]
    return rec


if __name__ == "__main__":
    print(json.dumps(run_tp_check({}), indent=2))
