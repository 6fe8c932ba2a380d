"""``kvmesh bench serve``: streaming load against any OpenAI-compatible server on this machine.

Requests go to ``/v1/completions`` with ``stream: true`` and prompts as token ids, so input
lengths are exact without a client-side tokenizer (vLLM and kvmesh both accept token-id
prompts). ``ignore_eos`` (a vLLM extension kvmesh also accepts) forces output lengths.
Load is either a fixed concurrency (closed loop) or a Poisson arrival rate (open loop: arrivals
do not wait for the server, so queueing shows up in the latencies as it would in production).

Per request we time TTFT (request sent to first streamed token), ITL (between streamed
chunks), TPOT ((e2e - TTFT) / (output tokens - 1)) and e2e; the report gives p50/p90/p99,
request and token throughput, goodput (requests per second that met every SLO) and errors.
Only loopback URLs are accepted: this is a benchmark for the machine it runs on, not a tool
for loading other people's servers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

Workload = Literal["synthetic", "mixed", "shared-prefix"]
TOKEN_RANGE = (1000, 20000)  # ordinary vocabulary ids in any 32k+ tokenizer


def check_loopback(url: str) -> None:
    """Refuse anything but this machine: 127.0.0.0/8, ::1 or localhost."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"the load generator only targets loopback addresses, not {host!r}")


@dataclass
class WorkloadSpec:
    kind: Workload = "synthetic"
    num_requests: int = 32
    input_len: int = 128
    output_len: int = 64
    prefix_len: int = 256
    num_prefixes: int = 4
    seed: int = 0


@dataclass
class RequestSpec:
    prompt_token_ids: list[int]
    max_tokens: int


def make_requests(spec: WorkloadSpec) -> list[RequestSpec]:
    """Prompts as token ids. ``mixed`` draws lengths from U[0.25x, 1.75x] of the given ones;
    ``shared-prefix`` puts one of ``num_prefixes`` shared prefixes before a unique suffix."""
    rng = random.Random(spec.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(*TOKEN_RANGE) for _ in range(max(n, 1))]

    def around(n: int) -> int:
        return max(1, rng.randint(max(1, n // 4), max(1, n * 7 // 4)))

    prefixes = [tokens(spec.prefix_len) for _ in range(spec.num_prefixes)]
    out = []
    for i in range(spec.num_requests):
        if spec.kind == "synthetic":
            out.append(RequestSpec(tokens(spec.input_len), spec.output_len))
        elif spec.kind == "mixed":
            out.append(RequestSpec(tokens(around(spec.input_len)), around(spec.output_len)))
        elif spec.kind == "shared-prefix":
            prefix = prefixes[i % spec.num_prefixes]
            out.append(RequestSpec(prefix + tokens(spec.input_len), spec.output_len))
        else:
            raise ValueError(f"unknown workload {spec.kind!r}")
    return out


@dataclass
class RequestResult:
    ok: bool
    start: float
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    status: int = 0
    error: str | None = None
    cached_tokens: int = 0
    """Prompt tokens the server reports as served from its prefix cache."""
    replica: str | None = None
    """The replica that served it (kvmesh's ``x-kvmesh-replica`` header), if named."""

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def send_one(
    client: httpx.AsyncClient, model: str, req: RequestSpec, ignore_eos: bool
) -> RequestResult:
    body: dict[str, Any] = {
        "model": model,
        "prompt": req.prompt_token_ids,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return await stream_request(client, "/v1/completions", body, len(req.prompt_token_ids))


async def stream_request(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    prompt_tokens: int = 0,
    headers: dict[str, str] | None = None,
) -> RequestResult:
    """POST ``body`` to ``path`` (``/v1/completions`` or ``/v1/chat/completions``) as a
    stream and time it; TTFT is the first chunk that carries text."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start, prompt_tokens=prompt_tokens)
    last = None
    chunks = 0
    try:
        async with client.stream("POST", path, json=body, headers=headers) as resp:
            result.status = resp.status_code
            result.replica = resp.headers.get("x-kvmesh-replica")
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload.strip() == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data:
                    result.error = f"stream error: {data['error'].get('message')}"
                    return result
                now = time.perf_counter()
                if data.get("choices") and _chunk_text(data["choices"][0]):
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                if usage := data.get("usage"):
                    result.prompt_tokens = usage["prompt_tokens"]
                    result.output_tokens = usage["completion_tokens"]
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = details.get("cached_tokens") or 0
        result.e2e = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = result.ttft is not None or result.output_tokens == 0
        if not result.ok:
            result.error = "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _chunk_text(choice: dict[str, Any]) -> str:
    """A streamed choice's text: ``text`` (completions) or ``delta.content`` (chat)."""
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def run_load(
    url: str,
    model: str,
    requests: list[RequestSpec],
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    api_key: str | None = None,
    ignore_eos: bool = True,
    timeout_s: float = 600.0,
    seed: int = 0,
) -> tuple[list[RequestResult], float]:
    """Send every request; return results and the wall time the run took."""
    check_loopback(url)
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency or rate")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = concurrency or len(requests)
    limits = httpx.Limits(max_connections=limit + 4, max_keepalive_connections=limit + 4)
    rng = random.Random(seed)
    sem = asyncio.Semaphore(limit)
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"), headers=headers, timeout=timeout_s, limits=limits
    ) as client:

        async def go(req: RequestSpec) -> RequestResult:
            async with sem:
                return await send_one(client, model, req, ignore_eos)

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.ensure_future(go(req)))
            if rate is not None:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 and mean in milliseconds (nearest-rank percentiles)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1e3

    return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "mean": statistics.fmean(ordered) * 1e3}


def summarize(
    results: list[RequestResult],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]

    def meets_slo(r: RequestResult) -> bool:
        if slo_ttft_ms is not None and (r.ttft is None or r.ttft * 1e3 > slo_ttft_ms):
            return False
        tpot = r.tpot
        return slo_tpot_ms is None or tpot is None or tpot * 1e3 <= slo_tpot_ms

    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = [r for r in ok if meets_slo(r)]
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_examples": sorted({r.error or "?" for r in errors})[:5],
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_token_throughput": out_tokens / duration_s if duration_s else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s else 0.0,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": percentiles([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": percentiles([x for r in ok for x in r.itl]),
        "e2e_ms": percentiles([r.e2e for r in ok if r.e2e is not None]),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "goodput": len(good) / duration_s if duration_s else 0.0,
        "slo_attainment": len(good) / len(results) if results else 0.0,
    }


def plot(points: list[dict[str, Any]], path: str | Path, x_label: str) -> None:
    """Latency percentiles against offered load (one point per load level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["load"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric, title in zip(
        axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("TTFT", "TPOT", "end-to-end"), strict=True
    ):
        for pct, style in (("p50", "o-"), ("p99", "s--")):
            ys = [p["summary"][metric][pct] for p in points]
            ax.plot(xs, [math.nan if y is None else y for y in ys], style, label=pct)
        ax.set_title(f"{title} latency")
        ax.set_xlabel(x_label)
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(
    url: str,
    model: str,
    spec: WorkloadSpec,
    *,
    concurrencies: list[int] | None = None,
    rates: list[float] | None = None,
    api_key: str | None = None,
    ignore_eos: bool = True,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    timeout_s: float = 600.0,
) -> list[dict[str, Any]]:
    """Run the workload once per load level; one summary per level."""
    levels: list[tuple[str, float]] = [("concurrency", c) for c in concurrencies or []]
    levels += [("rate", r) for r in rates or []]
    if not levels:
        raise ValueError("give at least one concurrency or rate")
    points = []
    for kind, level in levels:
        requests = make_requests(spec)
        results, duration = asyncio.run(
            run_load(
                url,
                model,
                requests,
                api_key=api_key,
                ignore_eos=ignore_eos,
                timeout_s=timeout_s,
                seed=spec.seed,
                concurrency=int(level) if kind == "concurrency" else None,
                rate=level if kind == "rate" else None,
            )
        )
        points.append(
            {
                "load_kind": kind,
                "load": level,
                "workload": asdict(spec),
                "summary": summarize(results, duration, slo_ttft_ms, slo_tpot_ms),
            }
        )
    return points


def format_point(p: dict[str, Any]) -> str:
    s = p["summary"]

    def ms(metric: str, pct: str) -> str:
        v = s[metric][pct]
        return "-" if v is None else f"{v:.1f}"

    return (
        f"{p['load_kind']}={p['load']:g}: {s['completed']}/{s['requests']} ok, "
        f"{s['errors']} errors | TTFT p50 {ms('ttft_ms', 'p50')} p99 {ms('ttft_ms', 'p99')} ms | "
        f"TPOT p50 {ms('tpot_ms', 'p50')} p99 {ms('tpot_ms', 'p99')} ms | "
        f"e2e p50 {ms('e2e_ms', 'p50')} ms | {s['request_throughput']:.2f} req/s, "
        f"{s['output_token_throughput']:.1f} out tok/s, goodput {s['goodput']:.2f} req/s"
    )
