"""Warm an engine up before it serves, so its first request runs at steady-state speed.

A freshly built engine still has work to do on its first requests: the CPU decode kernel is
compiled or loaded (``kernels/cpu_native.py``), torch's thread pools and allocator grow, the
tokenizer and sampler run their first calls. Done inside the first request, that is a stall
a user sees (seconds, or the ~30 s kernel compile on a machine that never built it) after the
replica said it was ready. :func:`warm_up` does it all up front, through the engine's real
path (``add_request`` / ``step``), then puts the engine back as it found it: every KV block
free and nothing in the prefix cache (no KV events for the router), its counters and random
state as before, so ``stats()`` reads as if nothing ran.

``AsyncLLM`` calls it on its engine thread, before its constructor returns: part of what gets
warm (torch's OpenMP team, allocator arenas) belongs to the thread that ran the steps.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from kvmesh.kernels import torch_ops
from kvmesh.replicas.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvmesh.replicas.llm_engine import LLMEngine

log = logging.getLogger(__name__)

WARMUP_PROMPT_TOKENS = 64
WARMUP_DECODE_TOKENS = 8
_MAX_STEPS = 10_000
_COUNTERS = {
    "engine": ("num_steps", "num_prompt_tokens", "last_step_prefill_tokens", "last_step_decodes"),
    "kv": ("prefix_cache_queries", "prefix_cache_hits"),
    "scheduler": ("num_preemptions", "num_generated_tokens"),
    "outputs": ("num_failed_requests",),
}


def warm_up(
    engine: LLMEngine,
    prompt_tokens: int = WARMUP_PROMPT_TOKENS,
    decode_tokens: int = WARMUP_DECODE_TOKENS,
) -> dict[str, float]:
    """Load the kernels and run a short prefill and some decode steps; seconds per phase.

    Two requests run (one of ``prompt_tokens``, one of half that), so both a lone and a
    batched decode run. The phases also go into ``engine.startup_phases``. An engine that
    was already warmed, or has requests or cached blocks (not fresh), is left alone: ``{}``.
    """
    if "warmup" in engine.startup_phases:
        return {}
    if not _is_fresh(engine):
        log.warning("not warming up an engine that already holds requests or cached blocks")
        return {}
    phases: dict[str, float] = {}
    start = time.perf_counter()
    _load_kernels(engine)
    phases["kernels"] = time.perf_counter() - start
    start = time.perf_counter()
    _run_requests(engine, prompt_tokens, decode_tokens)
    phases["warmup"] = time.perf_counter() - start
    engine.startup_phases.update(phases)
    log.info("engine warmed up: %s", ", ".join(f"{name} {s:.2f}s" for name, s in phases.items()))
    return phases


def _is_fresh(engine: LLMEngine) -> bool:
    kv = engine.kv
    return (
        not engine.requests
        and not engine.has_unfinished_requests()
        and kv.num_blocks_free == kv.num_blocks_total
        and not kv.cached_block_hashes()
    )


def _load_kernels(engine: LLMEngine) -> None:
    """Build or load the CPU kernels where the model will use them (a float32 or bfloat16
    model on the CPU, see ``torch_ops._native_ops``); timed apart from the warm-up forward."""
    if engine.device.type == "cpu" and engine.dtype in torch_ops.NATIVE_DTYPES:
        from kvmesh.kernels.cpu_native import native_ops

        native_ops()


def _sizes(engine: LLMEngine, prompt_tokens: int, decode_tokens: int) -> tuple[int, int]:
    """(prompt, max_tokens) that pass ``validate`` and let both requests fit in the pool at
    once; (0, 0) when not even a two-token request fits."""
    budget = min(engine.max_model_len - 1, engine.kv.capacity_tokens // 2)
    if budget < 2:
        return 0, 0
    decode = max(1, min(decode_tokens, budget // 4))
    prompt = max(1, min(prompt_tokens, budget - decode))
    return prompt, decode


def _run_requests(engine: LLMEngine, prompt_tokens: int, decode_tokens: int) -> None:
    prompt, decode = _sizes(engine, prompt_tokens, decode_tokens)
    if not prompt:
        return
    vocab = engine.arch.vocab_size
    saved = _save(engine)
    kv = engine.kv
    recording = kv.record_events(False)  # the warm-up's blocks are no consumer's business
    ids = []
    try:
        for i, (n, m) in enumerate([(prompt, decode), (max(1, prompt // 2), max(1, decode // 2))]):
            tokens = [(1000 + 37 * j + i) % vocab for j in range(n)]
            # Greedy with a fixed seed: draws nothing from the engine's random generator.
            params = SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, seed=0)
            ids.append(
                engine.add_request(None, params, f"kvmesh-warmup-{i}", prompt_token_ids=tokens)
            )
        for _ in range(_MAX_STEPS):
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                if out.finished and out.error is not None:
                    log.warning("warm-up request %s failed: %s", out.request_id, out.error)
    finally:
        for request_id in ids:  # only if a step raised or the step cap was hit
            if request_id in engine.requests:
                engine.abort_request(request_id)
        kv.record_events(recording)
    if kv.num_blocks_free != kv.num_blocks_total:
        raise RuntimeError("the warm-up requests left KV blocks allocated")
    # Forget what the warm-up put in the prefix cache; the free list back in a new pool's
    # order.
    kv.reset_prefix_cache()
    _restore(engine, saved)


def _save(engine: LLMEngine) -> dict:
    owners = {
        "engine": engine,
        "kv": engine.kv,
        "scheduler": engine.scheduler,
        "outputs": engine.output_processor,
    }
    counters = {
        (key, name): getattr(owners[key], name)
        for key, names in _COUNTERS.items()
        for name in names
    }
    rng = {"engine": engine._rng.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"owners": owners, "counters": counters, "rng": rng}


def _restore(engine: LLMEngine, saved: dict) -> None:
    for (key, name), value in saved["counters"].items():
        setattr(saved["owners"][key], name, value)
    rng = saved["rng"]
    engine._rng.set_state(rng["engine"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])
