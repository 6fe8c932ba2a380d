"""Llama-family decoder (Llama, Mistral, Qwen2) over the paged KV cache.

One class serves the three architectures: they differ only in config (QKV bias for Qwen2,
sliding window for Mistral). Q/K/V and gate/up projections are fused into one matrix each, so
a layer runs four matmuls instead of seven.

With ``tp`` (a ``TPShard``) the model is one rank's shard of a tensor-parallel replica: the
same modules at this rank's sizes, plus the all-reduces and logits gather of
``replicas/tp/layers.py``. Without it nothing here communicates.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvmesh import kernels
from kvmesh.kernels import AttentionMetadata, KVCacheLayer, PackableLinear
from kvmesh.replicas.model_arch import ModelArchConfig
from kvmesh.replicas.models.rope import build_cos_sin_cache
from kvmesh.replicas.tp.layers import TPShard, row_parallel_linear, vocab_embedding


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(
        self, cfg: ModelArchConfig, cos_sin_cache: torch.Tensor, tp: TPShard | None = None
    ) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads if tp is None else tp.num_heads
        self.num_kv_heads = cfg.num_key_value_heads if tp is None else tp.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.qkv_proj = PackableLinear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = row_parallel_linear(self.q_size, cfg.hidden_size, tp)
        self.cos_sin_cache = cos_sin_cache

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        cache: KVCacheLayer,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        # A 16-bit model on a CPU gets float32 queries back (RoPE and attention run in float32
        # there); the cache stores K and V in its own dtype (``kv_storage_dtype``).
        q = kernels.rotary_and_cache(
            positions, q, k, v, self.cos_sin_cache, cache, meta.slot_mapping
        )
        out = kernels.paged_attention(q, cache, meta, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(-1, self.q_size).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: ModelArchConfig, tp: TPShard | None = None) -> None:
        super().__init__()
        inter = cfg.intermediate_size if tp is None else tp.intermediate_size
        self.gate_up_proj = PackableLinear(cfg.hidden_size, 2 * inter, bias=False)
        self.down_proj = row_parallel_linear(inter, cfg.hidden_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelArchConfig, cos_sin_cache: torch.Tensor, tp: TPShard | None = None
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, cos_sin_cache, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(self, positions, x, residual, cache, meta):
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Also serves ``MistralForCausalLM`` and ``Qwen2ForCausalLM``."""

    def __init__(self, cfg: ModelArchConfig, max_positions: int, tp: TPShard | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.max_positions = max(max_positions, cfg.max_position_embeddings)
        self.cos_sin_cache = torch.empty(0)
        self.embed_tokens = vocab_embedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, self.cos_sin_cache, tp) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # The tied head's packed copy of the embedding (the lookup keeps the plain one).
        self.packed_tied_head: kernels.PackedWeight | None = None
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            vocab = cfg.vocab_size if tp is None else tp.vocab_per_rank
            self.lm_head = PackableLinear(cfg.hidden_size, vocab, bias=False)

    def init_rope(self, device: torch.device) -> None:
        """Build the RoPE table (float32 whatever the model dtype), shared by every layer."""
        cfg = self.cfg
        table = build_cos_sin_cache(
            cfg.head_dim,
            self.max_positions,
            cfg.rope_theta,
            cfg.rope_scaling,
            (cfg.rope_scaling or {}).get(
                "original_max_position_embeddings", cfg.max_position_embeddings
            ),
        ).to(device)
        self.cos_sin_cache = table
        for layer in self.layers:
            layer.self_attn.cos_sin_cache = table

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCacheLayer],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        residual = None
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(positions, x, residual, cache, meta)
        x, _ = self.norm(x, residual)
        return x

    def pack_linear_layers(self) -> bool:
        """On a CPU, move every linear weight into oneDNN's packed layout (``kernels``'s
        ``cpu_linear``); returns whether it did. Call once the weights are loaded."""
        weight = self.embed_tokens.weight
        if not (
            weight.device.type == "cpu"
            and kernels.packing_enabled()
            and kernels.packing_supported(weight.dtype)
        ):
            return False
        for module in self.modules():
            if isinstance(module, PackableLinear):
                module.pack()
        if self.lm_head is None and self.packed_tied_head is None:
            self.packed_tied_head = kernels.pack_linear_weight(weight)
        return True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        elif self.packed_tied_head is not None:
            logits = kernels.packed_linear(hidden, self.packed_tied_head, None)
        else:
            logits = torch.nn.functional.linear(hidden, self.embed_tokens.weight)
        if self.tp is not None:
            logits = self.tp.gather_vocab(logits)  # rank 0 samples; others get [0, V]
        return logits.float()

    # ---- weights -------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors, fusing q/k/v and gate/up as they arrive.

        With ``tp`` the tensors are already this rank's slices (``TPShard.weight_slice``).
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        cfg = self.cfg
        attn, mlp = self.layers[0].self_attn, self.layers[0].mlp
        q, kv, inter = attn.q_size, attn.kv_size, mlp.down_proj.in_features
        fused = {
            "q_proj": ("qkv_proj", 0, q),
            "k_proj": ("qkv_proj", q, kv),
            "v_proj": ("qkv_proj", q + kv, kv),
            "gate_proj": ("gate_up_proj", 0, inter),
            "up_proj": ("gate_up_proj", inter, inter),
        }
        for name, tensor in weights:
            if name.startswith("model."):
                name = name[len("model.") :]
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            target, offset, size = name, 0, None
            for part, (fused_name, off, sz) in fused.items():
                if f".{part}." in name:
                    target, offset, size = name.replace(part, fused_name), off, sz
                    break
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} for {cfg.architecture}")
            param = params[target]
            with torch.no_grad():
                if size is None:
                    # A TP rank's vocabulary slice may be shorter than its padded parameter.
                    padded = (
                        self.tp is not None
                        and target in ("embed_tokens.weight", "lm_head.weight")
                        and param.shape[1:] == tensor.shape[1:]
                        and tensor.shape[0] < param.shape[0]
                    )
                    if param.shape != tensor.shape and not padded:
                        raise ValueError(
                            f"weight {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(param.shape)}"
                        )
                    if padded:
                        param[: tensor.shape[0]].copy_(tensor)
                        param[tensor.shape[0] :].zero_()
                    else:
                        param.copy_(tensor)
                else:
                    param.narrow(0, offset, size).copy_(tensor)
            loaded.add(f"{target}:{offset}")
        expected = sum(
            3
            if n.endswith("qkv_proj.weight") or n.endswith("qkv_proj.bias")
            else 2
            if n.endswith("gate_up_proj.weight")
            else 1
            for n in params
        )
        if len(loaded) != expected:
            raise ValueError(
                f"checkpoint is missing weights: loaded {len(loaded)} of {expected} tensors"
            )
