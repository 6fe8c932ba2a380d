"""Serving benchmark: kvmesh on Ray Serve with 1 and 2 replicas at several concurrencies.

For each replica count the app is deployed fresh (SmolLM2 by default, torch threads per
replica as ``kvmesh serve`` picks them: the cores split between the replicas), then
``kvmesh bench serve``'s load generator runs each concurrency level and we record TTFT / TPOT
p50 and p99 and throughput, plus the serving layer's own overhead read from the app's
``/metrics``:

- ``ingress_to_engine``: HTTP request reaching the ingress -> the replica handing it to the
  engine (validation, tokenisation, hashing, routing, the handle call);
- ``engine_to_sse``: a token leaving the engine -> its SSE chunk leaving the ingress.

Both are histograms in the ingress; the p50/p99 here are interpolated within buckets (as
Prometheus' ``histogram_quantile`` does) from the difference between scrapes taken before and
after each level. Target: <= 5 ms p50 each.

Run on an idle machine (anything else on the 2 cores inflates every number):

    .venv/bin/python bench/serve_bench.py                  # full: replicas 1,2 x conc 1,8,32
    .venv/bin/python bench/serve_bench.py --smoke          # seconds: a wiring check only

Writes bench/out/serve_bench.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.cluster import loadgen
from kvmesh.cluster.app_config import AppConfig
from kvmesh.cluster.local_ports import free_loopback_port as free_port
from kvmesh.cluster.serve_cmd import engine_threads_per_replica, threads_per_replica
from kvmesh.cluster.serve_env import apply_serve_process_env

OUT = Path(__file__).parent / "out"
OVERHEAD = "kvmesh:serving_overhead_seconds"


def overhead_buckets(url: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of the overhead histogram, per stage (all models summed)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != OVERHEAD:
            continue
        for s in family.samples:
            if s.name.endswith("_bucket"):
                stage = out.setdefault(s.labels["stage"], {})
                le = float(s.labels["le"])
                stage[le] = stage.get(le, 0.0) + s.value
    return out


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus-style quantile from cumulative buckets (linear within a bucket)."""
    edges = sorted(buckets)
    total = buckets[edges[-1]] if edges else 0.0
    if total <= 0:
        return None
    rank, prev_edge, prev_count = q * total, 0.0, 0.0
    for edge in edges:
        count = buckets[edge]
        if count >= rank:
            if edge == float("inf"):
                return prev_edge
            width = count - prev_count
            frac = (rank - prev_count) / width if width else 1.0
            return prev_edge + (edge - prev_edge) * frac
        prev_edge, prev_count = edge, count
    return prev_edge


def overhead_delta(before, after) -> dict[str, dict[str, float | None]]:
    result = {}
    for stage, buckets in after.items():
        base = before.get(stage, {})
        delta = {le: n - base.get(le, 0.0) for le, n in buckets.items()}
        result[stage] = {
            "p50_ms": _ms(histogram_quantile(delta, 0.5)),
            "p99_ms": _ms(histogram_quantile(delta, 0.99)),
            "count": delta.get(float("inf"), 0.0),
        }
    return result


def _ms(v: float | None) -> float | None:
    return None if v is None else v * 1e3


def app_config(
    model: str | None,
    replicas: int,
    port: int,
    cpus: int,
    threads: int | None = None,
    engine: dict[str, Any] | None = None,
) -> AppConfig:
    # As `kvmesh serve` splits the cores (unless --torch-threads fixes the count).
    engine_threads = threads or engine_threads_per_replica(cpus, replicas)
    ray_cpus = threads or threads_per_replica(cpus, replicas)
    return AppConfig.model_validate(
        {
            "name": "kvmesh-bench",
            "port": port,
            "models": [
                {
                    "name": "bench",
                    "engine": {
                        "model": model,
                        "max_model_len": 2048,
                        "max_num_seqs": 64,
                        **(engine or {}),
                    },
                    "replicas": replicas,
                    "num_cpus": float(ray_cpus),
                    "torch_threads": engine_threads,
                    "max_pending_requests": 1024,
                }
            ],
        }
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from kvmesh.cluster.app import build_app
    from kvmesh.cluster.serve_cmd import wait_until_ready

    cpus = os.cpu_count() or 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    apply_serve_process_env()  # as `kvmesh serve` starts its cluster
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs = []
    try:
        for replicas in args.replicas:
            config = app_config(
                args.model, replicas, port, cpus, args.torch_threads, json.loads(args.engine)
            )
            started = time.perf_counter()
            serve.run(build_app(config), name=config.name, route_prefix="/")
            wait_until_ready(url, timeout_s=600)
            print(f"# {replicas} replica(s) ready in {time.perf_counter() - started:.0f}s")
            warm = loadgen.WorkloadSpec(num_requests=2, input_len=16, output_len=4, seed=99)
            loadgen.sweep(url, "bench", warm, concurrencies=[2])  # first-call costs out
            for conc in args.concurrency:
                spec = loadgen.WorkloadSpec(
                    kind=args.workload,
                    num_requests=max(args.num_requests, 2 * conc),
                    input_len=args.input_len,
                    output_len=args.output_len,
                    seed=conc,
                )
                before = overhead_buckets(url)
                (point,) = loadgen.sweep(url, "bench", spec, concurrencies=[conc])
                point["replicas"] = replicas
                point["overhead"] = overhead_delta(before, overhead_buckets(url))
                runs.append(point)
                o = point["overhead"]
                print(
                    f"replicas={replicas} {loadgen.format_point(point)} | overhead p50 "
                    f"in->engine {_fmt(o, 'ingress_to_engine')} ms, "
                    f"engine->sse {_fmt(o, 'engine_to_sse')} ms",
                    flush=True,
                )
            serve.delete(config.name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "model": args.model or "SmolLM2-135M-Instruct (embedded)",
        "cpus": cpus,
        "torch_threads": args.torch_threads or "cores / replicas, at least 1",
        "workload": {
            "kind": args.workload,
            "input_len": args.input_len,
            "output_len": args.output_len,
        },
        "engine": json.loads(args.engine),
        "runs": runs,
    }


def _fmt(overhead: dict, stage: str) -> str:
    v = overhead.get(stage, {}).get("p50_ms")
    return "-" if v is None else f"{v:.2f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"model: {report['model']}, {report['cpus']} CPUs, workload {report['workload']}",
        "",
        "| replicas | conc | req/s | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 "
        "| in→engine p50 | engine→SSE p50 | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        s, o = r["summary"], r["overhead"]

        def ms(metric: str, pct: str, s=s) -> str:
            v = s[metric][pct]
            return "-" if v is None else f"{v:.1f}"

        lines.append(
            f"| {r['replicas']} | {r['load']:g} | {s['request_throughput']:.2f} | "
            f"{s['output_token_throughput']:.1f} | {ms('ttft_ms', 'p50')} | "
            f"{ms('ttft_ms', 'p99')} | {ms('tpot_ms', 'p50')} | {ms('tpot_ms', 'p99')} | "
            f"{_fmt(o, 'ingress_to_engine')} | {_fmt(o, 'engine_to_sse')} | {s['errors']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: embedded SmolLM2)")
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--workload", default="synthetic", choices=["synthetic", "mixed"])
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="per replica (default: as `kvmesh serve`: cores - 1 split between replicas)",
    )
    p.add_argument(
        "--engine",
        default="{}",
        help="JSON engine arguments over the defaults, e.g. "
        "'{\"long_prefill_token_threshold\": 0}'",
    )
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks the wiring")
    p.add_argument("--out", default=str(OUT / "serve_bench"), help="output path stem")
    args = p.parse_args(argv)
    if args.smoke:
        args.concurrency, args.num_requests = "1,4", 4
        args.input_len, args.output_len = 32, 8
        args.out = args.out + "_smoke"
    args.replicas = [int(x) for x in args.replicas.split(",")]
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    report = run(args)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    for replicas in args.replicas:
        points = [r for r in report["runs"] if r["replicas"] == replicas]
        loadgen.plot(points, f"{stem}_r{replicas}.png", "concurrency")
    print(markdown(report))
    print(f"wrote {stem}.json / .md / _r*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
