"""What a user of the server sees: ``kvmesh serve`` with its defaults vs vLLM's OpenAI server.

    .venv/bin/python bench/serve_vs_vllm.py [--vllm-python /work/peers/vllm-venv/bin/python]
    .venv/bin/python bench/serve_vs_vllm.py --servers kvmesh,kvmesh:float32:2,vllm
    .venv/bin/python bench/serve_vs_vllm.py --servers kvmesh,vllm:bfloat16,kvmesh:float32:1,vllm

Each server runs alone, one after the other (they would share the two cores): kvmesh as
``kvmesh serve --replicas 1`` with nothing else set (``kvmesh``), or with a config that sets
the dtype and engine threads (``kvmesh:<dtype>:<threads>``, to find the best split; a
``:<burst threads>[:<min tokens>]`` suffix runs steps of that many tokens on more threads); vLLM's
CPU build on the same model in float32 (``vllm``) or bfloat16 (``vllm:bfloat16``: on CPUs
with AMX-BF16 or AVX512-BF16 kvmesh's default dtype is bfloat16 too), with both cores bound
to it (``VLLM_CPU_OMP_THREADS_BIND=0-<n-1>``, no reserved core).
The load is ``kvmesh bench serve``'s generator (``cluster/loadgen.py``): streamed completions of
``--input-len`` random token ids, ``--output-len`` tokens forced with ``ignore_eos``, at each
concurrency in ``--concurrency`` (default 1 and 16), after two warm-up requests.

Prints one JSON document: per server and concurrency, TTFT / TPOT p50 and p99 and output
tokens/s, and each kvmesh server's ratios to vLLM (TTFT, TPOT: lower is better; throughput: higher).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import serving_harness as h

from kvmesh.cluster import loadgen
from kvmesh.kernels.cpu_native import cpu_flags


def kvmesh_config(workdir: Path, spec: str) -> Path:
    """The config for ``kvmesh:<dtype>:<threads>[:<burst threads>[:<burst min tokens>]]``."""
    dtype, threads, *burst = spec.split(":")[1:]
    path = workdir / f"{spec.replace(':', '_')}.yaml"
    text = (
        "models:\n"
        f"  - name: {h.KVMESH_MODEL}\n"
        f"    engine: {{dtype: {dtype}}}\n"
        "    replicas: 1\n"
        f"    num_cpus: {threads}\n"
        f"    torch_threads: {threads}\n"
    )
    if burst:
        text += f"    torch_threads_burst: {burst[0]}\n"
    if len(burst) > 1:
        text += f"    burst_min_tokens: {burst[1]}\n"
    path.write_text(text)
    return path


def run_server(server: h.Server, args: argparse.Namespace) -> list[dict[str, Any]]:
    points = []
    with server:
        warm = loadgen.WorkloadSpec(num_requests=2, input_len=16, output_len=4, seed=99)
        loadgen.sweep(server.url, h.KVMESH_MODEL, warm, concurrencies=[2])
        for conc in args.concurrency:
            spec = loadgen.WorkloadSpec(
                num_requests=max(args.num_requests, 2 * conc),
                input_len=args.input_len,
                output_len=args.output_len,
                seed=conc,
            )
            (point,) = loadgen.sweep(server.url, h.KVMESH_MODEL, spec, concurrencies=[conc])
            s = point["summary"]
            points.append(
                {
                    "concurrency": conc,
                    "completed": s["completed"],
                    "errors": s["errors"],
                    "ttft_ms": s["ttft_ms"],
                    "tpot_ms": s["tpot_ms"],
                    "output_tok_s": s["output_token_throughput"],
                }
            )
            print(f"{server.name} {loadgen.format_point(point)}", file=sys.stderr, flush=True)
    return points


def ratios(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for a, b in zip(ours, theirs, strict=True):

        def ratio(x, y):
            return round(x / y, 3) if x and y else None

        out[f"concurrency {a['concurrency']}"] = {
            "ttft_p50": ratio(a["ttft_ms"]["p50"], b["ttft_ms"]["p50"]),
            "tpot_p50": ratio(a["tpot_ms"]["p50"], b["tpot_ms"]["p50"]),
            "output_tok_s": ratio(a["output_tok_s"], b["output_tok_s"]),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vllm-python", default="/work/peers/vllm-venv/bin/python")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--servers", default="kvmesh,vllm")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    h.install_interrupt_handlers()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvmesh-serve-vs-vllm-"))
    cores = os.cpu_count() or 2
    results: dict[str, Any] = {}
    for name in args.servers.split(","):
        port = h.free_port()
        if name == "kvmesh":
            server = h.kvmesh_server(port, workdir, replicas=1)
        elif name.startswith("kvmesh:"):
            config = kvmesh_config(workdir, name)
            server = h.kvmesh_server(port, workdir, replicas=None, config=config)
        elif name in ("vllm", "vllm:float32", "vllm:bfloat16"):
            dtype = name.partition(":")[2] or "float32"
            server = h.vllm_server(
                args.vllm_python, h.kvmesh_model_dir(), port, workdir, h.KVMESH_MODEL, dtype
            )
            assert server.env is not None
            server.env.update(
                VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 1}"
            )
        else:
            raise SystemExit(f"unknown server {name!r}: kvmesh[:...] or vllm[:float32|bfloat16]")
        started = time.perf_counter()
        try:
            results[name] = run_server(server, args)
        except (h.ServerFailed, RuntimeError) as exc:
            results[name] = {"error": str(exc)[-2000:], "log": server.log_tail()}
        print(f"# {name} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu_flags": [f for f in cpu_flags().split() if f.startswith(("avx", "amx"))],
        "workload": {
            "input_len": args.input_len,
            "output_len": args.output_len,
            "num_requests": args.num_requests,
        },
        "results": results,
    }
    for peer in ("vllm", "vllm:bfloat16"):
        theirs = results.get(peer)
        if isinstance(theirs, list):
            report[f"over_{peer.replace(':', '_')}"] = {
                name: ratios(ours, theirs)
                for name, ours in results.items()
                if name.startswith("kvmesh") and isinstance(ours, list)
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
