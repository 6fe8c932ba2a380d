"""Engine overhead: step time minus the model forward, at 64 running sequences (issue #14).

``python bench/engine_overhead.py [--greedy] [--top-p P]``: the embedded SmolLM2 in float32, 64
requests of 64-token prompts decoding 64 tokens each (half sampled at temperature 0.8, with
top-p ``P`` if given, unless ``--greedy``); prints the median step, forward and overhead over
the steps that decode all 64.
"""

import json
import statistics
import sys
import time

import torch

from kvmesh import SamplingParams
from kvmesh.replicas.llm_engine import LLMEngine

GREEDY = "--greedy" in sys.argv
TOP_P = float(sys.argv[sys.argv.index("--top-p") + 1]) if "--top-p" in sys.argv else 1.0
eng = LLMEngine(model=None, dtype="float32", max_num_seqs=128)
fwd = []
orig = eng.runner.forward


def timed(inputs):
    t = time.perf_counter()
    out = orig(inputs)
    fwd.append(time.perf_counter() - t)
    return out


eng.runner.forward = timed
for i in range(64):
    eng.add_request(
        None,
        SamplingParams(
            max_tokens=64,
            ignore_eos=True,
            temperature=0.0 if (i % 2 or GREEDY) else 0.8,
            top_p=TOP_P,
            seed=i,
        ),
        prompt_token_ids=list(range(10 + i, 74 + i)),
    )
steps = []
while eng.has_unfinished_requests():
    t = time.perf_counter()
    eng.step()
    dt = time.perf_counter() - t
    if eng.last_step_decodes == 64 and eng.last_step_prefill_tokens == 0:
        steps.append((dt, fwd[-1]))
over = [s - f for s, f in steps]
print(
    json.dumps(
        dict(
            decode_steps_at_64=len(steps),
            step_ms_p50=round(statistics.median(s for s, _ in steps) * 1e3, 2),
            forward_ms_p50=round(statistics.median(f for _, f in steps) * 1e3, 2),
            overhead_ms_p50=round(statistics.median(over) * 1e3, 2),
            overhead_ms_p90=round(sorted(over)[int(0.9 * len(over))] * 1e3, 2),
            threads=torch.get_num_threads(),
            greedy=GREEDY,
            top_p=TOP_P,
        )
    )
)
