"""Decode-step time, tensor parallel 1 vs 2, on a tiny random Llama (CPU, float32).

    .venv/bin/python bench/tp_bench.py [--steps 40] [--batches 1 32] [--hidden 256 --layers 4]

For each (tp, batch): B requests with 16-token prompts are prefilled, then ``--steps`` decode
steps are timed one by one. Per step (medians over the timed steps, in ms):

* ``step_ms``: ``engine.step()`` wall time;
* ``forward_ms``: time inside the model runner's forward pass, including the TP all-reduces and
  logits gather (``ModelRunner.execute``);
* ``overhead_ms = step_ms - forward_ms``: orchestration (scheduling, input packing, the step
  broadcast to the workers, sampling, outputs). The target is ≤ 1 ms at TP 2;
* ``broadcast_ms`` and ``collectives_ms``: rank 0's time in the step broadcast and in the
  forward's collectives (already inside overhead and forward respectively);
* ``tp_added_overhead_ms``: this row's overhead minus the TP 1 row's at the same batch, i.e.
  what tensor parallelism adds to the engine's own per-step work.

Prints one JSON document. On a shared 2-core machine absolute numbers move 2-7x with load:
compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

TIMES: dict[str, float] = defaultdict(float)


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - start

    return wrapper


def instrument() -> None:
    """Wrap the functions whose time we report (rank 0's side only)."""
    from kvmesh.replicas.model_runner import ModelRunner
    from kvmesh.replicas.tp.comm import TPGroup
    from kvmesh.replicas.tp.messages import StepSender

    ModelRunner.execute = timed("forward", ModelRunner.execute)
    StepSender.send = timed("broadcast", StepSender.send)
    TPGroup.all_reduce = timed("collectives", TPGroup.all_reduce)
    TPGroup.gather_to_first = timed("collectives", TPGroup.gather_to_first)


def build_model(path: Path, hidden: int, layers: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        max_position_embeddings=1024,
        initializer_range=0.25,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


def measure(engine, batch: int, steps: int) -> dict:
    from kvmesh import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(
            None, params, prompt_token_ids=[3 + (i * 7 + j) % 8000 for j in range(16)]
        )
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()  # prefill
    for _ in range(3):
        engine.step()  # warm up decode
    rows = defaultdict(list)
    for _ in range(steps):
        TIMES.clear()
        start = time.perf_counter()
        engine.step()
        rows["step"].append(time.perf_counter() - start)
        for name in ("forward", "broadcast", "collectives"):
            rows[name].append(TIMES[name])
    for rid in list(engine.requests):
        engine.abort_request(rid)

    def ms(name: str) -> float:
        return round(statistics.median(rows[name]) * 1e3, 3)

    step, forward = ms("step"), ms("forward")
    overheads = [s - f for s, f in zip(rows["step"], rows["forward"], strict=True)]
    return {
        "batch": batch,
        "step_ms": step,
        "forward_ms": forward,
        "overhead_ms": round(statistics.median(overheads) * 1e3, 3),
        "broadcast_ms": ms("broadcast"),
        "collectives_ms": ms("collectives"),
        "tokens_per_s": round(batch / statistics.median(rows["step"]), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    instrument()

    from kvmesh.replicas.engine_args import EngineArgs
    from kvmesh.replicas.llm_engine import LLMEngine
    from kvmesh.replicas.tp.tp_engine import TPEngine

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp), args.hidden, args.layers)
        for tp in args.tp:
            engine_args = EngineArgs(
                model=str(path), tensor_parallel_size=tp, max_num_seqs=64, max_model_len=1024
            )
            if tp > 1:
                import ray

                if not ray.is_initialized():
                    ray.init(
                        address="local",
                        num_cpus=max(2, tp),
                        include_dashboard=False,
                        log_to_driver=False,
                    )
            engine = TPEngine(engine_args) if tp > 1 else LLMEngine(engine_args)
            try:
                threads = torch.get_num_threads()
                for batch in args.batches:
                    row = measure(engine, batch, args.steps)
                    results.append({"tp": tp, "rank0_threads": threads, **row})
            finally:
                engine.shutdown()
    base = {r["batch"]: r["overhead_ms"] for r in results if r["tp"] == 1}
    for r in results:
        if r["batch"] in base:
            r["tp_added_overhead_ms"] = round(r["overhead_ms"] - base[r["batch"]], 3)
    print(
        json.dumps(
            {
                "bench": "tp_decode_step",
                "device": "cpu",
                "cpus": len(os.sched_getaffinity(0)),
                "load_avg_1m": os.getloadavg()[0],
                "model": {"hidden": args.hidden, "layers": args.layers, "heads": 8, "kv_heads": 4},
                "decode_steps_timed": args.steps,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
