"""The attention twin (the spec the Triton kernel is tested against) equals attention written out plainly over
each sequence's contiguous keys, for decode rows and prefill chunks in one flat batch."""
from __future__ import annotations

import pytest
import torch

from coserve.kernels.paged_attention import unified_attention_torch


def paged(block_size: int, hkv: int, d: int, lens: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-n // block_size))] for n in lens]
    width = max(map(len, tables))
    return k_cache, v_cache, tables, torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_twin_equals_plain_attention_over_contiguous_keys(window):
    lens, qlens, hq, hkv, d, bs = [1, 7, 16, 33, 20], [1, 1, 4, 1, 20], 8, 2, 16, 4
    k_cache, v_cache, tables, table_t = paged(bs, hkv, d, lens, 0)
    q = torch.randn(sum(qlens), hq, d)
    starts = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    unified_attention_torch(q, k_cache, v_cache, out, starts, torch.tensor(lens, dtype=torch.int32), table_t,
                            d ** -0.5, window, max(qlens))
    for b, (tb, n, ql) in enumerate(zip(tables, lens, qlens)):
        k = k_cache[tb].flatten(0, 1)[:n].repeat_interleave(hq // hkv, dim=1)
        v = v_cache[tb].flatten(0, 1)[:n].repeat_interleave(hq // hkv, dim=1)
        rows = slice(int(starts[b]), int(starts[b + 1]))
        scores = torch.einsum("qhd,khd->hqk", q[rows], k) * d ** -0.5
        q_pos, k_pos = torch.arange(n - ql, n)[:, None], torch.arange(n)[None, :]
        hidden = (k_pos > q_pos) | ((q_pos - k_pos >= window) if window else torch.zeros_like(k_pos > q_pos))
        ref = torch.einsum("hqk,khd->qhd", torch.softmax(scores.masked_fill(hidden, float("-inf")), -1), v)
        assert torch.allclose(out[rows], ref, atol=1e-5)
