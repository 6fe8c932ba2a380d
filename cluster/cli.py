"""The ``kvmesh`` command line."""

from __future__ import annotations

import argparse
import sys


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model directory or .gguf file (default: embedded SmolLM2)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")


def _params(args: argparse.Namespace):
    from kvmesh import SamplingParams

    return SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    from kvmesh import LLM

    llm = LLM(args.model)
    out = llm.generate(args.prompt, _params(args))[0]
    print(out.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from kvmesh import LLM

    llm = LLM(args.model)
    params = _params(args)
    if args.message is not None:
        print(llm.chat([{"role": "user", "content": args.message}], params)[0].outputs[0].text)
        return 0
    history: list[dict[str, str]] = []
    print("kvmesh chat — empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = llm.chat(history, params)[0].outputs[0].text
        history.append({"role": "assistant", "content": reply})
        print(reply)
    return 0


def _add_app_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="app config YAML (see configs/)")
    p.add_argument(
        "--model", default=None, help="local model directory or .gguf (default: embedded SmolLM2)"
    )
    p.add_argument("--replicas", type=int, default=None, help="replicas per model")
    p.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=None,
        help="ranks per replica, each in the replica's own placement group (one CPU or GPU each)",
    )
    p.add_argument(
        "--router",
        default=None,
        help="request router of every model: power_of_two (Serve's), prefix_aware (kvmesh's "
        "cache- and load-aware), round_robin, or module:Class",
    )


def _app_config(args: argparse.Namespace, split_local_cores: bool = True):
    from kvmesh.cluster.serve_cmd import config_from_args

    return config_from_args(
        args.config,
        args.model,
        args.replicas,
        args.host,
        args.port,
        tensor_parallel_size=args.tensor_parallel_size,
        router=args.router,
        split_local_cores=split_local_cores,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from kvmesh.cluster.serve_cmd import run_serve

    return run_serve(_app_config(args))


def cmd_build_config(args: argparse.Namespace) -> int:
    from kvmesh.cluster.serve_cmd import check_serve_config, write_serve_config

    if args.check is not None:
        import yaml

        with open(args.check) as f:
            data = yaml.safe_load(f) or {}
        problems = check_serve_config(data)
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{args.check}: {'invalid' if problems else 'ok'}")
        return 1 if problems else 0
    text = write_serve_config(_app_config(args), args.output)
    if args.output is None:
        print(text, end="")
    else:
        print(f"wrote {args.output}; deploy with: serve deploy {args.output}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    import yaml

    from kvmesh.cluster import deploy
    from kvmesh.cluster.serve_cmd import serve_config

    if args.serve_config is not None:
        with open(args.serve_config) as f:
            data = yaml.safe_load(f) or {}
    else:
        if args.host is None:
            args.host = "0.0.0.0"  # a cluster serves its network, not only its head's loopback
        data = serve_config(_app_config(args, split_local_cores=False))
    url = deploy.deploy(data, args.address, url=args.url, timeout_s=args.timeout)
    print(f"kvmesh is serving at {url}  (OpenAI API under {url}/v1); remove with: kvmesh down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from kvmesh.cluster import deploy

    deploy.down(set(args.app or ["kvmesh"]), args.address, timeout_s=args.timeout)
    return 0


def _add_deploy_parsers(sub) -> None:
    address_help = (
        "the Ray dashboard's HTTP address (default: $RAY_ADDRESS, $RAY_DASHBOARD_ADDRESS, "
        "http://127.0.0.1:8265)"
    )
    p = sub.add_parser(
        "deploy", help="deploy the app on a running Ray cluster and wait until it answers"
    )
    _add_app_options(p)
    p.add_argument(
        "--serve-config",
        default=None,
        metavar="FILE",
        help="deploy this Serve config file as is (e.g. from build-config or a RayService)",
    )
    p.add_argument("--address", default=None, help=address_help)
    p.add_argument("--url", default=None, help="where to check /ready (default: head, port)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for ready")
    p.set_defaults(func=cmd_deploy)
    p = sub.add_parser("down", help="remove the app from the Ray cluster (others stay)")
    p.add_argument("--app", action="append", default=None, help="application (default kvmesh)")
    p.add_argument("--address", default=None, help=address_help)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    p.set_defaults(func=cmd_down)


def cmd_status(args: argparse.Namespace) -> int:
    import json
    import os

    from kvmesh.cluster import status

    models = status.collect(
        args.url,
        api_key=args.api_key or os.environ.get("KVMESH_API_KEY"),
        ray_address=args.ray_address or status.default_ray_address(),
        app=args.app,
    )
    print(json.dumps(status.as_json(models), indent=2) if args.json else status.render(models))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from kvmesh.replicas import capacity

    shape = capacity.shape_for(args.model, args.shape)
    fraction = args.gpu_memory_utilization
    overhead = args.runtime_overhead_gib
    p = capacity.plan(
        shape,
        gpu_memory_bytes=int(args.gpu_memory_gib * capacity.GiB),
        kv_fraction_of_free=capacity.KV_FREE_MEMORY_FRACTION if fraction is None else fraction,
        tp=args.tensor_parallel_size,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size,
        request_len=args.request_len,
        gpus_per_node=args.gpus_per_node,
        runtime_overhead_bytes=capacity.DEFAULT_RUNTIME_OVERHEAD_BYTES
        if overhead is None
        else int(overhead * capacity.GiB),
    )
    print(json.dumps(p.as_json(), indent=2) if args.json else capacity.render(p))
    return 0 if p.fits else 1


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import json

    from kvmesh.cluster import loadgen

    def numbers(text: str | None, kind):
        return [kind(x) for x in text.split(",")] if text else None

    spec = loadgen.WorkloadSpec(
        kind=args.workload,
        num_requests=args.num_requests,
        input_len=args.input_len,
        output_len=args.output_len,
        prefix_len=args.prefix_len,
        num_prefixes=args.num_prefixes,
        seed=args.seed,
    )
    concurrencies = numbers(args.concurrency, int)
    rates = numbers(args.rate, float)
    if not concurrencies and not rates:
        concurrencies = [1]
    points = loadgen.sweep(
        args.url,
        args.model,
        spec,
        concurrencies=concurrencies,
        rates=rates,
        api_key=args.api_key,
        ignore_eos=not args.no_ignore_eos,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
    )
    for point in points:
        print(loadgen.format_point(point))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"url": args.url, "model": args.model, "points": points}, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        loadgen.plot(points, args.plot, "concurrency" if concurrencies else "requests/s")
        print(f"wrote {args.plot}")
    return 1 if any(p["summary"]["errors"] for p in points) else 0


def _add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = bsub.add_parser(
        "serve", help="streaming load against an OpenAI-compatible server on this machine"
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback)")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="the `model` to request")
    p.add_argument("--api-key", default=None)
    load = p.add_argument_group("load (one or the other; comma-separated lists sweep)")
    load.add_argument("--concurrency", default=None, help="e.g. 1,8,32 (closed loop)")
    load.add_argument("--rate", default=None, help="requests/s, Poisson arrivals (open loop)")
    wl = p.add_argument_group("workload")
    wl.add_argument(
        "--workload", choices=["synthetic", "mixed", "shared-prefix"], default="synthetic"
    )
    wl.add_argument("--num-requests", type=int, default=32)
    wl.add_argument("--input-len", type=int, default=128, help="prompt tokens (mean if mixed)")
    wl.add_argument("--output-len", type=int, default=64, help="output tokens (mean if mixed)")
    wl.add_argument("--prefix-len", type=int, default=256, help="shared-prefix tokens")
    wl.add_argument("--num-prefixes", type=int, default=4, help="distinct shared prefixes")
    wl.add_argument("--seed", type=int, default=0)
    wl.add_argument(
        "--no-ignore-eos", action="store_true", help="do not send ignore_eos (strict servers)"
    )
    out = p.add_argument_group("report")
    out.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT limit")
    out.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT limit")
    out.add_argument("--json", default=None, help="write the report here")
    out.add_argument("--plot", default=None, help="write a PNG of latency against load here")
    p.set_defaults(func=cmd_bench_serve)


def _add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="weights and KV cache per GPU: tokens and requests that fit, replicas per node",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--model", default=None, help="model directory, config.json or .gguf (default: SmolLM2)"
    )
    which.add_argument(
        "--shape", default=None, help="a named shape: smollm2-135m, llama-3-8b, llama-3-70b"
    )
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="share of the memory left after the weights that the KV cache takes, the rest "
        "being the activation reserve (default: the engine's, 0.85)",
    )
    p.add_argument(
        "--runtime-overhead-gib",
        type=float,
        default=None,
        help="memory in use besides the weights when the engine measures: CUDA context, "
        "RoPE table, workspaces (default 0.5)",
    )
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "int8"], default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--request-len",
        "--max-model-len",
        dest="request_len",
        type=int,
        default=None,
        help="tokens per request for the concurrency estimate (default: the model's context)",
    )
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmesh",
        description=(
            "kvmesh: an LLM serving cluster on Ray Serve. Run a model offline "
            "(generate, chat) or serve it over an OpenAI-compatible HTTP API."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("generate", help="complete a raw prompt and print the completion")
    p.add_argument("prompt", help="the text to continue")
    _add_engine_options(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="answer one message (or chat interactively without one)")
    p.add_argument("message", nargs="?", default=None, help="the user message")
    _add_engine_options(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API (Ray Serve)")
    _add_app_options(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("build-config", help="write the Ray Serve config for `serve deploy`")
    _add_app_options(p)
    p.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")
    p.add_argument("--check", default=None, metavar="FILE", help="only check a Serve config")
    p.set_defaults(func=cmd_build_config)
    p = sub.add_parser(
        "status", help="each model's replicas, queue, KV use and autoscaler decision"
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the app's URL")
    p.add_argument("--api-key", default=None, help="API key (default: $KVMESH_API_KEY)")
    p.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster, for starting/stopping replica counts (default: $RAY_ADDRESS)",
    )
    p.add_argument("--app", default="kvmesh", help="Serve application name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)
    _add_deploy_parsers(sub)
    _add_plan_parser(sub)
    _add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"kvmesh: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:  # a deploy that failed or never got ready
        print(f"kvmesh: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
