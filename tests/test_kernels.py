"""Each attention path equals the plain causal attention over contiguous keys (the spec)."""
from __future__ import annotations

import pytest
import torch

from coserve.kernels.lora import lora_delta_torch
from coserve.kernels.paged_attention import causal_attention, decode_attention_torch, paged_attention_torch


def paged(num_seqs: int, block_size: int, hkv: int, d: int, lens: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for n in lens:
        tables.append([perm.pop() for _ in range(-(-n // block_size))])
    return k_cache, v_cache, tables


@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_equals_per_sequence_causal_attention(window):
    lens, hq, hkv, d, bs = [1, 7, 16, 33], 8, 2, 16, 4
    k_cache, v_cache, tables = paged(len(lens), bs, hkv, d, lens, 0)
    q = torch.randn(len(lens), hq, d)
    width = max(map(len, tables))
    padded = torch.tensor([tb + [0] * (width - len(tb)) for tb in tables])
    out = decode_attention_torch(q, k_cache, v_cache, padded, torch.tensor(lens), max(lens), d ** -0.5, window)
    for i, (tb, n) in enumerate(zip(tables, lens)):
        k = k_cache[tb].flatten(0, 1)[:n]
        v = v_cache[tb].flatten(0, 1)[:n]
        ref = causal_attention(q[i:i + 1], k, v, d ** -0.5, window)
        assert torch.allclose(out[i:i + 1], ref, atol=1e-5)


def test_paged_prefill_attention_equals_contiguous_attention():
    lens, qlens, hq, hkv, d, bs = [9, 20], [4, 20], 4, 4, 8, 4
    k_cache, v_cache, tables = paged(2, bs, hkv, d, lens, 1)
    q = torch.randn(sum(qlens), hq, d)
    out = paged_attention_torch(q, k_cache, v_cache, [torch.tensor(t) for t in tables], [0, 4], qlens, lens,
                                d ** -0.5)
    start = 0
    for tb, n, ql in zip(tables, lens, qlens):
        k, v = k_cache[tb].flatten(0, 1)[:n], v_cache[tb].flatten(0, 1)[:n]
        scores = torch.einsum("qhd,khd->hqk", q[start:start + ql], k) * d ** -0.5
        mask = torch.arange(n)[None, :] > torch.arange(n - ql, n)[:, None]
        ref = torch.einsum("hqk,khd->qhd", torch.softmax(scores.masked_fill(mask, float("-inf")), -1), v)
        assert torch.allclose(out[start:start + ql], ref, atol=1e-5)
        start += ql


def test_lora_delta_touches_only_its_rows():
    x, a, b = torch.randn(6, 8), torch.randn(2, 4, 8), torch.randn(2, 5, 4)
    out = torch.zeros(6, 5)
    lora_delta_torch(x, a, b, torch.tensor([0.5, 2.0]), [(1, torch.tensor([0, 3]))], out)
    assert torch.allclose(out[[0, 3]], 2.0 * x[[0, 3]] @ a[1].T @ b[1].T, atol=1e-5)
    assert out[[1, 2, 4, 5]].abs().sum() == 0
