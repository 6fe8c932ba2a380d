"""Memory arithmetic: weight bytes and KV bytes per tensor-parallel rank, and how many KV
blocks, tokens and requests fit. ``kvmesh plan`` and the engine use these same functions, so a
plan is what the engine would allocate.

The formulas (per TP rank, ``tp`` = tensor-parallel size):

* **KV bytes per token** = ``layers × kv_heads_per_rank × 2 (K and V) × head_dim × bytes``,
  with ``kv_heads_per_rank = kv_heads // tp`` (1 when ``kv_heads < tp``: each rank then holds
  a replica of the one KV head its query heads use). A quantised cache (``fp8``/``int8``)
  stores one byte per value plus a float32 scale per head and token:
  ``layers × kv_heads_per_rank × 2 × (head_dim + 4)``.
* **KV bytes per block** = ``block_size ×`` KV bytes per token.
* **Parameters per rank** (the Llama family as kvmesh shards it, ``replicas/tp/layers.py``):
  the embedding and (unless tied) the LM head are vocabulary-parallel, ``ceil(vocab / tp)``
  rows each; Q/K/V and gate/up are column-parallel, O and down row-parallel (each split by
  ``tp``); K/V hold ``kv_heads_per_rank`` heads; the two RMSNorms per layer and the final
  norm are replicated; Q/K/V biases (Qwen2) are split with their weights.
* **KV budget** (what the engine does on a GPU, ``LLMEngine._num_kv_blocks``): the cache
  takes ``KV_FREE_MEMORY_FRACTION`` (0.85) of the memory still free once the weights are
  loaded; the other 15 % is the activation reserve (the step's activations, logits, the
  sampler, allocator slack). The engine measures the free memory (``torch.cuda.mem_get_info``);
  a plan estimates it as ``gpu_memory − weights_per_rank − runtime_overhead``, where the
  runtime overhead (``DEFAULT_RUNTIME_OVERHEAD_BYTES``, 512 MiB) stands for the CUDA context,
  the RoPE table and the library workspaces that are already used when the engine measures.
* **Blocks** = ``budget // bytes_per_block``; block 0 is the null block, so
  ``tokens that fit = (blocks − 1) × block_size`` and a request of ``L`` tokens needs
  ``ceil(L / block_size)`` blocks.

This module imports no torch, so ``kvmesh plan`` starts at once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvmesh.replicas.model_arch import ModelArchConfig

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
QUANTIZED_KV_DTYPES = ("fp8", "int8")  # one byte per value + a float32 scale per head
KV_SCALE_BYTES = 4
KV_FREE_MEMORY_FRACTION = 0.85
DEFAULT_RUNTIME_OVERHEAD_BYTES = 512 << 20
DEFAULT_CPU_KV_BYTES = 2 << 30


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-family model that decide its memory."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    attention_bias: bool = False
    max_position_embeddings: int = 8192
    torch_dtype: str | None = None

    @classmethod
    def from_arch(cls, cfg: ModelArchConfig, name: str = "") -> ModelShape:
        return cls(
            name=name or cfg.architecture,
            layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            vocab=cfg.vocab_size,
            tied_embeddings=cfg.tie_word_embeddings,
            attention_bias=cfg.attention_bias,
            max_position_embeddings=cfg.max_position_embeddings,
            torch_dtype=cfg.torch_dtype,
        )

    @classmethod
    def from_config(cls, raw: dict[str, Any], name: str = "") -> ModelShape:
        """From a Hugging Face ``config.json`` dict, parsed exactly as the engine parses it."""
        return cls.from_arch(ModelArchConfig.from_dict(raw), name)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelShape:
        """From a model directory (or its ``config.json``)."""
        path = Path(model_dir).expanduser()
        if path.is_file() and path.suffix == ".json":
            return cls.from_config(json.loads(path.read_text()), path.parent.name)
        return cls.from_arch(ModelArchConfig.from_dir(path), path.name)

    @classmethod
    def named(cls, name: str) -> ModelShape:
        try:
            return NAMED_SHAPES[name.lower()]
        except KeyError:
            known = ", ".join(NAMED_SHAPES)
            raise ValueError(f"unknown shape {name!r}; known: {known}") from None


# The published Hugging Face configs of these models.
NAMED_SHAPES: dict[str, ModelShape] = {
    "smollm2-135m": ModelShape(
        name="smollm2-135m",
        layers=30,
        hidden=576,
        intermediate=1536,
        heads=9,
        kv_heads=3,
        head_dim=64,
        vocab=49152,
        tied_embeddings=True,
        max_position_embeddings=8192,
        torch_dtype="bfloat16",
    ),
    "llama-3-8b": ModelShape(
        name="llama-3-8b",
        layers=32,
        hidden=4096,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=128256,
        tied_embeddings=False,
        max_position_embeddings=8192,
        torch_dtype="bfloat16",
    ),
    "llama-3-70b": ModelShape(
        name="llama-3-70b",
        layers=80,
        hidden=8192,
        intermediate=28672,
        heads=64,
        kv_heads=8,
        head_dim=128,
        vocab=128256,
        tied_embeddings=False,
        max_position_embeddings=8192,
        torch_dtype="bfloat16",
    ),
}


# ---- tensor parallel -------------------------------------------------------------------------
def check_tp(shape: ModelShape, tp: int) -> None:
    """The rules of ``replicas/tp/layers.check_tp_size``, on a shape."""
    problems = []
    if tp < 1:
        problems.append("it must be at least 1")
    else:
        if shape.heads % tp:
            problems.append(f"{shape.heads} attention heads are not divisible by it")
        if shape.kv_heads % tp and tp % shape.kv_heads:
            problems.append(f"{shape.kv_heads} KV heads neither divide it nor are divisible by it")
        if shape.intermediate % tp:
            problems.append(f"intermediate size {shape.intermediate} is not divisible by it")
    if problems:
        raise ValueError(
            f"tensor_parallel_size={tp} does not fit {shape.name}: " + "; ".join(problems)
        )


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    """KV heads one rank holds (as ``TPShard.plan``): a share, or one replicated head."""
    return kv_heads // tp if kv_heads >= tp else 1


# ---- weights -----------------------------------------------------------------------------------
def param_count(shape: ModelShape, tp: int = 1) -> int:
    """Parameters one rank holds (``tp=1``: the whole model; the vocabulary-parallel embedding
    and LM head are zero-padded to ``ceil(vocab / tp)`` rows on every rank)."""
    check_tp(shape, tp)
    h = shape.hidden
    q = shape.heads // tp * shape.head_dim
    kv = kv_heads_per_rank(shape.kv_heads, tp) * shape.head_dim
    inter = shape.intermediate // tp
    vocab_rows = -(-shape.vocab // tp)
    attention = h * (q + 2 * kv) + q * h  # q, k, v (column-parallel) and o (row-parallel)
    if shape.attention_bias:
        attention += q + 2 * kv
    mlp = h * inter * 2 + inter * h  # gate, up (column-parallel) and down (row-parallel)
    norms = 2 * h
    embeddings = vocab_rows * h * (1 if shape.tied_embeddings else 2)
    return embeddings + shape.layers * (attention + mlp + norms) + h  # + the final norm


def weight_bytes(shape: ModelShape, dtype_bytes: int, tp: int = 1) -> int:
    """Bytes of weights on one rank."""
    return param_count(shape, tp) * dtype_bytes


# ---- KV cache ----------------------------------------------------------------------------------
def kv_bytes_per_token(
    shape: ModelShape,
    dtype_bytes: int,
    tp: int = 1,
    kv_cache_dtype: str = "auto",
    num_kv_heads: int | None = None,
) -> int:
    """KV bytes one token takes on one rank, all layers, K and V (plus scales if quantised).

    ``dtype_bytes``: the model dtype's size (the cache's, when ``kv_cache_dtype="auto"``);
    ``num_kv_heads``: this rank's KV heads, if known (otherwise derived from ``tp``)."""
    heads = num_kv_heads or kv_heads_per_rank(shape.kv_heads, tp)
    if kv_cache_dtype == "auto":
        per_head = shape.head_dim * dtype_bytes
    elif kv_cache_dtype in QUANTIZED_KV_DTYPES:
        per_head = shape.head_dim * 1 + KV_SCALE_BYTES
    else:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}")
    return shape.layers * heads * 2 * per_head


def kv_bytes_per_block(
    shape: ModelShape,
    block_size: int,
    dtype_bytes: int,
    tp: int = 1,
    kv_cache_dtype: str = "auto",
    num_kv_heads: int | None = None,
) -> int:
    return block_size * kv_bytes_per_token(shape, dtype_bytes, tp, kv_cache_dtype, num_kv_heads)


def kv_budget_from_free(free_bytes: int, fraction: float = KV_FREE_MEMORY_FRACTION) -> int:
    """The KV cache's share of the memory free after the weights (the rest: activations)."""
    return int(free_bytes * fraction)


def default_cpu_kv_budget(
    bytes_per_block: int, max_num_seqs: int, max_model_len: int, block_size: int
) -> int:
    """On a CPU: ``DEFAULT_CPU_KV_BYTES``, or less when every sequence at full length needs less."""
    cap = max_num_seqs * max_model_len // block_size + 1
    return min(DEFAULT_CPU_KV_BYTES, cap * bytes_per_block)


def kv_blocks_that_fit(budget_bytes: int, bytes_per_block: int) -> int:
    """Blocks (the null block included) that ``budget_bytes`` holds."""
    return budget_bytes // bytes_per_block


# ---- the plan ----------------------------------------------------------------------------------
def resolve_dtype(dtype: str, shape: ModelShape) -> str:
    """``auto`` as the engine picks it on a GPU: float16 if the checkpoint is, else bfloat16."""
    if dtype == "auto":
        return "float16" if shape.torch_dtype == "float16" else "bfloat16"
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: auto, {', '.join(DTYPE_BYTES)}")
    return dtype


@dataclass(frozen=True)
class Plan:
    """Every number is per tensor-parallel rank (one GPU) unless named otherwise."""

    model: str
    tensor_parallel_size: int
    dtype: str
    kv_cache_dtype: str
    block_size: int
    gpu_memory_bytes: int | None
    kv_fraction_of_free: float
    runtime_overhead_bytes: int
    params_total: int
    params_per_rank: int
    weight_bytes_per_rank: int
    kv_heads_per_rank: int
    kv_bytes_per_token: int
    kv_bytes_per_block: int
    free_bytes_after_weights: int | None
    kv_budget_bytes: int
    num_kv_blocks: int  # allocated, the null block included
    kv_cache_bytes: int  # allocated: num_kv_blocks × kv_bytes_per_block
    tokens_that_fit: int
    request_len: int
    blocks_per_request: int
    concurrent_requests: int
    gpus_per_node: int
    replicas_per_node: int

    @property
    def fits(self) -> bool:
        return self.num_kv_blocks >= 2 and self.concurrent_requests >= 1

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "fits": self.fits}


def plan(
    shape: ModelShape,
    *,
    gpu_memory_bytes: int | None = None,
    kv_cache_memory_bytes: int | None = None,
    kv_fraction_of_free: float = KV_FREE_MEMORY_FRACTION,
    tp: int = 1,
    dtype: str = "auto",
    kv_cache_dtype: str = "auto",
    block_size: int = 16,
    request_len: int | None = None,
    gpus_per_node: int = 8,
    runtime_overhead_bytes: int = DEFAULT_RUNTIME_OVERHEAD_BYTES,
) -> Plan:
    """What one replica of ``shape`` at ``tp`` ranks gets on GPUs of ``gpu_memory_bytes``
    (or with a fixed ``kv_cache_memory_bytes`` per rank, as the engine argument of that name).
    """
    if (gpu_memory_bytes is None) == (kv_cache_memory_bytes is None):
        raise ValueError("give either the GPU memory or the KV cache memory")
    if block_size < 1:
        raise ValueError("block_size must be at least 1")
    if not 0 < kv_fraction_of_free <= 1:
        raise ValueError(
            f"the KV share of free memory must be in (0, 1], got {kv_fraction_of_free}"
        )
    dtype = resolve_dtype(dtype, shape)
    dtype_bytes = DTYPE_BYTES[dtype]
    weights = weight_bytes(shape, dtype_bytes, tp)
    per_token = kv_bytes_per_token(shape, dtype_bytes, tp, kv_cache_dtype)
    per_block = block_size * per_token
    free = None
    if kv_cache_memory_bytes is not None:
        budget = kv_cache_memory_bytes
    else:
        free = gpu_memory_bytes - runtime_overhead_bytes - weights
        budget = max(0, kv_budget_from_free(free, kv_fraction_of_free))
    blocks = kv_blocks_that_fit(budget, per_block)
    usable = max(0, blocks - 1)
    request_len = request_len or shape.max_position_embeddings
    per_request = -(-request_len // block_size)
    return Plan(
        model=shape.name,
        tensor_parallel_size=tp,
        dtype=dtype,
        kv_cache_dtype=kv_cache_dtype,
        block_size=block_size,
        gpu_memory_bytes=gpu_memory_bytes,
        kv_fraction_of_free=kv_fraction_of_free,
        runtime_overhead_bytes=runtime_overhead_bytes,
        params_total=param_count(shape, 1),
        params_per_rank=param_count(shape, tp),
        weight_bytes_per_rank=weights,
        kv_heads_per_rank=kv_heads_per_rank(shape.kv_heads, tp),
        kv_bytes_per_token=per_token,
        kv_bytes_per_block=per_block,
        free_bytes_after_weights=free,
        kv_budget_bytes=budget,
        num_kv_blocks=blocks,
        kv_cache_bytes=blocks * per_block,
        tokens_that_fit=usable * block_size,
        request_len=request_len,
        blocks_per_request=per_request,
        concurrent_requests=usable // per_request,
        gpus_per_node=gpus_per_node,
        replicas_per_node=gpus_per_node // tp,
    )


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def render(p: Plan) -> str:
    """A human-readable table of a plan."""
    rows = [
        ("model", f"{p.model} (dtype {p.dtype}, KV cache {p.kv_cache_dtype})"),
        ("tensor parallel", f"{p.tensor_parallel_size} rank(s); numbers below are per rank"),
        ("parameters", f"{p.params_total:,} total, {p.params_per_rank:,} per rank"),
        ("weights / rank", _gib(p.weight_bytes_per_rank)),
        ("GPU memory", _gib(p.gpu_memory_bytes)),
        ("runtime overhead", _gib(p.runtime_overhead_bytes if p.gpu_memory_bytes else None)),
        ("free after weights", _gib(p.free_bytes_after_weights)),
        (
            "KV budget",
            f"{_gib(p.kv_budget_bytes)} ({p.kv_fraction_of_free:g} of free)"
            if p.gpu_memory_bytes
            else _gib(p.kv_budget_bytes),
        ),
        ("KV heads / rank", str(p.kv_heads_per_rank)),
        ("KV bytes / token", f"{p.kv_bytes_per_token:,}"),
        ("KV bytes / block", f"{p.kv_bytes_per_block:,} ({p.block_size} tokens)"),
        ("KV blocks", f"{p.num_kv_blocks:,} ({_gib(p.kv_cache_bytes)}; 1 is the null block)"),
        ("tokens that fit", f"{p.tokens_that_fit:,}"),
        (
            f"requests of {p.request_len:,}",
            f"{p.concurrent_requests:,} concurrent ({p.blocks_per_request} blocks each)",
        ),
        ("replicas / node", f"{p.replicas_per_node} ({p.gpus_per_node} GPUs per node)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if not p.fits:
        lines.append("DOES NOT FIT: not even one request of that length fits in the KV cache")
    return "\n".join(lines)


def shape_for(model: str | None, shape_name: str | None) -> ModelShape:
    """The CLI's model choice: a named shape, a model directory / config.json / .gguf, or
    (neither) the embedded SmolLM2 the engine runs by default."""
    if shape_name is not None:
        if model is not None:
            raise ValueError("give --model or --shape, not both")
        return ModelShape.named(shape_name)
    if model is not None and not model.endswith(".gguf"):
        return ModelShape.from_dir(model)
    from kvmesh.replicas.model_files import resolve_model_dir

    path = resolve_model_dir(model)
    return ModelShape.from_arch(
        ModelArchConfig.from_dir(path), "SmolLM2-135M-Instruct" if model is None else path.name
    )
