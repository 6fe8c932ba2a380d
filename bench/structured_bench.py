"""Structured output under load: kvmesh vs vLLM's CPU build, same workload, same run.

    flock /tmp/kvmesh-bench.lock .venv/bin/python bench/structured_bench.py > out.json

Per engine (each in its own subprocess, one after the other, never both at once), after a
warm-up (short requests, one constrained by the run's schema: B measures decoding, not the
one compile), ``--requests`` chat requests (SmolLM2's chat template, greedy, prefix caching
off) asking for the JSON record of an order, each with its own subject:

* run B: the even-indexed half constrained by a mid-sized schema (``ORDER_SCHEMA``: a nested
  object, an array of objects, two enums, patterns, a nullable string; or ``--schema-name``
  from ``--schemas``): such a request ends when its JSON is complete (or at
  ``--constrained-max-tokens``). The odd half: unconstrained, ``--max-tokens`` forced with
  ``ignore_eos``.
* run A: nothing constrained; the odd half as in B, the even half forced (``ignore_eos``) to
  the token counts the same requests produced in B, so both runs do the same work and the
  batch shrinks the same way (``--no-match-lengths``: ``--max-tokens`` for all).

Runs go B, A, then A, B, B, A, ... (``--repeats`` pairs, alternating so that neither run
always goes first; several pairs give the A-vs-A noise; ratios use medians, and are also
given per pair and over the clean pairs: those during which the rest of the machine used
at most 0.1 core; other people's tests share these two cores, and a 2-thread OpenMP
decode slows several-fold when one of its threads is descheduled). Reported per run:
output tokens/s (wall), TPOT mean/p50 of each half ((last - first token) / (n - 1); vLLM's
from ``RequestOutput.metrics`` with log stats on), mean output tokens, finish reasons, the
fraction of constrained outputs that parse and validate (jsonschema, formats checked), and
how many cores the run had (its own CPU time and everyone else's, from /proc). Ratios B / A
per engine, and kvmesh / vLLM. Each engine writes constrained JSON its own way (vLLM's
xgrammar allows free whitespace, kvmesh fixes one layout), so their constrained halves
differ in length: each engine's A matches its own B.

Grammar compile time over every schema of ``--schemas``: kvmesh, straight on the engine's
compiler, cold (its cache cleared before each) and warm (the same spec again) p50/p99.
vLLM has no offline API to compile alone: its proxy is the wall time of a 1-token
constrained request with a schema new to its cache (cold) and again (warm), less that of a
1-token unconstrained request.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
DEFAULT_SCHEMAS = REPO / "tests/data/structured/schemas.json"
DEFAULT_MODEL = "/root/.cache/kvmesh/models/SmolLM2-135M-Instruct-5a916f6af553"
VLLM_PYTHON = "/work/peers/vllm-venv/bin/python"

SYSTEM = "You are a helpful assistant that answers with JSON only."
CUSTOMERS = [
    "Alice Martin",
    "Bob Chen",
    "Carla Rossi",
    "Dmitri Ivanov",
    "Emma Schmidt",
    "Farid Haddad",
    "Grace Okafor",
    "Hiro Tanaka",
]
GOODS = [
    "two coffee mugs and a kettle",
    "a laptop stand",
    "three packs of printer paper",
    "a pair of running shoes and socks",
    "a box of tea and honey",
    "four LED light bulbs",
    "a yoga mat",
    "a set of kitchen knives",
]
STATUSES = ["pending", "paid", "shipped", "cancelled"]
INLINE = "order_inline"
ORDER_SCHEMA = {
    # Mid-sized: nested object, array of objects, two enums, patterns, a nullable string.
    # Strings and the array are bounded so that a small model's greedy JSON ends (the
    # suite's order schema lets SmolLM2 loop inside "email" until max_tokens).
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{5}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 32},
                "email": {"type": "string", "maxLength": 40},
            },
            "required": ["name", "email"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "unit_price_cents": {"type": "integer", "minimum": 0, "maximum": 1000000},
                },
                "required": ["sku", "quantity", "unit_price_cents"],
                "additionalProperties": False,
            },
        },
        "status": {"type": "string", "enum": STATUSES},
        "shipping": {"type": "string", "enum": ["standard", "express", "pickup"]},
        "note": {"anyOf": [{"type": "string", "maxLength": 48}, {"type": "null"}]},
    },
    "required": ["order_id", "customer", "items", "status", "shipping", "note"],
    "additionalProperties": False,
}


# ---- the workload (no engine imports: both venvs run this) ----------------------------------
def load_schemas(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def pick_schema(path: str, name: str) -> dict:
    if name == INLINE:
        return ORDER_SCHEMA
    for entry in load_schemas(path):
        if entry["name"] == name:
            return entry["schema"]
    raise SystemExit(f"no schema named {name!r} in {path}")


def conversations(n: int) -> list[list[dict]]:
    convs = []
    for i in range(n):
        who = CUSTOMERS[i % len(CUSTOMERS)]
        what = GOODS[(i // len(CUSTOMERS)) % len(GOODS)]
        email = who.split()[0].lower() + "@example.com"
        user = (
            f"Write the JSON record of order ORD-{10000 + 137 * i} placed by {who} ({email}) "
            f"for {what}. The order is {STATUSES[i % len(STATUSES)]}. Give the order_id, the "
            "customer (name, email), the items (sku like ABC-1234, quantity, "
            "unit_price_cents), the status, the shipping method (standard, express or pickup) "
            "and a short note."
        )
        convs.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    return convs


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def validator_for(schema: dict):
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def half_stats(rows: list[dict]) -> dict:
    tpots = [r["tpot_s"] for r in rows if r["tpot_s"] is not None]
    return {
        "n": len(rows),
        "mean_output_tokens": round(statistics.mean(r["tokens"] for r in rows), 1)
        if rows
        else None,
        "tpot_ms_mean": round(1000 * statistics.mean(tpots), 2) if tpots else None,
        "tpot_ms_p50": round(1000 * pct(tpots, 0.5), 2) if tpots else None,
        "finish_reasons": _count(r["finish_reason"] for r in rows),
    }


def summarize_run(
    wall_s: float, rows: list[dict], schema: dict, constrained: set[int], even: set[int]
) -> dict:
    """rows: one per request, in order: tokens, finish_reason, text, ttft_s, tpot_s.
    The odd half is unconstrained in both runs; the even half is constrained in run B."""
    out_tokens = sum(r["tokens"] for r in rows)
    odd_rows = [r for i, r in enumerate(rows) if i not in even]
    even_rows = [r for i, r in enumerate(rows) if i in even]
    ttfts = [r["ttft_s"] for r in rows if r["ttft_s"] is not None]
    summary = {
        "wall_s": round(wall_s, 3),
        "output_tokens": out_tokens,
        "output_tok_s": round(out_tokens / wall_s, 2),
        "ttft_ms_p50": round(1000 * pct(ttfts, 0.5), 1) if ttfts else None,
        "odd_half": half_stats(odd_rows) | {"constrained": False},
        "even_half": half_stats(even_rows) | {"constrained": bool(constrained)},
    }
    cons = [r for i, r in enumerate(rows) if i in constrained]
    if cons:
        validator = validator_for(schema)
        parsed = valid = 0
        errors: list[str] = []
        for r in cons:
            try:
                doc = json.loads(r["text"])
                parsed += 1
            except ValueError as exc:
                errors.append(f"parse: {exc}")
                continue
            errs = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
            if errs:
                errors.append(f"validate: {errs[0].message[:120]}")
            else:
                valid += 1
        summary["even_half"] |= {
            "parse_fraction": round(parsed / len(cons), 3),
            "valid_fraction": round(valid / len(cons), 3),
            "first_errors": errors[:3],
            "sample_output": cons[0]["text"][:400],
        }
    return summary


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


def median_runs(runs: list[dict], key: str) -> float | None:
    vals = []
    for r in runs:
        v = r
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


RATIO_KEYS = (
    "output_tok_s",
    "odd_half.tpot_ms_mean",
    "odd_half.tpot_ms_p50",
    "even_half.tpot_ms_mean",
)


CLEAN_OTHERS_CORES = 0.1
"""A run is clean when the rest of the machine used at most this many cores meanwhile."""


def _clean(run: dict) -> bool:
    return run.get("cpu", {}).get("others_cores", 0.0) <= CLEAN_OTHERS_CORES


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num and den else None


def engine_ratios(res: dict) -> dict:
    """B / A over all runs (medians), per B,A pair, and over the clean pairs only."""
    a, b = res["runs"]["A"], res["runs"]["B"]
    out: dict = {}
    for key in RATIO_KEYS:
        out[f"B/A {key}"] = _ratio(median_runs(b, key), median_runs(a, key))
    out["pairs"] = [
        {
            "B/A output_tok_s": _ratio(rb["output_tok_s"], ra["output_tok_s"]),
            "B/A odd_half.tpot_ms_mean": _ratio(
                rb["odd_half"]["tpot_ms_mean"], ra["odd_half"]["tpot_ms_mean"]
            ),
            "clean": _clean(ra) and _clean(rb),
            "others_cores_max": max(
                ra.get("cpu", {}).get("others_cores", 0), rb.get("cpu", {}).get("others_cores", 0)
            ),
        }
        for ra, rb in zip(a, b, strict=False)
    ]
    clean = [i for i, p in enumerate(out["pairs"]) if p["clean"]]
    out["clean_pairs"] = len(clean)
    if clean:
        ca, cb = [a[i] for i in clean], [b[i] for i in clean]
        for key in RATIO_KEYS:
            out[f"clean B/A {key}"] = _ratio(median_runs(cb, key), median_runs(ca, key))
    clean_a = [r for r in a if _clean(r)]
    for key in ("output_tok_s", "odd_half.tpot_ms_mean"):
        vals = [v for v in (median_runs([r], key) for r in a) if v]
        if len(vals) > 1:  # the noise: A against A
            out[f"A-vs-A spread {key} (max/min)"] = round(max(vals) / min(vals), 3)
        vals = [v for v in (median_runs([r], key) for r in clean_a) if v]
        if len(vals) > 1:
            out[f"clean A-vs-A spread {key} (max/min)"] = round(max(vals) / min(vals), 3)
    return out


def compare_engines(k: dict, v: dict) -> dict:
    """kvmesh / vLLM, on each engine's clean runs where it has any (else all its runs)."""
    cmp: dict = {}
    for run in ("A", "B"):
        kr = [r for r in k["runs"][run] if _clean(r)] or k["runs"][run]
        vr = [r for r in v["runs"][run] if _clean(r)] or v["runs"][run]
        for key in ("output_tok_s", "odd_half.tpot_ms_mean"):
            cmp[f"run {run} {key} kvmesh/vllm"] = _ratio(median_runs(kr, key), median_runs(vr, key))
    for key in ("B/A output_tok_s", "B/A odd_half.tpot_ms_mean"):
        kk = k["ratios"].get(f"clean {key}") or k["ratios"].get(key)
        vv = v["ratios"].get(f"clean {key}") or v["ratios"].get(key)
        cmp[f"{key}: kvmesh, vllm"] = [kk, vv]
    for key in ("cold_ms_p50", "cold_ms_p99", "warm_ms_p50"):
        cmp[f"compile {key} kvmesh/vllm (vllm is a proxy)"] = _ratio(
            k["compile"].get(key), v["compile"].get(key)
        )
    cmp["same_prompt_tokens"] = k["runs"]["A"][0]["prompt_hash"] == v["runs"]["A"][0]["prompt_hash"]
    return cmp


def finish_report(report: dict) -> dict:
    for res in report["engines"].values():
        if "error" not in res:
            res["ratios"] = engine_ratios(res)
    k, v = report["engines"].get("kvmesh"), report["engines"].get("vllm")
    if k and v and "error" not in k and "error" not in v:
        report["kvmesh_vs_vllm"] = compare_engines(k, v)
    return report


# ---- CPU accounting: how much of the machine this run had ------------------------------------
_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TCK  # utime, stime


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def cpu_snapshot() -> tuple[float, float, float, float]:
    """(wall, this process and its descendants' CPU s, machine busy CPU s, machine steal s)."""
    me = os.getpid()
    own = sum(_proc_cpu_s(p) for p in [me, *_descendants(me)])
    busy = steal = 0.0
    try:
        parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = (parts[0] + parts[1] + parts[2] + parts[5] + parts[6]) / _TCK
        steal = parts[7] / _TCK if len(parts) > 7 else 0.0
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter(), own, busy, steal


def cpu_usage(before, after) -> dict:
    wall = after[0] - before[0]
    own = after[1] - before[1]
    busy = after[2] - before[2]
    return {
        "own_cores": round(own / wall, 2),
        "others_cores": round(max(busy - own, 0.0) / wall, 2),
        "steal_cores": round((after[3] - before[3]) / wall, 2),
    }


def wait_quiet(max_wait_s: float, threshold: float = 0.3, window_s: float = 2.0) -> dict:
    """Wait (up to ``max_wait_s``) until the rest of the machine uses under ``threshold``
    cores: other people's tests share these two cores and a 2-thread OpenMP run slows
    several-fold when one of its threads is descheduled."""
    t0 = time.perf_counter()
    while True:
        before = cpu_snapshot()
        time.sleep(window_s)
        others = cpu_usage(before, cpu_snapshot())["others_cores"]
        waited = time.perf_counter() - t0
        if others < threshold or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "others_cores_before": others}


# ---- the A/B runs, shared by both engines --------------------------------------------------
def ab_runs(args, chat, make_params, to_row, schema: dict, timers: dict | None = None) -> dict:
    """``args.repeats`` pairs of run B (even half constrained) and run A (nothing
    constrained; the even half forced to the token counts B's constrained requests produced,
    so both runs do the same work), in the order B,A then A,B alternating.

    ``chat(convs, params) -> outputs``; ``make_params(constrained, i, max_tokens)``;
    ``to_row(output) -> {tokens, finish_reason, text, ttft_s, tpot_s}``."""
    convs = conversations(args.requests)
    even = set(range(0, len(convs), 2))
    runs: dict[str, list[dict]] = {"A": [], "B": []}

    def one(constrained: set[int], max_tokens: list[int]) -> tuple[dict, list[dict]]:
        ps = [make_params(i in constrained, i, max_tokens[i]) for i in range(len(convs))]
        quiet = wait_quiet(args.quiet_wait)
        before = cpu_snapshot()
        outs = chat(convs, ps)
        after = cpu_snapshot()
        rows = [to_row(o) for o in outs]
        summary = summarize_run(after[0] - before[0], rows, schema, constrained, even)
        summary["cpu"] = cpu_usage(before, after) | quiet
        if timers is not None:  # the grammar's share of the engine thread, this run
            spent = sum(t["s"] for t in timers.values())
            summary["grammar_time"] = {
                name: {"calls": t["calls"], "s": round(t["s"], 3)} for name, t in timers.items()
            } | {
                "total_s": round(spent, 3),
                "share_of_wall": round(spent / (after[0] - before[0]), 4),
            }
        summary["prompt_hash"] = hash_prompts([o.prompt_token_ids for o in outs])
        return summary, rows

    b_limits = [
        args.constrained_max_tokens if i in even else args.max_tokens for i in range(len(convs))
    ]
    a_limits: list[int] | None = None
    for rep in range(args.repeats):
        # B first in even pairs, A first in odd ones (A needs B's token counts: the first
        # pair always starts with B; greedy decoding gives the same counts every time)
        order = "BA" if rep % 2 == 0 or a_limits is None else "AB"
        for which in order:
            if which == "B":
                summary, rows = one(even, b_limits)
                runs["B"].append(summary | {"pair": rep, "order": order})
                if args.match_lengths:
                    a_limits = [
                        max(rows[i]["tokens"], 1) if i in even else args.max_tokens
                        for i in range(len(convs))
                    ]
                else:
                    a_limits = [args.max_tokens] * len(convs)
            else:
                runs["A"].append(one(set(), a_limits)[0] | {"pair": rep, "order": order})
    return runs


def hash_prompts(prompts) -> str:
    import hashlib

    return hashlib.sha1(json.dumps([list(p) for p in prompts]).encode()).hexdigest()[:12]


def warm_up(chat, make_params) -> float:
    convs = conversations(2)
    t0 = time.perf_counter()
    chat(convs, [make_params(False, 0, 16), make_params(False, 1, 16)])
    chat(convs, [make_params(True, 0, 24), make_params(False, 1, 16)])  # compiles the schema
    return time.perf_counter() - t0


def compile_summary(cold: list[tuple[float, str]], warm: list[float], failures: dict) -> dict:
    cold_ms = [1000 * c for c, _ in cold]
    warm_ms = [1000 * w for w in warm]
    return {
        "schemas": len(cold) + len(failures),
        "cold_ms_p50": round(pct(cold_ms, 0.5), 3) if cold_ms else None,
        "cold_ms_p99": round(pct(cold_ms, 0.99), 3) if cold_ms else None,
        "cold_ms_max": round(max(cold_ms), 3) if cold_ms else None,
        "slowest_cold": [(n, round(1000 * c, 1)) for c, n in sorted(cold, reverse=True)[:4]],
        "warm_ms_p50": round(pct(warm_ms, 0.5), 4) if warm_ms else None,
        "warm_ms_p99": round(pct(warm_ms, 0.99), 4) if warm_ms else None,
        "failures": failures,
    }


def instrument_grammar(engine) -> dict[str, dict]:
    """Time kvmesh's per-step grammar work on the engine thread: filling each constrained
    row's allowed-token mask, applying the masks to the logits, advancing the matchers.
    (Patched in place: the engine calls them through these names.)"""
    import kvmesh.replicas.model_runner as model_runner
    from kvmesh.replicas.structured import grammar

    timers: dict[str, dict] = {}

    def timed(name: str, fn):
        timers[name] = t = {"calls": 0, "s": 0.0}

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                t["s"] += time.perf_counter() - t0
                t["calls"] += 1

        return wrapper

    cls = grammar.GrammarMatcher
    cls.fill_bitmask = timed("fill_bitmask", cls.fill_bitmask)
    cls.accept = timed("accept", cls.accept)
    model_runner.apply_bitmask = timed("apply_bitmask", model_runner.apply_bitmask)
    sched = getattr(engine, "scheduler", None)
    if getattr(sched, "allocate_bitmask", None) is not None:
        sched.allocate_bitmask = timed("allocate_bitmask", sched.allocate_bitmask)
    return timers


# ---- kvmesh -----------------------------------------------------------------------------------
def worker_kvmesh(args) -> dict:
    import torch

    from kvmesh import LLM, SamplingParams
    from kvmesh.replicas.structured import GrammarError, StructuredOutputsParams

    schema = pick_schema(args.schemas, args.schema_name)
    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        dtype="float32",
        max_model_len=args.max_model_len,
        max_num_seqs=max(args.requests, 1),
        enable_prefix_caching=False,
    )
    load_s = time.perf_counter() - t0
    spec = StructuredOutputsParams(json=schema)

    def make_params(constrained: bool, i: int, max_tokens: int):
        if constrained:
            return SamplingParams(
                max_tokens=max_tokens, temperature=0.0, seed=i, structured_outputs=spec
            )
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=i, ignore_eos=True)

    def to_row(o) -> dict:
        c, m = o.outputs[0], o.metrics
        n = len(c.token_ids)
        ttft = m.first_token_time - m.arrival_time if m.first_token_time else None
        tpot = None
        if n > 1 and m.finished_time and m.first_token_time:
            tpot = (m.finished_time - m.first_token_time) / (n - 1)
        return {
            "tokens": n,
            "finish_reason": c.finish_reason,
            "text": c.text,
            "ttft_s": ttft,
            "tpot_s": tpot,
        }

    timers = instrument_grammar(llm.engine)
    warmup_s = warm_up(llm.chat, make_params)
    for t in timers.values():
        t.update(calls=0, s=0.0)

    def chat(convs, ps):
        for t in timers.values():
            t.update(calls=0, s=0.0)
        return llm.chat(convs, ps)

    runs = ab_runs(args, chat, make_params, to_row, schema, timers)

    # grammar compile time over the whole suite, straight on the engine's compiler
    quiet = wait_quiet(args.quiet_wait)
    before = cpu_snapshot()
    comp = llm.engine.structured
    cold, warm, failures = [], [], {}
    for entry in load_schemas(args.schemas):
        s = StructuredOutputsParams(json=entry["schema"])
        comp._cache.clear()
        t0 = time.perf_counter()
        try:
            comp.compile(s)
        except GrammarError as exc:
            failures[entry["name"]] = str(exc)[:200]
            continue
        cold.append((time.perf_counter() - t0, entry["name"]))
        t0 = time.perf_counter()
        comp.compile(s)
        warm.append(time.perf_counter() - t0)
    comp._cache.clear()
    t0 = time.perf_counter()
    comp.compile(spec)
    run_schema_cold_ms = 1000 * (time.perf_counter() - t0)
    compile_stats = compile_summary(cold, warm, failures) | {
        "cpu": cpu_usage(before, cpu_snapshot()) | quiet,
        "library": {
            m: _dist_version(m.replace("_", "-"))
            for m in ("xgrammar", "llguidance", "outlines_core")
            if m in sys.modules
        },
        "run_schema_cold_ms": round(run_schema_cold_ms, 1),
        "how": "llm.engine.structured.compile(StructuredOutputsParams(json=schema)); cold: "
        "its _cache cleared before each (the token table is built already); warm: the same "
        "spec again (an LRU hit)",
    }
    return {
        "engine": "kvmesh",
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "load_s": round(load_s, 1),
        "warmup_s": round(warmup_s, 1),
        "runs": runs,
        "compile": compile_stats,
    }


# ---- vLLM (CPU build) ---------------------------------------------------------------------
def worker_vllm(args) -> dict:
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    schema = pick_schema(args.schemas, args.schema_name)
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype="float32",
        max_model_len=args.max_model_len,
        max_num_seqs=max(args.requests, 1),
        enable_prefix_caching=False,
        seed=0,
        disable_log_stats=False,  # RequestOutput.metrics (first/last token times)
    )
    load_s = time.perf_counter() - t0
    notes: list[str] = []

    def make_params(constrained: bool, i: int, max_tokens: int, schema_=None):
        if constrained:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=0.0,
                seed=i,
                structured_outputs=StructuredOutputsParams(json=schema_ or schema),
            )
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=i, ignore_eos=True)

    def chat(convs, ps):
        return llm.chat(convs, ps, use_tqdm=False)

    def to_row(o) -> dict:
        c, m = o.outputs[0], o.metrics
        n = len(c.token_ids)
        ttft = tpot = None
        if m is not None and getattr(m, "first_token_ts", 0):
            ttft = getattr(m, "first_token_latency", None) or None
            if n > 1 and getattr(m, "last_token_ts", 0):
                tpot = (m.last_token_ts - m.first_token_ts) / (n - 1)
        elif not notes:
            notes.append(f"no per-request metrics ({type(m).__name__}): wall throughput only")
        return {
            "tokens": n,
            "finish_reason": c.finish_reason,
            "text": c.text,
            "ttft_s": ttft,
            "tpot_s": tpot,
        }

    warmup_s = warm_up(chat, make_params)
    runs = ab_runs(args, chat, make_params, to_row, schema)

    # compile-time proxy: a 1-token constrained request with a schema new to vLLM's grammar
    # cache (a unique title), then the same again, each less the median of 1-token
    # unconstrained requests
    convs = conversations(1)

    def timed(p) -> float:
        t0 = time.perf_counter()
        chat(convs, [p])
        return time.perf_counter() - t0

    quiet = wait_quiet(args.quiet_wait)
    before = cpu_snapshot()
    base_s = statistics.median(timed(make_params(False, 0, 1)) for _ in range(7))
    cold, warm, failures = [], [], {}
    tag = f"bench-{os.getpid()}-{time.time_ns()}"
    for entry in load_schemas(args.schemas):
        s = dict(entry["schema"])
        s["title"] = f"{s.get('title', entry['name'])} {tag}"
        try:
            c = timed(make_params(True, 0, 1, s))
            w = timed(make_params(True, 0, 1, s))
        except Exception as exc:  # recorded, the suite goes on
            failures[entry["name"]] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        cold.append((max(c - base_s, 0.0), entry["name"]))
        warm.append(max(w - base_s, 0.0))
    direct = vllm_library_compile(llm, args)
    s = dict(schema) | {"title": f"run schema {tag}"}
    run_schema_cold_ms = 1000 * max(timed(make_params(True, 0, 1, s)) - base_s, 0.0)
    compile_stats = compile_summary(cold, warm, failures) | {
        "cpu": cpu_usage(before, cpu_snapshot()) | quiet,
        "baseline_1tok_request_ms": round(1000 * base_s, 2),
        "direct_library": direct,
        "run_schema_cold_ms": round(run_schema_cold_ms, 1),
        "how": "PROXY (vLLM has no offline compile API): wall of a 1-token constrained "
        "llm.chat with a schema new to vLLM's grammar cache (cold), then again (warm), minus "
        "the median wall of a 1-token unconstrained llm.chat; vLLM's xgrammar compiler runs "
        "with max_threads=8 and its own cache",
    }
    return {
        "engine": "vllm",
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "torch_threads_frontend": torch.get_num_threads(),
        "cpu_env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")},
        "load_s": round(load_s, 1),
        "warmup_s": round(warmup_s, 1),
        "notes": notes,
        "runs": runs,
        "compile": compile_stats,
    }


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def vllm_library_compile(llm, args) -> dict:
    """xgrammar's compile time with a compiler built as vLLM 0.32's xgrammar backend builds
    it (TokenizerInfo.from_huggingface, max_threads=8, its cache): cold (cache cleared before
    each schema) and warm (the same schema again: a cache hit), outside vLLM's request path."""
    try:
        import xgrammar as xgr

        tokenizer = llm.get_tokenizer()
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a wrapper's HF tokenizer
        vocab = llm.llm_engine.model_config.get_vocab_size()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        compiler = xgr.GrammarCompiler(info, max_threads=8, cache_enabled=True)
        cold, warm, failures = [], [], {}
        for entry in load_schemas(args.schemas):
            text = json.dumps(entry["schema"])
            compiler.clear_cache()
            t0 = time.perf_counter()
            try:
                compiler.compile_json_schema(text, any_whitespace=True)
            except Exception as exc:  # recorded, the suite goes on
                failures[entry["name"]] = f"{type(exc).__name__}: {str(exc)[:160]}"
                continue
            cold.append((time.perf_counter() - t0, entry["name"]))
            t0 = time.perf_counter()
            compiler.compile_json_schema(text, any_whitespace=True)
            warm.append(time.perf_counter() - t0)
        return compile_summary(cold, warm, failures) | {
            "xgrammar_version": _dist_version("xgrammar"),
            "how": "xgr.GrammarCompiler(max_threads=8, cache_enabled=True) as vLLM builds it; "
            "cold: clear_cache() before each; warm: the same schema again",
        }
    except Exception as exc:  # recorded: the proxy still stands
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


# ---- the parent ---------------------------------------------------------------------------
def cpu_info() -> dict:
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "model": model,
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in wanted},
        "machine": platform.machine(),
    }


def worker_args(args) -> list[str]:
    return [
        "--requests",
        str(args.requests),
        "--max-tokens",
        str(args.max_tokens),
        "--constrained-max-tokens",
        str(args.constrained_max_tokens),
        "--schemas",
        str(Path(args.schemas).resolve()),
        "--schema-name",
        args.schema_name,
        "--model",
        args.model,
        "--max-model-len",
        str(args.max_model_len),
        "--repeats",
        str(args.repeats),
        "--quiet-wait",
        str(args.quiet_wait),
        *([] if args.match_lengths else ["--no-match-lengths"]),
    ]


def run_engine(engine: str, args) -> dict:
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if engine == "vllm":
        python = args.vllm_python
        env = {k: v for k, v in env.items() if not k.startswith("KVMESH")}
        # Run by the parent only (kvmesh's venv): the vLLM worker never imports the harness.
        sys.path.insert(0, str(Path(__file__).parent))
        from serving_harness import vllm_scratch_env

        env.update(vllm_scratch_env(scratch))
        env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_CPU_KVCACHE_SPACE="2")
        if args.vllm_cores == "bound":
            env.update(VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_OMP_THREADS_BIND="0-1")
        # outside the repository: its top-level folders (kernels/, router/) would shadow
        # packages that vLLM's dependencies import
        cwd = scratch
    else:
        python = args.kvmesh_python
        cwd = REPO
    cmd = [python, str(HERE), "--worker", engine, *worker_args(args)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"engine": engine, "error": f"timed out after {args.timeout} s", "stderr": tail}
    elapsed = time.perf_counter() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {
            "engine": engine,
            "error": f"exit code {proc.returncode}, no result",
            "stderr": proc.stderr[-3000:],
        }
    return json.loads(line[7:]) | {"subprocess_s": round(elapsed, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--engines", default="kvmesh,vllm")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128, help="unconstrained (ignore_eos)")
    ap.add_argument("--constrained-max-tokens", type=int, default=256)
    ap.add_argument("--schemas", default=str(DEFAULT_SCHEMAS))
    ap.add_argument(
        "--schema-name",
        default=INLINE,
        help=f"a name from --schemas, or {INLINE} (the default: see ORDER_SCHEMA)",
    )
    ap.add_argument(
        "--no-match-lengths",
        dest="match_lengths",
        action="store_false",
        help="run A's even half gets --max-tokens instead of B's constrained token counts",
    )
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2, help="B,A pairs per engine")
    ap.add_argument("--kvmesh-python", default=str(REPO / ".venv/bin/python"))
    ap.add_argument("--vllm-python", default=VLLM_PYTHON)
    ap.add_argument(
        "--vllm-cores",
        choices=("bound", "default"),
        default="bound",
        help="bound: both cores to vLLM's OpenMP threads (faster here); default: its defaults",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each timed part, wait up to this many s for the rest of the machine to "
        "use < 0.3 cores (0: don't wait)",
    )
    ap.add_argument("--scratch", default="/tmp/kvmesh-structured-bench")
    ap.add_argument("--timeout", type=float, default=1200.0, help="per engine, seconds")
    ap.add_argument(
        "--resummarize", metavar="JSON", help="recompute the ratios of an earlier report"
    )
    ap.add_argument("--worker", choices=("kvmesh", "vllm"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.resummarize:
        with open(args.resummarize) as f:
            print(json.dumps(finish_report(json.load(f)), indent=1))
        return
    if args.worker:
        fn = worker_kvmesh if args.worker == "kvmesh" else worker_vllm
        try:
            result = fn(args)
        except Exception as exc:  # the parent reports it
            import traceback

            traceback.print_exc()
            result = {"engine": args.worker, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        print("RESULT " + json.dumps(result), flush=True)
        return

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    report: dict = {
        "bench": "structured output under load",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": cpu_info(),
        "workload": {
            "requests": args.requests,
            "schema": args.schema_name,
            "schema_chars": len(json.dumps(pick_schema(args.schemas, args.schema_name))),
            "odd_half": f"unconstrained in both runs: max_tokens={args.max_tokens}, ignore_eos",
            "even_half": "run B: constrained by the schema, "
            f"max_tokens={args.constrained_max_tokens}, ends when its JSON is complete; run A: "
            + (
                "unconstrained, ignore_eos, forced to the token count of the same request in "
                "the B run just before (the same work in both runs)"
                if args.match_lengths
                else f"unconstrained, max_tokens={args.max_tokens}, ignore_eos"
            ),
            "sampling": "greedy (temperature 0), chat template, prefix caching off in both",
            "max_model_len": args.max_model_len,
            "order": f"warm-up, then {args.repeats} pairs: B,A then A,B alternating",
        },
        "engines": {},
    }
    for engine in engines:
        print(f"[structured_bench] {engine} ...", file=sys.stderr, flush=True)
        report["engines"][engine] = run_engine(engine, args)
        print(f"[structured_bench] {engine} done", file=sys.stderr, flush=True)
    finish_report(report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
