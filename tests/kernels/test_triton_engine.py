"""The whole engine on the Triton kernels (interpreted) gives the torch path's greedy tokens.

The backend is fixed when ``kvmesh.kernels`` is imported, so each side runs in a subprocess
with ``KVMESH_KERNELS`` set. The settings force every attention path the kernels have: chunked
prefill (extend over a cached prefix), mixed prefill+decode batches, pure decode batches, and
prefix-cache hits from a second ``generate`` call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_RUN = r"""
import json, sys
from kvmesh import LLM, SamplingParams
from kvmesh.kernels import kernel_backend
jobs = json.loads(sys.argv[1])
outs = []
for job in jobs:
    llm = LLM(job["model"], **job["engine"])
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True)
    per_job = []
    for batch in job["batches"]:
        results = llm.generate([{"prompt_token_ids": ids} for ids in batch], params)
        per_job.append([r.outputs[0].token_ids for r in results])
    outs.append(per_job)
    del llm
print(json.dumps({"backend": kernel_backend(), "tokens": outs}))
"""

# Two prompts whose lengths are not multiples of the block size, then a third that shares the
# first one's prefix (a prefix-cache hit: its prefill extends a cached context).
PROMPT_A = [5, 17, 99, 3, 250, 8, 41, 77, 12, 190, 64, 33, 7]
PROMPT_B = [101, 9, 23, 45, 67, 89, 111, 133, 155, 177, 199, 221, 243, 265, 287, 2, 4, 6, 8, 10]
BATCHES = [[PROMPT_A, PROMPT_B], [[*PROMPT_A, 31, 62, 93, 124, 155]]]
ENGINE = dict(block_size=8, max_num_batched_tokens=16, enable_prefix_caching=True, dtype="float32")
MAX_TOKENS = 6


def _generate(backend: str, jobs: list[dict]) -> list:
    """Run every job in one subprocess on ``backend``; one process start is most of the cost."""
    env = {**os.environ, "KVMESH_KERNELS": backend}
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
        env["KVMESH_TRITON_POISON"] = "1"  # an unwritten output is NaN: garbage tokens
    else:
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, json.dumps(jobs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    return result["tokens"]


@pytest.mark.slow
def test_triton_engine_matches_torch_greedy(make_tiny_model):
    jobs = [
        # Llama, GQA 2, head dim 16.
        dict(model=str(make_tiny_model("llama", num_hidden_layers=1)), engine=ENGINE),
        # Mistral with a sliding window shorter than the prompts, over an int8 KV cache.
        dict(
            model=str(make_tiny_model("mistral", num_hidden_layers=1, sliding_window=6)),
            engine={**ENGINE, "kv_cache_dtype": "int8"},
        ),
    ]
    jobs = [{**job, "max_tokens": MAX_TOKENS, "batches": BATCHES} for job in jobs]
    want = _generate("torch", jobs)
    got = _generate("triton", jobs)
    for job, w, g in zip(jobs, want, got, strict=True):
        assert g == w, f"{job['model']} {job['engine']}: triton {g} != torch {w}"
    assert all(len(ids) == MAX_TOKENS for per_job in got for batch in per_job for ids in batch)
    # The outputs are not degenerate (a constant would agree trivially).
    assert len({tuple(ids) for per_job in got for batch in per_job for ids in batch}) > 2
