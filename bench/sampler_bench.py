"""The sampler alone on one decode step's logits (issue #14): 64 rows of a 49,152-token
vocabulary, half greedy and half sampled at temperature 0.8 (with top-p 0.9 in the ``top_p``
case), through the C++ CPU kernels and through the torch twins; plus an all-greedy batch.

    .venv/bin/python bench/sampler_bench.py      # prints JSON: median ms per call

The logits are random (``randn * 3``): flatter than a trained model's, so top-p needs more of
each row here than on real text.
"""

import json
import statistics
import time

import torch

from kvmesh import SamplingParams
from kvmesh.kernels import torch_ops
from kvmesh.replicas import sampler

ROWS, VOCAB = 64, 49152


def rows_for(kind: str) -> list[sampler.SamplingRow]:
    out = []
    for i in range(ROWS):
        kw = {"temperature": 0.0 if i % 2 else 0.8}
        if kind == "top_p" and i % 2 == 0:
            kw["top_p"] = 0.9
        params = SamplingParams(max_tokens=64, ignore_eos=True, seed=i, **kw)
        gen = torch.Generator().manual_seed(i)
        out.append(sampler.SamplingRow(str(i), [1, 2], params, generator=gen))
    return out


def median_ms(fn, n: int = 40) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def main() -> None:
    torch.manual_seed(0)
    logits = torch.randn(ROWS, VOCAB) * 3
    result: dict = {"threads": torch.get_num_threads()}
    for native in (True, False):
        torch_ops.USE_CPU_NATIVE = native
        for kind in ("temperature", "top_p"):
            reqs = rows_for(kind)
            key = f"{'cpp' if native else 'torch'}_{kind}_ms"
            result[key] = median_ms(lambda r=reqs: sampler.sample(logits, r, [2]))
    torch_ops.USE_CPU_NATIVE = True
    greedy = [
        sampler.SamplingRow(str(i), [1, 2], SamplingParams(temperature=0.0, max_tokens=4))
        for i in range(ROWS)
    ]
    result["all_greedy_ms"] = median_ms(lambda: sampler.sample(logits, greedy, [2]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
