"""Torch twins of every kernel: the reference path, and the one CPU runs.

Each function has the same signature as its Triton sibling in ``kernels/triton_*.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmesh.kernels.metadata import AttentionMetadata, KVCacheLayer

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual) * weight, x + residual)``; the sum is the next residual.

    Computed in float32 and cast back, as transformers does, so greedy outputs match it.
    On a CPU in float32 or bfloat16 this is one fused C++ pass per row (``cpu_native``).
    """
    native = _native_elementwise(x, weight, residual, dtypes=NATIVE_DTYPES)
    if native is not None and x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1):
        if x.dim() == 2:  # the model's [T, H]: no reshaping (views cost microseconds apiece)
            return native.rms_norm(x, residual, weight.contiguous(), eps)
        hidden = x.shape[-1]
        out, summed = native.rms_norm(
            x.reshape(-1, hidden),
            None if residual is None else residual.reshape(-1, hidden),
            weight.contiguous(),
            eps,
        )
        return out.view(x.shape), summed.view(x.shape)
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


NATIVE_DTYPES = (torch.float32, torch.bfloat16)
"""The dtypes the C++ kernels take: RMSNorm and SiLU-and-mul tensors, attention caches (RoPE,
attention queries and the argmax: float32 only). A model in one of these uses the kernels."""

_ROPE_MEMO: dict[str, tuple] = {}


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate ``q [T, H, D]`` and ``k [T, KVH, D]`` in place (NeoX / rotate-half layout).

    ``cos_sin_cache[pos]`` holds ``cos`` in its first ``D/2`` entries and ``sin`` in the rest.
    """
    half = cos_sin_cache.shape[1] // 2
    native = _native_elementwise(q, k, cos_sin_cache)
    if (
        native is not None
        and 2 * half == q.shape[-1] == k.shape[-1]
        and q.stride(-2) == k.stride(-2) == q.shape[-1]
        and positions.dtype == torch.int64
    ):
        native.rotary_embedding(positions.contiguous(), q, k, cos_sin_cache.contiguous())
        return
    # Every layer rotates the same positions: look the rows up once per step.
    memo = _ROPE_MEMO.get("last")
    if memo is not None and memo[0] is positions and memo[1] is cos_sin_cache:
        cs = memo[2]
    else:
        cs = cos_sin_cache.index_select(0, positions)
        _ROPE_MEMO["last"] = (positions, cos_sin_cache, cs)
    cos = cs[:, None, :half].to(q.dtype)
    sin = cs[:, None, half:].to(q.dtype)
    for x in (q, k):
        x1 = x[..., :half].clone()
        x2 = x[..., half : 2 * half]
        x[..., :half] = x1 * cos - x2 * sin
        x[..., half : 2 * half] = x2 * cos + x1 * sin


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]`` for the fused gate/up projection output."""
    native = _native_elementwise(x, dtypes=NATIVE_DTYPES)
    if native is not None and x.stride(-1) == 1:
        if x.dim() == 2:
            return native.silu_and_mul(x)
        two_i = x.shape[-1]
        out = native.silu_and_mul(x.reshape(-1, two_i))
        return out.view(*x.shape[:-1], two_i // 2)
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def argmax_rows(x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for a finite ``[B, V]``, the same index (the first maximum).

    On CPU, torch's argmax is a scalar loop (~2.7 ms for 64 rows of 49k here). A float32 row
    goes through the C++ kernel (one vectorised pass, each lane keeping its first maximum);
    otherwise, since a max is vectorised: take each chunk's max, find the first chunk holding
    the row's maximum, and argmax only inside it. Elsewhere torch's own argmax is one kernel.
    """
    rows, vocab = x.shape
    if x.device.type != "cpu" or vocab < 4 * chunk:
        return x.argmax(dim=-1)
    native = _native_elementwise(x)
    if native is not None and x.stride(-1) == 1:
        return native.argmax_rows(x)
    body_len = vocab // chunk * chunk
    body = x[:, :body_len].reshape(rows, -1, chunk)  # a view when vocab % chunk == 0
    chunk_max = body.amax(dim=-1)
    row_max = chunk_max.amax(dim=-1, keepdim=True)
    first = (chunk_max == row_max).to(torch.uint8).argmax(dim=-1)
    tokens = first * chunk + body[torch.arange(rows, device=x.device), first].argmax(dim=-1)
    if body_len < vocab:  # the tail wins only when strictly larger (first maximum)
        tail = x[:, body_len:]
        tail_wins = tail.amax(dim=-1) > row_max.squeeze(1)
        tokens = torch.where(tail_wins, body_len + tail.argmax(dim=-1), tokens)
    return tokens


CDF_CHUNK = 256
"""Width of the first level of the two-level CDF search in ``sample_rows``."""


def sample_rows(
    x: torch.Tensor,
    rows: torch.Tensor,
    temperature: torch.Tensor,
    row_max: torch.Tensor,
    uniforms: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """For each ``i``, a token drawn from ``softmax(x[rows[i]] / temperature[i])`` by inverting
    its CDF at ``uniforms[i]`` (float64 in [0, 1)); ``row_max[i]`` is that row's maximum
    (finite; -inf entries are never drawn). With ``top_p[i] < 1`` the row's top-p tokens only
    (``top_p_drop``). ``x [B, V]`` float32; returns int64 ``[N]``.

    On a CPU this is one C++ pass per row plus a scan of one chunk (``sampling_cpu.cpp``).
    The twin: a full-vocabulary cumsum is a sequential scan (~1.8 ms for 64 rows of 49k on a
    CPU), so the probabilities are summed per chunk of ``CDF_CHUNK`` (vectorised), the chunk is
    found on the cumsum of those sums, and only that chunk is scanned. Both work along one row
    at a time, so a row's token never depends on its companions.
    """
    native = _native_elementwise(x, temperature, row_max)
    if native is not None and x.stride(-1) == 1:
        return native.sample_rows(x, rows, temperature, row_max, uniforms, top_p)
    sub = (x.index_select(0, rows) - row_max[:, None]) / temperature[:, None]
    n, vocab = sub.shape
    if bool((top_p < 1.0).any()):
        no_top_k = torch.full_like(rows, vocab)
        sub = sub.masked_fill(top_p_drop(sub, no_top_k, top_p), float("-inf"))
    probs = torch.softmax(sub, dim=-1)
    padded = probs
    if vocab % CDF_CHUNK:  # zero-probability padding: never chosen
        padded = F.pad(probs, (0, CDF_CHUNK - vocab % CDF_CHUNK))
    chunks = padded.view(n, -1, CDF_CHUNK)
    chunk_cdf = chunks.sum(dim=-1).cumsum(dim=-1)
    target = (uniforms * chunk_cdf[:, -1].double()).to(probs.dtype)[:, None]
    last = chunk_cdf.shape[1] - 1
    chunk = torch.searchsorted(chunk_cdf, target, right=True).clamp_(max=last)
    before = torch.where(chunk > 0, chunk_cdf.gather(1, (chunk - 1).clamp_(min=0)), 0.0)
    inside = chunks[torch.arange(n, device=x.device), chunk.squeeze(1)].cumsum(dim=-1)
    offset = torch.searchsorted(inside, target - before, right=True).clamp_(max=CDF_CHUNK - 1)
    tokens = (chunk * CDF_CHUNK + offset).clamp_(max=vocab - 1)
    # Rounding can land on a zero-probability (masked or padding) entry at a chunk's end:
    # take the most likely token instead (never a masked one).
    zero = probs.gather(1, tokens) <= 0
    if bool(zero.any()):
        tokens = torch.where(zero, argmax_rows(sub)[:, None], tokens)
    return tokens.squeeze(1)


TOP_P_WINDOWS = (256, 4096)
"""How many of a row's largest values top-p looks at first. A full sort of 32 rows of 49k took
57 ms on a Zen 4 CPU, ``topk`` of 256 2.7 ms; a row whose nucleus fits in the window needs
nothing outside it, the others try the next window, then the full sort."""


def top_p_drop(sub: torch.Tensor, ks: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which tokens of each row top-p (after top-k: ``ks``, ``vocab`` for none) drops: a token
    goes once the mass before it, sorted by value, already reaches ``top_p`` (the first always
    stays). Probabilities are renormalised over the top-k survivors, as a softmax of the masked
    row would be.

    Only the largest values are sorted: a row with a top-k looks at the smallest window of
    ``TOP_P_WINDOWS`` (or the whole row) that holds its k survivors; a row without one at the
    first window, since every token past it has at least the window's mass before it and goes
    once that mass reaches ``top_p``; a row whose window holds less tries the next window, then
    the full sort. Which window a row uses depends on its own values and parameters only, and
    every op works along one row (softmax, cumsum; no sum that torch may split across threads
    when few rows share it), so a row's mask never depends on its companions.
    """
    vocab = sub.shape[1]
    drop = torch.ones_like(sub, dtype=torch.bool)
    windows = (*(w for w in TOP_P_WINDOWS if w < vocab), vocab)
    smaller = 0
    for window in windows:  # rows with a top-k, by the window that holds their k survivors
        rows = ((ks < vocab) & (ks > smaller) & (ks <= window)).nonzero().squeeze(1)
        if rows.numel():
            _top_p_window(sub, ks, top_p, rows, window, drop, with_top_k=True)
        smaller = window
    pending = (ks >= vocab).nonzero().squeeze(1)
    for window in windows:
        if not pending.numel():
            break
        pending = _top_p_window(sub, ks, top_p, pending, window, drop, with_top_k=False)
    return drop


def _top_p_window(
    sub: torch.Tensor,
    ks: torch.Tensor,
    top_p: torch.Tensor,
    rows: torch.Tensor,
    window: int,
    drop: torch.Tensor,
    with_top_k: bool,
) -> torch.Tensor:
    """Top-p over the ``window`` largest values of ``sub[rows]``: with a top-k (all survivors
    inside the window) normalised over them, else over the whole row. Writes the rows it
    settles into ``drop``; returns the rows whose window held too little mass."""
    neg_inf = float("-inf")
    x = sub.index_select(0, rows)
    whole = window >= x.shape[1]
    if whole:
        values, order = torch.sort(x, dim=-1, descending=True)
    else:
        values, order = torch.topk(x, window, dim=-1)
    row_p = top_p.index_select(0, rows)[:, None]
    kth = values.gather(1, ks.index_select(0, rows).clamp(max=window)[:, None] - 1)
    values = values.masked_fill(values < kth, neg_inf)
    if with_top_k or whole:
        probs = torch.softmax(values, dim=-1)
    else:
        probs = torch.softmax(x, dim=-1).gather(1, order)
    mass = probs.cumsum(dim=-1)
    dropped = (mass - probs) >= row_p
    dropped[:, 0] = False
    dropped |= values == neg_inf  # top-k's mask
    if with_top_k or whole:
        done = torch.ones_like(rows, dtype=torch.bool)
    else:
        done = mass[:, -1] >= row_p[:, 0]
    if bool(done.any()):
        settled = torch.ones_like(x[done], dtype=torch.bool).scatter_(1, order[done], dropped[done])
        drop.index_copy_(0, rows[done], settled)
    return rows[~done]


def quantize_per_head(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-(token, head) quantisation of ``x [T, KVH, D]`` → (values, scales [T, KVH])."""
    qmax = INT8_MAX if dtype == torch.int8 else FP8_MAX
    amax = x.float().abs().amax(dim=-1).clamp_min(1e-8)
    scale = amax / qmax
    scaled = x.float() / scale[..., None]
    if dtype == torch.int8:
        scaled = scaled.round().clamp(-INT8_MAX, INT8_MAX)
    return scaled.to(dtype), scale


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, cache: KVCacheLayer, slot_mapping: torch.Tensor
) -> None:
    """Write new ``key``/``value [T, KVH, D]`` into the paged cache at ``slot_mapping [T]``.

    Slots of -1 (padding) are skipped. A quantised cache stores values and per-head scales.
    """
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    num_heads, head_dim = cache.k.shape[2], cache.k.shape[3]
    k_flat = cache.k.view(-1, num_heads, head_dim)
    v_flat = cache.v.view(-1, num_heads, head_dim)
    if cache.quantized:
        kq, ks = quantize_per_head(key, cache.k.dtype)
        vq, vs = quantize_per_head(value, cache.v.dtype)
        # index_copy_ has no float8 kernel on CPU: copy the bytes.
        k_flat.view(torch.uint8).index_copy_(0, slot_mapping, kq.view(torch.uint8))
        v_flat.view(torch.uint8).index_copy_(0, slot_mapping, vq.view(torch.uint8))
        cache.k_scale.view(-1, num_heads).index_copy_(0, slot_mapping, ks)
        cache.v_scale.view(-1, num_heads).index_copy_(0, slot_mapping, vs)
    else:
        k_flat.index_copy_(0, slot_mapping, key.to(cache.k.dtype))
        v_flat.index_copy_(0, slot_mapping, value.to(cache.v.dtype))


def rotary_and_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    cache: KVCacheLayer,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """RoPE on ``q`` and ``k``, then ``k`` and ``v`` into the cache; returns the queries for
    ``paged_attention``.

    On a CPU a 16-bit model's RoPE and attention run in float32 (the C++ kernels'
    arithmetic) and the cache keeps its own dtype, so the queries come back float32. There,
    with the C++ kernels, this is one pass per token (``cpu_native``'s ``rotary_and_cache``)
    in place of widening q, k and v, rotating and copying into the cache one after the other:
    the same values, without the temporaries.
    """
    native = _native_elementwise(q, k, v, dtypes=NATIVE_DTYPES)
    if (
        native is not None
        and not cache.quantized
        and _native_elementwise(cache.k, cache.v, dtypes=NATIVE_DTYPES) is not None
        and positions.dtype == slot_mapping.dtype == torch.int64
        and q.stride(-2) == k.stride(-2) == v.stride(-2) == q.shape[-1]
        and q.stride(-1) == 1
    ):
        return native.rotary_and_cache(
            positions.contiguous(),
            q,
            k,
            v,
            cos_sin_cache.contiguous(),
            cache.k,
            cache.v,
            slot_mapping.contiguous(),
        )
    if not cache.quantized and q.device.type == "cpu" and q.dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    rotary_embedding(positions, q, k, cos_sin_cache)
    reshape_and_cache(k, v, cache, slot_mapping)
    return q


DECODE_GROUP = 16
"""Decodes are attended in groups of this many sequences of similar length: padding stays
small and each group's gathered K/V fits in cache-friendly, reusable allocations."""


def _gather_kv(
    cache: KVCacheLayer, block_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of ``block_ids [B, NB]`` as ``[B, NB * block_size, KVH, D]`` in ``dtype``."""
    b, nb = block_ids.shape
    flat = block_ids.reshape(-1)
    k = cache.k.index_select(0, flat)
    v = cache.v.index_select(0, flat)
    if cache.quantized:
        k = k.to(dtype) * cache.k_scale.index_select(0, flat)[..., None].to(dtype)
        v = v.to(dtype) * cache.v_scale.index_select(0, flat)[..., None].to(dtype)
    else:
        k, v = k.to(dtype), v.to(dtype)
    bs, kvh, d = cache.k.shape[1:]
    return k.reshape(b, nb * bs, kvh, d), v.reshape(b, nb * bs, kvh, d)


def _plan(meta: AttentionMetadata, block_size: int, device: torch.device) -> dict:
    """Index tensors and masks for this step, built once and shared by every layer."""
    if "torch" in meta.plan:
        return meta.plan["torch"]
    qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
    starts = _cumsum(qlens)
    decodes = sorted((i for i, n in enumerate(qlens) if n == 1), key=lambda i: slens[i])
    groups = []
    for g in range(0, len(decodes), DECODE_GROUP):
        ids = decodes[g : g + DECODE_GROUP]
        nb = -(-max(slens[i] for i in ids) // block_size)
        idx = torch.tensor(ids, device=device)
        groups.append(
            {
                "tokens": torch.tensor([starts[i] for i in ids], device=device),
                "blocks": meta.block_tables[idx, :nb],
                "lens": meta.seq_lens[idx].to(torch.long),
                "nb": nb,
            }
        )
    prefills = []
    for i, n in enumerate(qlens):
        if n > 1:
            ctx = slens[i]
            qpos = torch.arange(ctx - n, ctx, device=device)[:, None]
            kpos = torch.arange(ctx, device=device)[None, :]
            prefills.append(
                {
                    "start": starts[i],
                    "n": n,
                    "ctx": ctx,
                    "blocks": meta.block_tables[i : i + 1, : -(-ctx // block_size)],
                    "qpos": qpos,
                    "kpos": kpos,
                }
            )
    plan = {"groups": groups, "prefills": prefills}
    meta.plan["torch"] = plan
    return plan


def _native_plan(meta: AttentionMetadata) -> dict:
    """The C++ kernels' view of this step, built once and shared by every layer: for the
    decode rows and for the longer chunks, int32 block tables, lengths and query rows."""
    if "cpu_native" in meta.plan:
        return meta.plan["cpu_native"]
    qlens = meta.query_lens_cpu
    starts = _cumsum(qlens)

    def rows(ids: list[int]) -> dict | None:
        if not ids:
            return None
        idx = torch.tensor(ids)
        return {
            "tables": meta.block_tables[idx].to(torch.int32).contiguous(),
            "lens": meta.seq_lens[idx].to(torch.int32).contiguous(),
            "starts": torch.tensor([starts[i] for i in ids], dtype=torch.int32),
            "qlens": torch.tensor([qlens[i] for i in ids], dtype=torch.int32),
        }

    plan = {
        "decode": rows([i for i, n in enumerate(qlens) if n == 1]),
        "extend": rows([i for i, n in enumerate(qlens) if n > 1]),
    }
    meta.plan["cpu_native"] = plan
    return plan


def _decode_group(q, cache, group, scale, sliding_window, out) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = cache.k.shape[2]
    tok, lens = group["tokens"], group["lens"]
    k, v = _gather_kv(cache, group["blocks"], q.dtype)
    pos = torch.arange(k.shape[1], device=q.device)
    allowed = pos[None, :] < lens[:, None]
    if sliding_window is not None:
        allowed &= pos[None, :] >= (lens[:, None] - sliding_window)
    o = F.scaled_dot_product_attention(
        q[tok].unsqueeze(2),  # [B, H, 1, D]
        k.transpose(1, 2),  # [B, KVH, L, D]
        v.transpose(1, 2),
        attn_mask=allowed[:, None, None, :],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )
    out[tok] = o.reshape(len(tok), num_heads, head_dim)


def paged_attention(
    q: torch.Tensor,
    cache: KVCacheLayer,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries ``q [T, H, D]`` over the paged cache → ``[T, H, D]``.

    Each sequence's new tokens attend to its cached prefix plus themselves, causally (and only
    to the last ``sliding_window`` positions when set). The new tokens' K/V must already be in
    the cache. On the CPU (float32 queries, a float32 or bfloat16 cache) this is the C++
    kernels of ``cpu_native``: a one-pass decode kernel for the rows with one query token and
    a paged causal kernel for the longer chunks, both straight from the block tables.
    Elsewhere (and as the reference) it is the torch twin: decodes in length-sorted groups
    through SDPA, prefill chunks one sequence at a time through SDPA with a
    bottom-right-aligned causal mask.
    """
    native = _native_ops(q, cache)
    if native is not None:
        plan = _native_plan(meta)
        # The kernels read q through its row stride (it may be a view into the fused qkv
        # projection) and write every row of `out` exactly once: decodes, then chunks.
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        window = sliding_window or 0
        if (rows := plan["decode"]) is not None:
            native.paged_decode(
                out,
                q,
                cache.k,
                cache.v,
                rows["tables"],
                rows["lens"],
                rows["starts"],
                scale,
                window,
            )
        if (rows := plan["extend"]) is not None:
            native.paged_extend(
                out,
                q,
                cache.k,
                cache.v,
                rows["tables"],
                rows["lens"],
                rows["starts"],
                rows["qlens"],
                scale,
                window,
            )
        return out
    plan = _plan(meta, cache.k.shape[1], q.device)
    out = torch.empty_like(q)
    for group in plan["groups"]:
        _decode_group(q, cache, group, scale, sliding_window, out)
    for p in plan["prefills"]:
        start, n, ctx = p["start"], p["n"], p["ctx"]
        k, v = _gather_kv(cache, p["blocks"], q.dtype)
        k, v = k[0, :ctx].transpose(0, 1), v[0, :ctx].transpose(0, 1)  # [KVH, ctx, D]
        # 4-D inputs: torch's CPU SDPA takes its flash kernel only for batched 4-D tensors
        # (3-D ones fall to the math path, ~3x slower at 2k tokens). A chunk with no cached
        # context is plain causal attention, which that kernel does without a mask.
        if ctx == n and sliding_window is None:
            allowed, causal = None, True
        else:
            allowed, causal = p["kpos"] <= p["qpos"], False
            if sliding_window is not None:
                allowed &= p["kpos"] > p["qpos"] - sliding_window
            allowed = allowed[None, None]
        oi = F.scaled_dot_product_attention(
            q[start : start + n].transpose(0, 1)[None],  # [1, H, n, D]
            k[None],
            v[None],
            attn_mask=allowed,
            is_causal=causal,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[0],
        )
        out[start : start + n] = oi[0].transpose(0, 1)
    return out


USE_CPU_NATIVE = True
"""Whether ``paged_attention`` may use the C++ kernels of ``cpu_native``; tests and the
attention benchmark switch it off to get the pure-torch reference."""


def _native_ops(q: torch.Tensor, cache: KVCacheLayer):
    """The C++ kernels for float32 queries over a float32 or bfloat16 CPU cache (None
    elsewhere or if they cannot build).

    Quantised (int8 / fp8) caches stay on the torch twin, which dequantises as it gathers.
    """
    if (
        not USE_CPU_NATIVE
        or q.device.type != "cpu"
        or cache.quantized
        or q.dtype != torch.float32
        or not (cache.k.dtype == cache.v.dtype and cache.k.dtype in NATIVE_DTYPES)
        or not (cache.k.is_contiguous() and cache.v.is_contiguous())
        or q.stride(-1) != 1
        or q.stride(-2) != q.shape[-1]
    ):
        return None
    return _loaded_native()


def _loaded_native():
    """The compiled kernels module (None when they cannot build), resolved once per process:
    the elementwise ops ask for it several times per layer."""
    global _NATIVE_MODULE
    if _NATIVE_MODULE is _UNRESOLVED:
        from kvmesh.kernels.cpu_native import native_ops

        _NATIVE_MODULE = native_ops()
    return _NATIVE_MODULE


_UNRESOLVED = object()
_NATIVE_MODULE: object = _UNRESOLVED


def _native_elementwise(
    *tensors: torch.Tensor | None, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
):
    """The C++ kernels when the given tensors are CPU tensors of one dtype among ``dtypes``,
    else None."""
    # A plain loop: this runs several times per layer, and at one token per step the checks
    # cost more than the kernels they guard.
    if not USE_CPU_NATIVE:
        return None
    dtype = None
    for t in tensors:
        if t is None:
            continue
        if not t.is_cpu or (dtype is not None and t.dtype != dtype):
            return None
        dtype = t.dtype
    if dtype is not None and dtype not in dtypes:
        return None
    return _loaded_native()


def _cumsum(lens: list[int]) -> list[int]:
    starts, total = [], 0
    for n in lens:
        starts.append(total)
        total += n
    return starts
