"""Grammar libraries for structured output, measured: xgrammar vs llguidance vs outlines-core.

    flock /tmp/kvmesh-bench.lock .venv/bin/python bench/structured_libs.py \
        [--schemas tests/data/structured/schemas.json] [--out result.json]

A benchmark, not a test. Prints one JSON object. For each library, with the SmolLM2 tokenizer
(vocab 49152):

* tokenizer-info build time (one-off per process);
* per-schema cold compile time (no cache: xgrammar's compiler has its cache disabled; the
  llguidance grammar is re-parsed into a new LLMatcher; outlines-core builds regex + Index).
  xgrammar and llguidance take the min over --compile-repeats cold compiles per schema (the
  machine is shared, the min filters noise); outlines-core compiles once, in a worker process,
  killed after --outlines-timeout seconds (recorded as a failure "timeout");
* correctness: every valid instance of the suite, serialized (``json.dumps`` compact, indented
  with indent=2, and raw UTF-8 where that differs), tokenized with ``tok.encode``, fed one token
  at a time: the token must be allowed by the freshly filled bitmask, then accepted; at the end
  EOS must be allowed. A rejected valid instance is re-fed byte by byte (one single-byte token
  per byte): if that passes, the rejection is the tokenization (``cause: "tokenization"``),
  else a feature gap (``cause: "grammar"``). Every invalid instance must be rejected somewhere
  (a masked token, or EOS masked at the end); the ones let through are listed with the JSON
  Schema keyword they break (jsonschema's best_match);
* per-step mask cost at batch 64: 64 matchers over a mix of valid instances (those every
  library accepts), each starting at a different token; a step = fill the bitmask for all 64
  rows + accept one token each (a matcher that reaches the end of its instance + EOS is reset);
  sequential (one thread, the per-row API) and each library's parallel batch API where it has
  one;
* applying a [64, 49152] int32 bitmask to float32 logits on CPU: each library's own apply
  function (first call separately: llguidance and outlines-core use torch.compile) and a plain
  torch unpack + masked_fill_ (``torch_apply_bitmask``).

The suite is validated first with jsonschema (Draft 2020-12, format assertions on, with local
checkers for the formats jsonschema has no built-in checker for here: date-time, time, uri).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import multiprocessing as mp
import os
import pickle
import platform
import re
import statistics
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCHEMAS = ROOT / "tests" / "data" / "structured" / "schemas.json"
FALLBACK_MODEL_DIR = "/root/.cache/kvmesh/models/SmolLM2-135M-Instruct-5a916f6af553"
VOCAB_SIZE = 49152
LIBS = ("xgrammar", "llguidance", "outlines_core")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


# ------------------------------------------------------------------------------------ helpers


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for an empty list."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def ms_stats(seconds: list[float]) -> dict[str, float | None]:
    ms = [x * 1e3 for x in seconds]
    return {
        "n": len(ms),
        "mean_ms": round(statistics.fmean(ms), 4) if ms else None,
        "p50_ms": round(pct(ms, 50), 4) if ms else None,
        "p99_ms": round(pct(ms, 99), 4) if ms else None,
        "max_ms": round(max(ms), 4) if ms else None,
    }


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "model": model,
        "flags": {f: f in flags for f in CPU_FLAGS},
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("xgrammar", "llguidance", "outlines_core", "torch", "transformers", "jsonschema"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def model_dir(arg: str | None) -> str:
    if arg:
        return arg
    try:
        sys.path.insert(0, str(ROOT.parent))
        from kvmesh.replicas.model_files import resolve_model_dir

        return str(resolve_model_dir(None))
    except Exception:
        return FALLBACK_MODEL_DIR


def bit(bm, row: int, token: int) -> bool:
    """Bit `token` of bitmask row `row` (int32 words, little-endian bit order)."""
    return bool((int(bm[row, token >> 5]) >> (token & 31)) & 1)


# ------------------------------------------------------------------ suite validation (jsonschema)

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII
)
_TIME = re.compile(r"^\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII)


def format_checker():
    from jsonschema import FormatChecker

    fc = FormatChecker()  # every checker jsonschema has here (date, email, uuid, ipv4, ...)

    @fc.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not _RFC3339.match(value):
            return False
        datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        return True

    @fc.checks("time", raises=ValueError)
    def _time(value: object) -> bool:
        return not isinstance(value, str) or bool(_TIME.match(value))

    @fc.checks("uri")
    def _uri(value: object) -> bool:
        if not isinstance(value, str):
            return True
        parts = urllib.parse.urlsplit(value)
        scheme_ok = re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", parts.scheme or "") is not None
        return scheme_ok and not re.search(r"[\s<>\"{}|\\^`]", value)

    return fc


def validate_suite(suite: list[dict]) -> dict[str, Any]:
    """Every valid instance passes, every invalid one fails; returns the failing keyword of each
    invalid instance (jsonschema.exceptions.best_match). Raises on any disagreement."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    fc = format_checker()
    problems, keywords = [], {}
    names = set()
    for case in suite:
        name = case["name"]
        if name in names:
            problems.append(f"{name}: duplicate name")
        names.add(name)
        if not case["valid"] or not case["invalid"]:
            problems.append(f"{name}: needs >=1 valid and >=1 invalid instance")
        Draft202012Validator.check_schema(case["schema"])
        v = Draft202012Validator(case["schema"], format_checker=fc)
        for i, inst in enumerate(case["valid"]):
            err = best_match(v.iter_errors(inst))
            if err is not None:
                problems.append(f"{name}: valid[{i}] fails: {err.message}")
        kws = []
        for i, inst in enumerate(case["invalid"]):
            err = best_match(v.iter_errors(inst))
            if err is None:
                problems.append(f"{name}: invalid[{i}] passes validation")
                kws.append(None)
            else:
                kws.append(f"{err.validator}@{err.json_path}")
        keywords[name] = kws
    if problems:
        raise SystemExit("schema suite is inconsistent:\n  " + "\n  ".join(problems))
    return keywords


# ------------------------------------------------------------------------------- library adapters


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab_size: int):
        import xgrammar as xgr

        self.xgr = xgr
        t0 = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size)
        self.tokenizer_info_s = time.perf_counter() - t0
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, schema_str: str):
        return self.compiler.compile_json_schema(schema_str, any_whitespace=True, strict_mode=True)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def allocate(self, n: int, vocab: int):
        return self.xgr.allocate_token_bitmask(n, vocab)

    def fill(self, m, bm, row: int) -> None:
        m.fill_next_token_bitmask(bm, row)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)

    def reset(self, m) -> None:
        m.reset()

    # parallel batch API
    def batch_setup(self, threads: int):
        self.batch = self.xgr.BatchGrammarMatcher(max_threads=threads)

    def batch_fill(self, ms: list, bm) -> None:
        self.batch.batch_fill_next_token_bitmask(ms, bm)

    def batch_accept(self, ms: list, tokens: list[int]) -> list[bool]:
        return self.xgr.BatchGrammarMatcher.batch_accept_token(ms, tokens)

    def apply(self, logits, bm) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bm)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab_size: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llt = llguidance.torch
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab_size)
        self.tokenizer_info_s = time.perf_counter() - t0
        self.warnings: dict[str, list[str]] = {}

    def compile(self, schema_str: str):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema_str)
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return grammar

    def compile_lenient(self, schema_str: str):
        """The options an engine can turn on for schemas the default refuses: unknown keywords
        ignored (``lenient``), oneOf approximated by anyOf (``coerce_one_of``)."""
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema_str, overrides={"lenient": True, "coerce_one_of": True}
        )
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return grammar

    def matcher(self, grammar):
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def allocate(self, n: int, vocab: int):
        return self.llt.allocate_token_bitmask(n, vocab)

    def fill(self, m, bm, row: int) -> None:
        self.llt.fill_next_token_bitmask(m, bm, row)

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)

    def reset(self, m) -> None:
        m.reset()

    def batch_setup(self, threads: int):
        self.executor = self.llg.LLExecutor(num_threads=threads)

    def batch_fill(self, ms: list, bm) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], bm)

    def batch_accept(self, ms: list, tokens: list[int]) -> list[bool]:
        return self.llt.consume_token_par(self.executor, list(zip(ms, tokens, strict=True)))

    def apply(self, logits, bm) -> None:
        self.llt.apply_token_bitmask_inplace(logits, bm)


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable stand-in character of each byte -> the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def outlines_vocabulary(tok):
    """outlines_core.Vocabulary from the HF tokenizer without the hub: token bytes -> ids,
    special/added tokens left out (EOS is passed separately, as from_pretrained does)."""
    import outlines_core

    dec = _byte_decoder()
    skip = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    mapping: dict[bytes, list[int]] = {}
    for piece, tid in tok.get_vocab().items():
        if tid in skip:
            continue
        try:
            raw = bytes(dec[c] for c in piece)
        except KeyError:  # not a byte-level piece: keep its UTF-8
            raw = piece.encode()
        mapping.setdefault(raw, []).append(tid)
    return outlines_core.Vocabulary(tok.eos_token_id, mapping)


def _outlines_worker(conn, model: str) -> None:
    """Child process: builds the Vocabulary once, then compiles schemas sent over `conn`."""
    import outlines_core
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    t0 = time.perf_counter()
    vocab = outlines_vocabulary(tok)
    conn.send(("ready", time.perf_counter() - t0))
    while True:
        schema_str = conn.recv()
        if schema_str is None:
            return
        try:
            t0 = time.perf_counter()
            regex = outlines_core.json_schema.build_regex_from_schema(schema_str)
            t1 = time.perf_counter()
            index = outlines_core.Index(regex, vocab)
            t2 = time.perf_counter()
            conn.send(("ok", t1 - t0, t2 - t1, len(regex), pickle.dumps(index)))
        except BaseException as e:
            conn.send(("err", f"{type(e).__name__}: {e}"[:600]))


class OutlinesCore:
    name = "outlines_core"

    def __init__(self, tok, vocab_size: int, model: str, timeout_s: float):
        import outlines_core
        import outlines_core.kernels.torch as okt

        self.oc, self.okt = outlines_core, okt
        self.eos = tok.eos_token_id
        self.model, self.timeout_s = model, timeout_s
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.worker_starts = 0
        self.tokenizer_info_s = self._start()

    def _start(self) -> float:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_outlines_worker, args=(child, self.model), daemon=True)
        self.proc.start()
        self.conn = parent
        self.worker_starts += 1
        msg = self.conn.recv()
        assert msg[0] == "ready", msg
        return msg[1]

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
        self.proc = None

    def compile_timed(self, schema_str: str) -> tuple[Any, float, dict]:
        """(index or None, seconds, detail); the worker is killed and restarted on timeout."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(schema_str)
        if not self.conn.poll(self.timeout_s):
            self.proc.kill()
            self.proc.join()
            self.proc = None
            raise TimeoutError(f"timeout: index not built in {self.timeout_s:.0f} s")
        msg = self.conn.recv()
        if msg[0] == "err":
            raise ValueError(msg[1])
        _, regex_s, index_s, regex_len, blob = msg
        index = pickle.loads(blob)
        detail = {"regex_s": regex_s, "index_s": index_s, "regex_chars": regex_len}
        return index, regex_s + index_s, detail

    def matcher(self, index):
        return self.oc.Guide(index)

    def allocate(self, n: int, vocab: int):
        import torch

        return torch.full((n, (vocab + 31) // 32), -1, dtype=torch.int32)

    def fill(self, g, bm, row: int) -> None:
        r = bm[row]
        g.write_mask_into(r.data_ptr(), r.numel(), r.element_size())

    def accept(self, g, token: int) -> bool:
        if token == self.eos:  # Guide.advance(eos) raises; EOS ends the sequence if final
            return g.is_finished()
        try:
            g.advance(token, return_tokens=False)
            return True
        except ValueError:
            return False

    def reset(self, g) -> None:
        g.reset()

    def apply(self, logits, bm) -> None:
        self.okt.apply_token_bitmask_inplace(logits, bm)


# ----------------------------------------------------------------------------------- the bench


def torch_apply_bitmask(logits, bitmask) -> None:
    """Plain torch: unpack the int32 bitmask (bit j of word w = token 32*w + j) into a bool
    mask, set the disallowed logits to -inf in place."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(bitmask.shape[0], -1)
    vocab = logits.shape[-1]
    if allowed.shape[1] < vocab:  # logits wider than the mask: the tail is disallowed
        logits[:, allowed.shape[1] :] = float("-inf")
        vocab = allowed.shape[1]
    logits[:, :vocab].masked_fill_(~allowed[:, :vocab], float("-inf"))


def feed(lib, compiled, ids: list[int], eos: int, bm) -> tuple[bool, int | None, str | None]:
    """Fill mask -> check token allowed -> accept, for each token; then EOS must be allowed.
    Returns (accepted, index of the failing token or len(ids) for EOS, why)."""
    m = lib.matcher(compiled)
    for k, t in enumerate(ids):
        lib.fill(m, bm, 0)
        if not bit(bm, 0, t):
            return False, k, "token masked"
        if not lib.accept(m, t):
            return False, k, "mask allowed the token but accept refused it"
    lib.fill(m, bm, 0)
    if not bit(bm, 0, eos):
        return False, len(ids), "EOS masked at the end"
    return True, None, None


def instance_forms(inst: Any) -> dict[str, str]:
    forms = {"compact": json.dumps(inst), "indent2": json.dumps(inst, indent=2)}
    raw = json.dumps(inst, ensure_ascii=False)
    if raw != forms["compact"]:
        forms["raw_utf8"] = raw
    return forms


def compile_all(lib, suite, repeats: int) -> tuple[dict, dict, dict]:
    """{name: compiled}, {name: seconds}, {name: error}."""
    compiled, secs, errors = {}, {}, {}
    for case in suite:
        schema_str = json.dumps(case["schema"])
        name = case["name"]
        try:
            if isinstance(lib, OutlinesCore):
                obj, dt, _ = lib.compile_timed(schema_str)
            else:
                dt = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    obj = lib.compile(schema_str)
                    dt = min(dt, time.perf_counter() - t0)
            compiled[name], secs[name] = obj, dt
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"[:600]
    return compiled, secs, errors


def first_mask_times(lib, compiled: dict, vocab: int) -> dict[str, float]:
    """Matcher construction + first mask fill (llguidance builds lexer state lazily here)."""
    bm = lib.allocate(1, vocab)
    out = {}
    for name, c in compiled.items():
        t0 = time.perf_counter()
        m = lib.matcher(c)
        lib.fill(m, bm, 0)
        out[name] = time.perf_counter() - t0
    return out


def correctness(lib, suite, compiled, tok, keywords, byte_ids, vocab) -> dict[str, Any]:
    eos = tok.eos_token_id
    bm = lib.allocate(1, vocab)
    forms_total: dict[str, int] = {}
    forms_ok: dict[str, int] = {}
    rejected_valid, wrongly_accepted = [], []
    inv_total = inv_wrong = 0
    for case in suite:
        name = case["name"]
        if name not in compiled:
            continue
        c = compiled[name]
        for vi, inst in enumerate(case["valid"]):
            for form, text in instance_forms(inst).items():
                if isinstance(lib, OutlinesCore) and form == "indent2":
                    continue  # default whitespace pattern "[ ]?": no newlines by design
                forms_total[form] = forms_total.get(form, 0) + 1
                ids = tok.encode(text, add_special_tokens=False)
                ok, pos, why = feed(lib, c, ids, eos, bm)
                if ok:
                    forms_ok[form] = forms_ok.get(form, 0) + 1
                    continue
                by_bytes, _, _ = feed(lib, c, [byte_ids[b] for b in text.encode()], eos, bm)
                prefix = tok.decode(ids[:pos]) if pos is not None else text
                at = tok.decode(ids[pos : pos + 1]) if pos is not None and pos < len(ids) else "EOS"
                rejected_valid.append(
                    {
                        "schema": name,
                        "valid_index": vi,
                        "form": form,
                        "why": why,
                        "at": f"...{prefix[-60:]}⟦{at}⟧",
                        "cause": "tokenization" if by_bytes else "grammar",
                    }
                )
        for ii, inst in enumerate(case["invalid"]):
            inv_total += 1
            text = json.dumps(inst)
            ok, _, _ = feed(lib, c, tok.encode(text, add_special_tokens=False), eos, bm)
            if ok:
                inv_wrong += 1
                wrongly_accepted.append(
                    {
                        "schema": name,
                        "invalid_index": ii,
                        "breaks": keywords[name][ii],
                        "text": text if len(text) <= 160 else text[:157] + "...",
                    }
                )
    by_kw: dict[str, int] = {}
    for w in wrongly_accepted:
        kw = (w["breaks"] or "?").split("@")[0]
        by_kw[kw] = by_kw.get(kw, 0) + 1
    return {
        "valid_accepted": {f: f"{forms_ok.get(f, 0)}/{n}" for f, n in forms_total.items()},
        "valid_accepted_n": sum(forms_ok.values()),
        "valid_total_n": sum(forms_total.values()),
        "invalid_wrongly_accepted": f"{inv_wrong}/{inv_total}",
        "invalid_wrongly_accepted_by_keyword": dict(sorted(by_kw.items())),
        "rejected_valid": rejected_valid,
        "wrongly_accepted_invalid": wrongly_accepted,
    }


def batch_bench(
    lib, workload: list[tuple], eos: int, batch: int, steps: int, vocab: int, par: bool
):
    """Per-step fill (all rows) + accept (one token each) at `batch` matchers."""
    bm = lib.allocate(batch, vocab)
    slots = []
    for i in range(batch):
        name, compiled, ids = workload[i * len(workload) // batch]
        seq = [*ids, eos]
        m = lib.matcher(compiled)
        start = (i * 37) % len(seq)
        for t in seq[:start]:
            assert lib.accept(m, t), (lib.name, name)
        slots.append([m, seq, start])
    fill_s, acc_s, total_s = [], [], []
    for _ in range(steps):
        ms = [s[0] for s in slots]
        t0 = time.perf_counter()
        if par:
            lib.batch_fill(ms, bm)
        else:
            for r, m in enumerate(ms):
                lib.fill(m, bm, r)
        t1 = time.perf_counter()
        toks = [s[1][s[2]] for s in slots]
        if par and not isinstance(lib, OutlinesCore):
            oks = lib.batch_accept(ms, toks)
        else:
            oks = [lib.accept(m, t) for m, t in zip(ms, toks, strict=True)]
        for s in slots:
            s[2] += 1
            if s[2] == len(s[1]):
                lib.reset(s[0])
                s[2] = 0
        t2 = time.perf_counter()
        assert all(oks), (lib.name, [i for i, ok in enumerate(oks) if not ok])
        fill_s.append(t1 - t0)
        acc_s.append(t2 - t1)
        total_s.append(t2 - t0)
    return {
        "fill": ms_stats(fill_s),
        "accept": ms_stats(acc_s),
        "fill_plus_accept": ms_stats(total_s),
    }, bm


def apply_bench(fn, base, bm, ref, reps: int) -> dict[str, Any]:
    logits = base.clone()
    t0 = time.perf_counter()
    fn(logits, bm)
    first = time.perf_counter() - t0
    same = bool((logits.isinf() == ref.isinf()).all())
    times = []
    for _ in range(reps):
        logits.copy_(base)
        t0 = time.perf_counter()
        fn(logits, bm)
        times.append(time.perf_counter() - t0)
    return {
        "first_call_ms": round(first * 1e3, 3),
        "median_ms": round(statistics.median(times) * 1e3, 4),
        "min_ms": round(min(times) * 1e3, 4),
        "matches_plain_torch": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--schemas", default=str(DEFAULT_SCHEMAS))
    ap.add_argument("--model", default=None, help="HF tokenizer dir (default: embedded SmolLM2)")
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--compile-repeats", type=int, default=2)
    ap.add_argument("--outlines-timeout", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=0, help="0: the longest workload instance")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--apply-reps", type=int, default=30)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    wall0 = time.perf_counter()

    import torch
    from transformers import AutoTokenizer

    suite = json.loads(Path(args.schemas).read_text())
    keywords = validate_suite(suite)
    mdir = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(mdir)
    vocab = VOCAB_SIZE
    dec = _byte_decoder()
    byte_ids = {}
    for ch, b in dec.items():
        byte_ids[b] = tok.convert_tokens_to_ids(ch)
    assert len(byte_ids) == 256 and all(isinstance(v, int) for v in byte_ids.values())

    result: dict[str, Any] = {
        "bench": "structured_libs",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "tokenizer": {"dir": mdir, "vocab": vocab, "eos": tok.eos_token_id},
        "suite": {
            "path": str(args.schemas),
            "schemas": len(suite),
            "valid_instances": sum(len(c["valid"]) for c in suite),
            "invalid_instances": sum(len(c["invalid"]) for c in suite),
        },
        "config": {
            "xgrammar": "compile_json_schema(any_whitespace=True, strict_mode=True), "
            "GrammarCompiler(max_threads=1, cache_enabled=False)",
            "llguidance": "grammar_from_json_schema(defaults) + LLMatcher (flexible whitespace)",
            "outlines_core": "build_regex_from_schema(default whitespace '[ ]?') + Index; "
            "indented instances not tried (no newlines in that pattern)",
            "compile_repeats_xgr_llg": args.compile_repeats,
            "outlines_timeout_s": args.outlines_timeout,
            "batch": args.batch,
            "threads_parallel_apis": args.threads,
        },
        "libs": {},
    }

    wanted = [x for x in args.libs.split(",") if x]
    libs, compiled_by = {}, {}
    for name in wanted:
        t0 = time.perf_counter()
        if name == "xgrammar":
            lib = XGrammar(tok, vocab)
        elif name == "llguidance":
            lib = LLGuidance(tok, vocab)
        elif name == "outlines_core":
            lib = OutlinesCore(tok, vocab, mdir, args.outlines_timeout)
        else:
            raise SystemExit(f"unknown lib {name}")
        libs[name] = lib
        compiled, secs, errors = compile_all(lib, suite, args.compile_repeats)
        compiled_by[name] = compiled
        first = first_mask_times(lib, compiled, vocab)
        cs = list(secs.values())
        entry: dict[str, Any] = {
            "tokenizer_info_s": round(lib.tokenizer_info_s, 3),
            "compile": {
                "ok": len(compiled),
                "failed": len(errors),
                "p50_ms": round(pct(cs, 50) * 1e3, 3) if cs else None,
                "p99_ms": round(pct(cs, 99) * 1e3, 3) if cs else None,
                "max_ms": round(max(cs) * 1e3, 3) if cs else None,
                "max_schema": max(secs, key=secs.get) if secs else None,
                "total_s": round(sum(cs), 3),
                "errors": errors,
                "per_schema_ms": {k: round(v * 1e3, 3) for k, v in secs.items()},
            },
            "matcher_plus_first_mask": ms_stats(list(first.values())),
        }
        entry["correctness"] = correctness(lib, suite, compiled, tok, keywords, byte_ids, vocab)
        if isinstance(lib, LLGuidance) and errors:
            retry = {}
            for case in suite:
                if case["name"] in errors:
                    try:
                        retry[case["name"]] = lib.compile_lenient(json.dumps(case["schema"]))
                    except Exception as e:
                        entry["compile"].setdefault("lenient_errors", {})[case["name"]] = str(e)
            sub = [c for c in suite if c["name"] in retry]
            lenient = correctness(lib, sub, retry, tok, keywords, byte_ids, vocab)
            entry["lenient_retry_of_failed"] = {"compiled": sorted(retry), "correctness": lenient}
        if isinstance(lib, OutlinesCore):
            entry["worker_starts"] = lib.worker_starts
            lib.close()
        entry["phase_s"] = round(time.perf_counter() - t0, 2)
        result["libs"][name] = entry
        print(f"[structured_libs] {name}: {entry['phase_s']} s", file=sys.stderr, flush=True)

    # Batch workload: compact valid instances every library accepted.
    rejected = {
        (r["schema"], r["valid_index"])
        for e in result["libs"].values()
        for r in e["correctness"]["rejected_valid"]
        if r["form"] == "compact"
    }
    workload_keys = [
        (c["name"], vi, tok.encode(json.dumps(inst), add_special_tokens=False))
        for c in suite
        for vi, inst in enumerate(c["valid"])
        if all(c["name"] in compiled_by[n] for n in libs) and (c["name"], vi) not in rejected
    ]
    steps = args.steps or max(len(ids) + 1 for _, _, ids in workload_keys)
    result["batch_workload"] = {
        "instances": len(workload_keys),
        "schemas": len({k[0] for k in workload_keys}),
        "mean_tokens": round(statistics.fmean(len(k[2]) for k in workload_keys), 1),
        "steps": steps,
    }
    masks = {}
    for name, lib in libs.items():
        wl = [(s, compiled_by[name][s], ids) for s, _, ids in workload_keys]
        seq, bm = batch_bench(lib, wl, tok.eos_token_id, args.batch, steps, vocab, par=False)
        masks[name] = bm
        out = {"sequential": seq}
        if hasattr(lib, "batch_setup"):
            lib.batch_setup(args.threads)
            out[f"parallel_{args.threads}_threads"], _ = batch_bench(
                lib, wl, tok.eos_token_id, args.batch, steps, vocab, par=True
            )
        result["libs"][name]["batch"] = out

    # Apply the bitmask to float32 logits [batch, vocab].
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(args.batch, vocab, generator=gen, dtype=torch.float32)
    bm = next(iter(masks.values()))
    ref = base.clone()
    torch_apply_bitmask(ref, bm)
    apply_res = {"plain_torch": apply_bench(torch_apply_bitmask, base, bm, ref, args.apply_reps)}
    for name, lib in libs.items():
        apply_res[name] = apply_bench(lib.apply, base, bm, ref, args.apply_reps)
    result["apply_bitmask_64x49152_f32"] = apply_res

    result["wall_s"] = round(time.perf_counter() - wall0, 1)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
