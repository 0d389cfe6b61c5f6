"""Causal attention of a flat batch of query tokens over a paged KV cache (PyTorch twin; the spec)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def write_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store each token's key/value at its slot (block * block_size + offset) of the paged cache."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
              ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `ctx` keys and values of one sequence, contiguous: [ctx, Hkv, D]."""
    blocks = table[: (ctx + k_cache.shape[1] - 1) // k_cache.shape[1]]
    return k_cache[blocks].flatten(0, 1)[:ctx], v_cache[blocks].flatten(0, 1)[:ctx]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     sliding_window: int | None = None) -> torch.Tensor:
    """Queries are the last n of ctx positions. q: [n, Hq, D]; k, v: [ctx, Hkv, D]. Differentiable."""
    n, ctx = q.shape[0], k.shape[0]
    n_rep = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(n_rep, dim=1)
    v = v.float().repeat_interleave(n_rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
    k_pos = torch.arange(ctx, device=q.device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= q_pos - k_pos < sliding_window
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def causal_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          sliding_window: int | None = None) -> torch.Tensor:
    """`causal_attention` through SDPA (flash or memory-efficient kernels on a GPU, in the inputs' dtype):
    differentiable without fp32 copies or [heads, n, ctx] scores kept; a binding sliding window takes the spec."""
    n, ctx = q.shape[0], k.shape[0]
    if sliding_window is not None and sliding_window < ctx:
        return causal_attention(q, k, v, scale, sliding_window)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=causal_lower_right(n, ctx), scale=scale)
    return out[0].transpose(0, 1)


def masked_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          mask: torch.Tensor) -> torch.Tensor:
    """Attention of q [n, Hq, D] over k, v [ctx, Hkv, D], `mask` [n, ctx] saying which keys each query sees
    (SDPA's memory-efficient kernel on a GPU); differentiable. Every query must see at least one key."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask[None, None], scale=scale)
    return out[0].transpose(0, 1)


def write_kv_skip_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """write_kv_torch for batches with padding rows: a token whose slot is negative is not stored."""
    keep = slot_mapping >= 0
    write_kv_torch(k[keep], v[keep], k_cache, v_cache, slot_mapping[keep])


def unified_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            scale: float, sliding_window: int | None, max_query_len: int,
                            num_kv_splits: int = 1) -> None:
    """The spec of the Triton unified_attention: sequence b's rows query_start_loc[b]:[b+1] are the last
    positions of its seq_lens[b] cached keys; rows of padding (seq_len 0, or past query_start_loc[-1]) get zeros.

    max_query_len and num_kv_splits only tune the kernel; they do not change the result.
    """
    out.zero_()
    starts = query_start_loc.tolist()
    for b, ctx in enumerate(seq_lens.tolist()):
        lo, hi = starts[b], starts[b + 1]
        if ctx == 0 or hi == lo:
            continue
        k, v = gather_kv(k_cache, v_cache, block_tables[b], ctx)
        out[lo:hi] = causal_attention(q[lo:hi], k, v, scale, sliding_window).to(out.dtype)
