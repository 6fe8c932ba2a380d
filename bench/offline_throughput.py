"""Offline throughput on SmolLM2 (float32): kvmesh vs transformers vs vLLM's CPU build.

    .venv/bin/python bench/offline_throughput.py [--vllm-python /path/to/vllm-venv/bin/python]
    .venv/bin/python bench/offline_throughput.py \
        --engines kvmesh,kvmesh-unpacked,kvmesh@bfloat16,vllm-bound,vllm-bound@bfloat16
    .venv/bin/python bench/offline_throughput.py --workload shared-prefix \
        --engines kvmesh,vllm-bound

An engine name may carry ``@dtype`` (float32 by default): each engine at its best dtype for
this CPU is then compared as well as both in float32. ``kvmesh-unpacked`` is kvmesh with
``KVMESH_CPU_PACKED_LINEAR=0`` (plain ``F.linear``), for the A/B of the packed CPU linears.

Workloads (``bench/workloads.py``'s ``offline_workload``): ``mixed`` (default), 64 requests,
prompts U[32, 512] tokens, outputs U[32, 256]; ``shared-prefix``, 8 groups of 8 requests on
a 448-token prefix each plus 32 tokens of their own, 64 outputs, with prefix caching on in
every engine (off for ``mixed``). Outputs forced with ignore_eos, greedy. Every engine runs in
its own subprocess on the same workload, one after the other, so they never share the two
cores. Prints one JSON document with each engine's tokens/s and the ratios against kvmesh.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serving_harness import vllm_scratch_env
from workloads import offline_workload


def workload(args):
    return offline_workload(args.workload, args.num_requests, args.seed)


def run_kvmesh(args) -> dict:
    from kvmesh import LLM, SamplingParams
    from kvmesh.replicas.model_files import resolve_model_dir

    reqs = workload(args)
    t0 = time.perf_counter()
    llm = LLM(
        str(resolve_model_dir(None)),
        max_num_seqs=args.num_requests,
        dtype=args.dtype,
        enable_prefix_caching=args.workload == "shared-prefix",
    )
    load_s = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    outs = llm.generate(
        [{"prompt_token_ids": p} for p, _ in reqs],
        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in reqs],
    )
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {
        "elapsed_s": elapsed,
        "output_tokens": out_tokens,
        "load_s": load_s,
        "steps": llm.stats()["num_steps"],
        # while generating: memory faulted in afresh, and the kernel time that cost
        "minor_page_faults": after.ru_minflt - usage.ru_minflt,
        "system_s": round(after.ru_stime - usage.ru_stime, 2),
    }


def run_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from kvmesh.replicas.model_files import resolve_model_dir

    torch.set_num_threads(2)
    reqs = workload(args)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(None), dtype=torch.float32)
    model.eval().generation_config.eos_token_id = None
    start = time.perf_counter()
    out_tokens = 0
    bs = args.hf_batch
    for i in range(0, len(reqs), bs):
        batch = reqs[i : i + bs]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, _) in enumerate(batch):  # left padding
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max(n for _, n in batch),
                do_sample=False,
                pad_token_id=0,
            )
        out_tokens += sum(n for _, n in batch)  # each request's own tokens only
    return {"elapsed_s": time.perf_counter() - start, "output_tokens": out_tokens, "batch_size": bs}


VLLM_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
from workloads import offline_workload
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
reqs = offline_workload({workload!r}, {n}, {seed})
llm = LLM(model={model!r}, dtype={dtype!r}, enable_prefix_caching={caching}, seed=0)
start = time.perf_counter()
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in reqs],
                    [SamplingParams(max_tokens=k, ignore_eos=True, temperature=0) for _, k in reqs])
elapsed = time.perf_counter() - start
print("RESULT " + json.dumps({{"elapsed_s": elapsed,
      "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}}))
"""


def run_vllm(args, bind_both_cores: bool, dtype: str = "float32") -> dict:
    from kvmesh.replicas.model_files import resolve_model_dir

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMESH")}
    env.update(vllm_scratch_env(scratch))
    env.update(VLLM_NO_USAGE_STATS="1", VLLM_CPU_KVCACHE_SPACE="2")
    if bind_both_cores:
        env.update(VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_OMP_THREADS_BIND="0-1")
    code = VLLM_SCRIPT.format(
        bench=str(Path(__file__).parent),
        workload=args.workload,
        caching=args.workload == "shared-prefix",
        n=args.num_requests,
        seed=args.seed,
        model=str(resolve_model_dir(None)),
        dtype=dtype,
    )
    # cwd outside the repository: its top-level folders (kernels/, router/...) would shadow
    # same-named packages that vLLM's dependencies import (transformers imports `kernels`).
    proc = subprocess.run(
        [args.vllm_python, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=scratch,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]) | {"both_cores_bound": bind_both_cores}
    return {"error": (proc.stderr or proc.stdout)[-2000:], "both_cores_bound": bind_both_cores}


def summarize(name: str, r: dict, total_prompt: int) -> dict:
    if "error" in r:
        return {"engine": name, **r}
    total = total_prompt + r["output_tokens"]
    return {
        "engine": name,
        **r,
        "output_tok_s": r["output_tokens"] / r["elapsed_s"],
        "total_tok_s": total / r["elapsed_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workload", choices=["mixed", "shared-prefix"], default="mixed")
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--engines", default="kvmesh,hf,vllm,vllm-bound")
    ap.add_argument("--vllm-python", default="/work/peers/vllm-venv/bin/python")
    ap.add_argument("--scratch", default="/tmp/kvmesh-bench-vllm")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = {"kvmesh": run_kvmesh, "hf": run_hf}[args.worker](args)
        print("RESULT " + json.dumps(result))
        return
    total_prompt = sum(len(p) for p, _ in workload(args))
    results = []
    for name in args.engines.split(","):
        engine, _, dtype = name.partition("@")
        dtype = dtype or "float32"
        if engine.startswith("vllm"):
            r = run_vllm(args, bind_both_cores=engine == "vllm-bound", dtype=dtype)
        else:
            worker, env = engine, dict(os.environ)
            if engine == "kvmesh-unpacked":
                worker, env["KVMESH_CPU_PACKED_LINEAR"] = "kvmesh", "0"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                worker,
                "--workload",
                args.workload,
                "--dtype",
                dtype,
                "--num-requests",
                str(args.num_requests),
                "--seed",
                str(args.seed),
                "--hf-batch",
                str(args.hf_batch),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            r = json.loads(line[7:]) if line else {"error": proc.stderr[-2000:]}
        results.append(summarize(name, r, total_prompt))
        print(json.dumps(results[-1]), file=sys.stderr)
    done = [r for r in results if "total_tok_s" in r]

    def is_ours(r: dict) -> bool:  # kvmesh as it ships, at any dtype
        return r["engine"].partition("@")[0] == "kvmesh"

    ratios = {
        f"{a['engine']} / {b['engine']}": round(a["total_tok_s"] / b["total_tok_s"], 3)
        for a in done
        if is_ours(a)
        for b in done
        if not is_ours(b)
    }
    ours = next((r for r in results if r["engine"] == "kvmesh" and "total_tok_s" in r), None)
    if ours:
        for r in results:
            if "total_tok_s" in r:
                r["kvmesh_speedup_total"] = ours["total_tok_s"] / r["total_tok_s"]
                r["kvmesh_speedup_output"] = ours["output_tok_s"] / r["output_tok_s"]
        ours["fraction_of_550_tok_s_ceiling"] = ours["total_tok_s"] / 550
    print(
        json.dumps(
            {
                "workload": {
                    "name": args.workload,
                    "num_requests": args.num_requests,
                    "prompt_tokens": total_prompt,
                    "seed": args.seed,
                },
                "results": results,
                "total_tok_s_ratios": ratios,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
