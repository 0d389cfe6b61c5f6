"""Paged attention for a flat batch (any mix of decode tokens and prefill chunks): the metadata object built
once per iteration, and the call that writes this iteration's keys/values and attends over the cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from coserve.engine.layers.ops import use_kernels
from coserve.kernels.paged_attention import unified_attention_torch, write_kv_skip_torch
from coserve.kernels.unified_attention import unified_attention, write_kv


@dataclass
class AttentionMetadata:
    """One per iteration; every layer reads it. Rows of sequence b are query_start_loc[b]:query_start_loc[b+1]."""

    slot_mapping: torch.Tensor      # int64 [T]: cache slot of each token, -1 to skip (padding)
    query_start_loc: torch.Tensor   # int32 [B+1]
    seq_lens: torch.Tensor          # int32 [B]: cached tokens including this iteration's
    block_tables: torch.Tensor      # int32 [B, max_blocks]
    max_query_len: int
    max_seq_len: int
    num_kv_splits: int = 1


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
                    meta: AttentionMetadata, scale: float, window: int | None, fast: bool) -> torch.Tensor:
    """Store k/v at their slots, then attend each query over its sequence's cached keys. q: [T, Hq, D]."""
    k_cache, v_cache = cache
    out = torch.empty_like(q)
    args = (meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, window, meta.max_query_len)
    if use_kernels(fast, q):
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        unified_attention(q, k_cache, v_cache, out, *args, num_kv_splits=meta.num_kv_splits)
    else:
        write_kv_skip_torch(k, v, k_cache, v_cache, meta.slot_mapping)
        unified_attention_torch(q, k_cache, v_cache, out, *args)
    return out
