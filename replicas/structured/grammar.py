"""Compiling a structured-output spec into a grammar, and one request's matcher over it.

The grammar library is llguidance, chosen by measurement over xgrammar and outlines-core
(``bench/structured_libs.py``; ``bench/RESULTS.md``): on 41 real-world schemas it was the
only one that let no invalid instance through (xgrammar treats ``oneOf`` as ``anyOf``, drops
``maxLength`` next to ``pattern``, and forbids escapes in length-bounded strings), it
compiles a schema in about a millisecond, and it refuses what it cannot enforce (e.g.
``uniqueItems``) instead of silently loosening it. Only this module imports it, behind three
small types: ``StructuredOutputCompiler`` (one per engine and per ingress: the tokenizer's
token table, built once, and an LRU of compiled grammars keyed by the spec), a compiled
grammar (a matcher at its start, never advanced: each request gets a copy) and
``GrammarMatcher`` (one request's position in its grammar).

Compiling takes from a fraction of a millisecond to, for huge grammars, seconds.
``compile_async`` runs it on a small pool of threads (the library releases the GIL while it
builds) with a time limit, so a slow schema never stalls the engine thread or other
requests, and a schema that cannot be compiled in time is refused rather than left to stall.
A bad spec is a ``GrammarError`` (a ``ValueError``) that says what is wrong with it, before
anything is queued.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from kvmesh.replicas.structured.params import StructuredOutputsParams

DEFAULT_COMPILE_TIMEOUT_S = 10.0
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON in ``json.dumps``' default layout, ``{"a": 1, "b": [2, 3]}``: one way to write each
value. Free whitespace would let a model (a small or random one especially) pile up
newlines and spaces between tokens until it runs out of ``max_tokens``: the grammar
library treats whitespace as skippable between any two tokens, so no pattern bounds a run
of it."""
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


class GrammarError(ValueError):
    """A spec that cannot be compiled; ``param`` names the API field it came from."""

    def __init__(self, message: str, param: str = "structured_outputs") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _check_json_schema(schema: Any) -> None:
    """Refuse what is not a JSON schema by the meta-schema, with jsonschema's words."""
    import jsonschema

    try:
        validator = jsonschema.validators.validator_for(
            schema, default=jsonschema.Draft202012Validator
        )
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise GrammarError(f"invalid JSON schema at {where}: {exc.message}") from None


def _grammar_text(spec: StructuredOutputsParams) -> str:
    """The spec as the library's grammar definition (may raise ``GrammarError``)."""
    from llguidance import LLMatcher, regex_to_lark
    from llguidance.gbnf_to_lark import any_to_lark

    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = spec.json if kind == "json" else {"type": "object"}
        if kind == "json":
            _check_json_schema(schema)
        options = COMPACT_JSON if spec.disable_any_whitespace else JSON_LAYOUT
        return LLMatcher.grammar_from_json_schema(schema, overrides=options)  # type: ignore[arg-type]
    if kind == "regex":
        # \d means [0-9], as in a JSON schema's pattern (ECMA-262), not any Unicode digit.
        try:
            regex = regex_to_lark(spec.regex, "d")  # type: ignore[arg-type]
        except Exception as exc:
            raise GrammarError(f"invalid regex: {exc}") from None
        return LLMatcher.grammar_from_regex(regex)
    if kind == "choice":
        choices = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)  # type: ignore[union-attr]
        return LLMatcher.grammar_from_lark(f"start: {choices}")
    try:  # EBNF as GBNF writes it (or Lark, which passes through)
        return LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))  # type: ignore[arg-type]
    except Exception as exc:
        raise GrammarError(f"invalid grammar: {exc}") from None


_WHAT = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex"}


class GrammarMatcher:
    """One request's position in its grammar: which tokens may come next; advanced with each
    accepted token. Kept with the request through preemption (its tokens are kept too)."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, bitmask, row)
        if self._matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self._matcher.get_error()}")

    def accept(self, token: int) -> bool:
        return bool(self._matcher.consume_token(token)) and not self._matcher.is_error()

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return bool(self._matcher.is_stopped())


class StructuredOutputCompiler:
    """Compiles specs for one tokenizer and caches the results (thread-safe)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: list[int],
        *,
        cache_size: int = 256,
        compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
        compile_threads: int = 2,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.cache_size = cache_size
        self.compile_timeout_s = compile_timeout_s
        self._compile_threads = compile_threads
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._in_flight: dict[tuple, Future] = {}
        self._tokens: Any = None
        self._pool: ThreadPoolExecutor | None = None

    # ---- the library's token table, built on first use (~0.2-0.5 s) ----------------------
    def _token_table(self) -> Any:
        with self._lock:
            if self._tokens is None:
                if self.tokenizer is None:
                    raise GrammarError("structured output needs the model's tokenizer")
                import llguidance.hf

                self._tokens = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size, eos_token=self.stop_token_ids or None
                )
            return self._tokens

    def _compile_uncached(self, spec: StructuredOutputsParams) -> Any:
        from llguidance import LLMatcher

        tokens = self._token_table()
        try:
            grammar = _grammar_text(spec)
        except ValueError as exc:  # GrammarError, or the library refusing the input's shape
            if isinstance(exc, GrammarError):
                raise
            raise GrammarError(f"invalid {_WHAT.get(spec.kind, spec.kind)}: {exc}") from None
        matcher = LLMatcher(tokens, grammar, log_level=0)  # builds it (GIL released)
        # The lexer is built lazily, state by state: compute the first mask here, off the
        # engine thread, so a request's first step does not pay for it (copies share it).
        matcher.compute_bitmask()
        if matcher.is_error():
            what = _WHAT.get(spec.kind, spec.kind)
            message = matcher.get_error().strip()
            if "Unimplemented keys" in message or "oneOf" in message:
                message += (
                    " (structured output enforces a schema exactly or not at all: drop or "
                    "rewrite what it cannot enforce, e.g. oneOf → anyOf)"
                )
            raise GrammarError(f"invalid {what}: {message}")
        return matcher

    # ---- the cache ----------------------------------------------------------------------
    def cached(self, spec: StructuredOutputsParams) -> Any | None:
        key = spec.key()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
            return compiled

    def _remember(self, key: tuple, compiled: Any) -> None:
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of ``spec`` (from the cache, or compiled now: blocking)."""
        compiled = self.cached(spec)
        if compiled is None:
            compiled = self._compile_uncached(spec)
            self._remember(spec.key(), compiled)
        return compiled

    def _submit(self, spec: StructuredOutputsParams) -> Future:
        """One compile per spec at a time, however many requests ask for it."""
        key = spec.key()
        with self._lock:
            future = self._in_flight.get(key)
            if future is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        self._compile_threads, thread_name_prefix="kvmesh-grammar"
                    )
                future = self._pool.submit(self.compile, spec)
                self._in_flight[key] = future
                future.add_done_callback(lambda _: self._in_flight.pop(key, None))
            return future

    async def compile_async(self, spec: StructuredOutputsParams) -> Any:
        """``compile`` on a worker thread, refused if it takes over ``compile_timeout_s``
        (the compile goes on and is cached when done; the request is not kept waiting)."""
        compiled = self.cached(spec)
        if compiled is not None:
            return compiled
        future = asyncio.wrap_future(self._submit(spec))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.compile_timeout_s)
        except TimeoutError:
            raise GrammarError(
                f"the {spec.kind} could not be compiled within {self.compile_timeout_s:g} s: "
                "simplify it (fewer nested alternatives, shorter patterns)"
            ) from None

    def matcher(self, spec: StructuredOutputsParams) -> GrammarMatcher:
        """A fresh matcher for one request (a copy of the compiled one: microseconds)."""
        return GrammarMatcher(self.compile(spec).deep_copy())

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """An int32 bitmask of ``rows`` rows, one bit per vocabulary entry (1: allowed)."""
        return torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
