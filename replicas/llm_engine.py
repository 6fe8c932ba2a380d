"""The engine: requests in, a step at a time, outputs out. One process, no Ray.

A step is schedule → execute → update → outputs: the scheduler (which owns every request's
life and, through the KV-cache manager, its blocks) says what to compute; the runner computes
it and samples; the scheduler applies the result (tokens, stops, blocks); the output processor
detokenises and builds the outputs. Input processing (tokenise, chat template, validation,
default ``max_tokens``) runs before a request is queued. ``docs/architecture.md`` has the
picture.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from kvmesh.replicas import capacity
from kvmesh.replicas.block_hash import BlockHasher
from kvmesh.replicas.engine_args import EngineArgs
from kvmesh.replicas.input_processor import (
    InputProcessor,
    Prompt,
    load_tokenizer,
    served_model_name,
)
from kvmesh.replicas.kv.events import KVEvent
from kvmesh.replicas.kv.manager import KVCacheManager
from kvmesh.replicas.loader import load_model
from kvmesh.replicas.model_arch import ModelArchConfig
from kvmesh.replicas.model_files import resolve_model_dir
from kvmesh.replicas.model_runner import (
    ModelRunner,
    allocate_kv_cache,
    kv_bytes_per_block,
    kv_storage_dtype,
)
from kvmesh.replicas.output_processor import OutputProcessor
from kvmesh.replicas.outputs import RequestOutput
from kvmesh.replicas.request import Request
from kvmesh.replicas.sampling_params import SamplingParams
from kvmesh.replicas.scheduler import FaultInjector, Scheduler
from kvmesh.replicas.step_threads import StepThreads
from kvmesh.replicas.structured import StructuredOutputCompiler

log = logging.getLogger(__name__)


def pick_device(args: EngineArgs) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


CPU_AUTO_DTYPE_ENV = "KVMESH_CPU_AUTO_DTYPE"
"""What ``dtype="auto"`` means on a CPU: ``bfloat16``, ``float32``, or unset (``bfloat16``
where the CPU multiplies it natively, else ``float32``)."""


def cpu_auto_dtype() -> torch.dtype:
    """``dtype="auto"`` on this CPU. bfloat16 where it has AMX-BF16 or AVX-512-BF16 (its
    linear layers run 3-5x faster there); float32 elsewhere (bfloat16 is 3-9x *slower*
    without them), and float32 is the exact mode: greedy output token-identical to
    transformers in float32. ``KVMESH_CPU_AUTO_DTYPE`` overrides the choice."""
    forced = os.environ.get(CPU_AUTO_DTYPE_ENV, "").strip().lower()
    if forced in ("float32", "bfloat16"):
        return getattr(torch, forced)
    if forced:
        raise ValueError(f"{CPU_AUTO_DTYPE_ENV} must be float32 or bfloat16, got {forced!r}")
    from kvmesh.kernels import cpu_has_fast_bf16

    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def pick_dtype(args: EngineArgs, cfg: ModelArchConfig, device: torch.device) -> torch.dtype:
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    if device.type == "cpu":
        return cpu_auto_dtype()
    return torch.float16 if cfg.torch_dtype == "float16" else torch.bfloat16


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
        self.model_name = served_model_name(args)
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
        self.eos_token_ids = self._eos_ids()
        self.startup_phases["model_files"] = time.perf_counter() - start
        built = time.perf_counter()
        self.runner, num_blocks = self._build_runner()
        if "load_weights" not in self.startup_phases:  # an override (tensor parallel): one phase
            self.startup_phases["load_weights"] = time.perf_counter() - built
        hasher = BlockHasher.for_model(self.model_name, args.block_size)
        self.kv = KVCacheManager(
            num_blocks,
            hasher,
            args.enable_prefix_caching,
            sliding_window=self.arch.sliding_window,
        )
        self.input_processor = InputProcessor(
            self.tokenizer,
            self.arch.vocab_size,
            self.max_model_len,
            hasher,
            kv_capacity_tokens=self.kv.capacity_tokens,
        )
        self.structured = StructuredOutputCompiler(
            self.tokenizer,
            self.arch.vocab_size,
            self.eos_token_ids,
            compile_timeout_s=args.structured_outputs_compile_timeout_s,
        )
        self.scheduler = Scheduler(
            self.kv,
            args.max_num_seqs,
            args.max_num_batched_tokens,
            args.enable_chunked_prefill,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            allocate_bitmask=self.structured.allocate_bitmask,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
            max_long_partial_prefills=args.max_long_partial_prefills,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(args.seed)
        self.num_steps = 0
        self.num_prompt_tokens = 0
        self.last_step_prefill_tokens = 0
        self.last_step_decodes = 0
        # Set by a replica that shares its cores with Serve: threads sized per step's work.
        self.step_threads: StepThreads | None = None

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
        runner = ModelRunner(
            self.model, kv_caches, self.device, args.block_size, self.eos_token_ids
        )
        return runner, num_blocks

    def _num_kv_blocks(self, num_kv_heads: int | None = None) -> int:
        """Blocks in the pool; ``num_kv_heads`` is this process's share (tensor parallel)."""
        args = self.args
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks + 1  # + the null block
        per_block = kv_bytes_per_block(
            self.arch,
            args.block_size,
            kv_storage_dtype(self.dtype, self.device),
            args.kv_cache_dtype,
            num_kv_heads,
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
    @property
    def requests(self) -> dict[str, Request]:
        """Requests not finished yet (waiting or running), by id."""
        return self.scheduler.requests

    @property
    def fault_injector(self) -> FaultInjector | None:
        """Test-only: ``fault_injector(phase, request)`` may raise to fail that request in
        that phase: ``cache_blocks`` and ``sample`` (the scheduler's update), ``detokenize``
        and ``output`` (the output processor)."""
        return self.scheduler.fault_injector

    @fault_injector.setter
    def fault_injector(self, injector: FaultInjector | None) -> None:
        self.scheduler.fault_injector = injector
        self.output_processor.fault_injector = injector

    def add_request(
        self,
        prompt: Prompt | None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> str:
        """Queue a request. Everything that can fail runs before the engine records it, so a
        refused request (``ValueError`` for bad input) leaves no trace."""
        params = params or SamplingParams()
        checked = self.input_processor.process(prompt, params, prompt_token_ids)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        grammar = None
        if params.structured_outputs is not None:  # compiled already unless offline
            grammar = self.structured.matcher(params.structured_outputs)
        seed = (
            params.seed
            if params.seed is not None
            else int(torch.randint(0, 2**62, (1,), generator=self._rng))
        )
        self.output_processor.add(request_id, checked.prompt, checked.token_ids, params)
        req = Request(
            request_id,
            checked.token_ids,
            params,
            checked.max_tokens,
            seed=None if params.greedy else seed,
            grammar=grammar,
        )
        self.scheduler.add(req)
        self.num_prompt_tokens += len(checked.token_ids)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (or None)."""
        if not self.scheduler.finish_requests([request_id], "abort"):
            return None
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once (and sample), apply the result, build the outputs.

        Faults are split by whose they are. The runner's model forward is the replica's: if
        it raises, the step raises and the caller treats the engine as broken. Everything
        done for one request after it (in the scheduler's update and the output processor)
        is that request's: a fault there fails it alone (``finish_reason == "error"``, blocks
        freed) and the batch carries on.
        """
        sched = self.scheduler.schedule()
        if not sched:
            return []
        self.num_steps += 1
        self.last_step_prefill_tokens = sched.num_prefill_tokens
        self.last_step_decodes = sched.num_decodes
        if self.step_threads is not None:
            self.step_threads.apply(self.last_step_prefill_tokens + self.last_step_decodes)
        result = self.runner.execute(sched)
        updates = self.scheduler.update_from_output(sched, result)
        processed = self.output_processor.process(updates)
        for request_id, stop_str in processed.stopped.items():
            self.scheduler.finish_requests([request_id], "stop", stop_str)
        self.scheduler.finish_requests(processed.failed, "error")
        return processed.outputs

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
            "generation_tokens": self.scheduler.num_generated_tokens,
            "num_failed_requests": self.output_processor.num_failed_requests,
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

    def enable_kv_events(self) -> None:
        """Record KV-cache events from now on (for a consumer that drains them; an engine
        records none otherwise, so nothing piles up)."""
        self.kv.record_events(True)

    def drain_kv_events(self) -> list[KVEvent]:
        """Events since the last drain ([] unless ``enable_kv_events`` was called)."""
        return self.kv.drain_events()

    def cached_block_hashes(self) -> set[bytes]:
        """Every block the prefix cache holds now (a consumer's snapshot)."""
        return self.kv.cached_block_hashes()

    # ---- lifecycle (no-ops here; TPEngine has workers to watch and stop) -----------------
    def check_health(self) -> None:
        """Raise if the engine can no longer serve; a single-process engine always can."""

    def shutdown(self) -> None:
        """Release what the engine holds beyond its own memory (in one process: the
        grammar compiler's threads)."""
        structured = getattr(self, "structured", None)  # None: __init__ failed before it
        if structured is not None:
            structured.close()
