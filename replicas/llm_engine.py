"""The engine: requests in, a step at a time, outputs out. One process, no Ray."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvmesh.replicas import capacity
from kvmesh.replicas.chat import encode_chat
from kvmesh.replicas.config import EngineArgs, ModelArchConfig
from kvmesh.replicas.detokenizer import Detokenizer
from kvmesh.replicas.kv.events import KVEvent
from kvmesh.replicas.kv.manager import KVCacheManager
from kvmesh.replicas.loader import load_model
from kvmesh.replicas.model_files import resolve_model_dir
from kvmesh.replicas.model_runner import (
    ModelRunner,
    allocate_kv_cache,
    kv_bytes_per_block,
    prepare_inputs,
)
from kvmesh.replicas.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kvmesh.replicas.request import Request
from kvmesh.replicas.sampler import sample
from kvmesh.replicas.sampling_params import SamplingParams
from kvmesh.replicas.scheduler import Scheduler

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = capacity.DEFAULT_CPU_KV_BYTES
Prompt = str | list[int] | dict[str, Any]


def pick_device(args: EngineArgs) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(args: EngineArgs, cfg: ModelArchConfig, device: torch.device) -> torch.dtype:
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls are 3-9x slower on CPUs without AVX-512 BF16
    return torch.float16 if cfg.torch_dtype == "float16" else torch.bfloat16


def load_tokenizer(path: Path):
    """The model's tokenizer, or None when the directory has none (prompts as token ids)."""
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class LLMEngine:
    def __init__(self, args: EngineArgs | None = None, **kwargs: Any) -> None:
        args = args or EngineArgs(**kwargs)
        self.args = args
        start = time.perf_counter()
        # Seconds per start-up phase (model_files, load_weights, kv_cache; the warm-up adds
        # kernels and warmup): the replica's start-up time, for metrics and autoscaling.
        self.startup_phases: dict[str, float] = {}
        self.model_dir = resolve_model_dir(args.model)
        self.arch = ModelArchConfig.from_dir(self.model_dir)
        self.model_name = args.served_model_name or (args.model or "SmolLM2-135M-Instruct")
        self.tokenizer = load_tokenizer(Path(args.tokenizer) if args.tokenizer else self.model_dir)
        self.device = pick_device(args)
        self.dtype = pick_dtype(args, self.arch, self.device)
        self.max_model_len = args.max_model_len or self.arch.max_position_embeddings
        if not args.enable_chunked_prefill and (
            args.max_num_batched_tokens is not None
            and args.max_num_batched_tokens < self.max_model_len
        ):
            raise ValueError(
                f"with enable_chunked_prefill=False, max_num_batched_tokens "
                f"({args.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len})"
            )
        torch.manual_seed(args.seed)
        self.startup_phases["model_files"] = time.perf_counter() - start
        built = time.perf_counter()
        self.runner, num_blocks = self._build_runner()
        if "load_weights" not in self.startup_phases:  # an override (tensor parallel): one phase
            self.startup_phases["load_weights"] = time.perf_counter() - built
        self.kv = KVCacheManager(
            num_blocks,
            args.block_size,
            args.enable_prefix_caching,
            extra_keys=(self.model_name,),
            sliding_window=self.arch.sliding_window,
        )
        self.scheduler = Scheduler(
            self.kv, args.max_num_seqs, args.max_num_batched_tokens, args.enable_chunked_prefill
        )
        self.eos_token_ids = self._eos_ids()
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, Detokenizer] = {}
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(args.seed)
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.num_failed_requests = 0
        self.last_step_prefill_tokens = 0
        self.last_step_decodes = 0
        self.fault_injector: Callable[[str, Request], None] | None = None
        self.load_seconds = time.perf_counter() - start

    # ---- setup helpers ------------------------------------------------------------------
    def _build_runner(self) -> tuple[ModelRunner, int]:
        """Load the model and its KV cache in this process; returns (runner, num_blocks).

        ``TPEngine`` overrides this to spread the model and cache over tensor-parallel ranks.
        """
        args = self.args
        start = time.perf_counter()
        self.model = load_model(
            self.model_dir, self.arch, self.dtype, self.device, self.max_model_len
        )
        self.startup_phases["load_weights"] = time.perf_counter() - start
        start = time.perf_counter()
        num_blocks = self._num_kv_blocks()
        kv_caches = allocate_kv_cache(
            self.arch, num_blocks, args.block_size, self.dtype, args.kv_cache_dtype, self.device
        )
        self.startup_phases["kv_cache"] = time.perf_counter() - start
        return ModelRunner(self.model, kv_caches, self.device), num_blocks

    def _num_kv_blocks(self, num_kv_heads: int | None = None) -> int:
        """Blocks in the pool; ``num_kv_heads`` is this process's share (tensor parallel)."""
        args = self.args
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks + 1  # + the null block
        per_block = kv_bytes_per_block(
            self.arch, args.block_size, self.dtype, args.kv_cache_dtype, num_kv_heads
        )
        budget = args.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info()
                budget = capacity.kv_budget_from_free(free)  # the rest: activations
            else:
                # No more than every sequence at full length could use.
                budget = capacity.default_cpu_kv_budget(
                    per_block, args.max_num_seqs, self.max_model_len, args.block_size
                )
        num = capacity.kv_blocks_that_fit(budget, per_block)
        if num < 2:
            raise ValueError(
                f"kv_cache_memory_bytes={budget} holds fewer than 2 blocks of {per_block} bytes"
            )
        return int(num)

    def _eos_ids(self) -> list[int]:
        ids = set(self.arch.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    # ---- requests -----------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "this model directory has no tokenizer: pass {'prompt_token_ids': [...]}"
                )
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {prompt!r}")

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)[1]

    def validate(self, token_ids: list[int], params: SamplingParams) -> int:
        """Check a request; return its effective max_tokens. Raises ValueError on bad input."""
        if not token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.arch.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad} is outside [0, {vocab})")
        n = len(token_ids)
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt is {n} tokens; the model's context (max_model_len) is "
                f"{self.max_model_len}, so prompts may have at most {self.max_model_len - 1}"
            )
        max_tokens = self.max_model_len - n
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        capacity = self.kv.capacity_tokens
        if n + max_tokens > capacity:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the whole KV cache "
                f"({capacity} tokens): lower max_tokens or raise num_kv_blocks / "
                f"kv_cache_memory_bytes"
            )
        if params.stop_token_ids and any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        return max_tokens

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> str:
        """Queue a request. Everything that can fail runs before the engine records it, so a
        refused request (``ValueError`` for bad input) leaves no trace."""
        params = params or SamplingParams()
        if prompt_token_ids is None:
            text, token_ids = self.tokenize(prompt)
        else:
            text, token_ids = (prompt if isinstance(prompt, str) else None), prompt_token_ids
        max_tokens = self.validate(token_ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seed = (
            params.seed
            if params.seed is not None
            else int(torch.randint(0, 2**62, (1,), generator=self._rng))
        )
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        req = Request(request_id, token_ids, params, max_tokens, prompt=text, generator=gen)
        detok = None
        if self.tokenizer is not None:
            detok = Detokenizer(
                self.tokenizer.backend_tokenizer,
                token_ids,
                params.stop_strings,
                params.skip_special_tokens,
                params.include_stop_str_in_output,
            )
        self.requests[request_id] = req
        if detok is not None:
            self._detok[request_id] = detok
        self.scheduler.add(req)
        self.num_prompt_tokens += len(token_ids)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (or None)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        req.finish_reason = "abort"
        self.scheduler.finish(req)
        return self._finish(req, [], None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and return each touched request's output.

        Faults are split by whose they are. The model forward is the replica's: if it raises,
        the step raises and the caller treats the engine as broken. Everything done for one
        request after it (registering its filled blocks, sampling its row, detokenising, stop
        checks, building its output) is that request's: a fault there fails it alone
        (``finish_reason == "error"``, blocks freed) and the batch carries on.
        """
        sched = self.scheduler.schedule()
        if not sched:
            return []
        self.num_steps += 1
        self.last_step_prefill_tokens = sum(n for _, n in sched.scheduled if n > 1)
        self.last_step_decodes = sum(1 for _, n in sched.scheduled if n == 1)
        inputs = prepare_inputs(
            sched.scheduled,
            [self.kv.block_ids(r) for r, _ in sched.scheduled],
            self.args.block_size,
            self.device,
        )
        logits = self.runner.execute(inputs)
        outputs: list[RequestOutput] = []
        for req, n in sched.scheduled:
            self.scheduler.advance(req, n)
            try:
                self._inject("cache_blocks", req)
                self.kv.cache_full_blocks(req)
            except Exception as exc:
                outputs.append(self._fail_request(req, "cache_blocks", exc))
        if inputs.sampling_requests:
            results = sample(logits, inputs.sampling_requests, self.eos_token_ids)
            now = time.monotonic()
            for req, result in zip(inputs.sampling_requests, results, strict=True):
                if req.finished:  # failed above
                    continue
                try:
                    self._inject("sample", req)
                    if isinstance(result, Exception):
                        raise result
                    outputs.append(self._append_token(req, *result, now))
                except Exception as exc:
                    outputs.append(self._fail_request(req, "sample", exc))
        for req, _ in sched.scheduled:
            if not req.finished:
                try:
                    self.kv.free_outside_window(req)
                except Exception as exc:
                    outputs.append(self._fail_request(req, "free_window", exc))
        return outputs

    def _inject(self, phase: str, req: Request) -> None:
        """Test-only fault injection: ``fault_injector(phase, request)`` may raise."""
        if self.fault_injector is not None:
            self.fault_injector(phase, req)

    def _fail_request(self, req: Request, phase: str, exc: BaseException) -> RequestOutput:
        """End ``req`` alone after a fault in its own processing; its blocks return to the pool.

        The client gets a short message with an id to find the details in the replica's log;
        the exception text itself stays in the log (it may hold internals).
        """
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "request %s failed in %s (error id %s)",
            req.request_id,
            phase,
            error_id,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        self.num_failed_requests += 1
        req.finish_reason = "error"
        if not req.finished:
            self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)
        self._detok.pop(req.request_id, None)
        message = (
            f"the server failed while generating this request (error id {error_id}); "
            "other requests were not affected"
        )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[CompletionOutput(0, "", req.output_token_ids, finish_reason="error")],
            finished=True,
            metrics=RequestMetrics(req.arrival_time, req.first_token_time, time.monotonic()),
            error=message,
            num_output_tokens=req.num_output_tokens,
        )

    def _append_token(
        self, req: Request, token: int, lp: dict[int, float] | None, now: float
    ) -> RequestOutput:
        req.token_ids.append(token)
        self.num_generated_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = now
        req.token_times.append(now)
        if lp is not None:
            req.logprobs.append(lp)
        p = req.params
        stop_str = None
        detok = self._detok.get(req.request_id)
        if detok is not None:
            self._inject("detokenize", req)
            stop_str = detok.add_token(token)
        if (
            not p.ignore_eos
            and token in self.eos_token_ids
            and req.num_output_tokens > p.min_tokens - 1
        ):
            req.finish_reason = "stop"
        elif p.stop_token_ids and token in p.stop_token_ids:
            req.finish_reason, req.stop_reason = "stop", token
        elif stop_str is not None:
            req.finish_reason, req.stop_reason = "stop", stop_str
        elif req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            req.finish_reason = "length"
        self._inject("output", req)
        if req.finish_reason is not None:
            self.scheduler.finish(req)
            return self._finish(req, [token], lp)
        return self._output(req, [token], lp)

    def _finish(self, req: Request, new_tokens: list[int], lp) -> RequestOutput:
        out = self._output(req, new_tokens, lp)
        self.requests.pop(req.request_id, None)
        self._detok.pop(req.request_id, None)
        return out

    def _output(self, req: Request, new_tokens: list[int], lp) -> RequestOutput:
        """This step's output for ``req``: the delta, and the whole generation once finished.

        Nothing here is proportional to the generation so far except the one-off copy of the
        finished output: a stream of n tokens costs O(n) in all, not O(n^2).
        """
        finished = req.finish_reason is not None
        detok = self._detok.get(req.request_id)
        delta = detok.delta(finished) if detok else ""
        delta_lps = [lp] if lp is not None else None
        if finished:
            completion = CompletionOutput(
                index=0,
                text=detok.text if detok else "",
                token_ids=req.output_token_ids,
                finish_reason=req.finish_reason,
                stop_reason=req.stop_reason,
                logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
            )
            metrics = RequestMetrics(
                arrival_time=req.arrival_time,
                first_token_time=req.first_token_time,
                finished_time=time.monotonic(),
                token_times=list(req.token_times),
            )
        else:
            completion = CompletionOutput(
                index=0, text=delta, token_ids=new_tokens, logprobs=delta_lps
            )
            metrics = RequestMetrics(req.arrival_time, req.first_token_time)
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            metrics=metrics,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            delta_text=delta,
            delta_token_ids=new_tokens,
            delta_logprobs=delta_lps,
            num_output_tokens=req.num_output_tokens,
        )

    # ---- introspection ------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "kv_blocks_total": self.kv.num_blocks_total,
            "kv_blocks_free": self.kv.num_blocks_free,
            "kv_cache_usage": self.kv.usage,
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "pending_prefill_tokens": self.pending_prefill_tokens(),
            "prefix_cache_queries": self.kv.prefix_cache_queries,
            "prefix_cache_hits": self.kv.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_steps": self.num_steps,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generated_tokens,
            "num_failed_requests": self.num_failed_requests,
        }

    def pending_prefill_tokens(self) -> int:
        """Prompt tokens admitted but not computed yet: the prefill work queued ahead of a
        new request (what a load-aware router needs; a count of waiting requests says
        nothing about whether they hold 20 tokens to compute or 4,000).

        Waiting requests count their prompt minus what the prefix cache holds of it, looked
        up once per request (an estimate: the cache may change before it is admitted). The
        scheduler keeps the sum as requests arrive, advance and leave, so reading it after
        every step costs nothing like a walk over every request.
        """
        return self.scheduler.pending_prefill_tokens()

    def drain_kv_events(self) -> list[KVEvent]:
        return self.kv.drain_events()

    # ---- lifecycle (no-ops here; TPEngine has workers to watch and stop) -----------------
    def check_health(self) -> None:
        """Raise if the engine can no longer serve; a single-process engine always can."""

    def shutdown(self) -> None:
        """Release what the engine holds beyond its own memory (nothing, in one process)."""
