"""The Triton unified paged attention and KV write equal their PyTorch twins (Triton's interpreter on a CPU)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from coserve.kernels.paged_attention import unified_attention_torch, write_kv_skip_torch
from coserve.kernels.unified_attention import unified_attention, write_kv

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-4, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int


def make_batch(seqs: list[tuple[int, int]], hq: int, hkv: int, d: int, block_size: int, dtype: torch.dtype,
               seed: int, pad_rows: int = 0) -> Batch:
    """(seq_len, query_len) per sequence; blocks scattered at random, every slot past a sequence's end is NaN
    (as are unused blocks and block-table padding), so reading beyond seq_len shows up in the output."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-ctx // block_size) for ctx, _ in seqs]
    num_blocks = sum(need) + 2
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    v_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"))
    perm = torch.randperm(num_blocks, generator=g).tolist()
    nan_block = perm.pop()
    width = max(max(need), 1) + 1
    tables = torch.full((len(seqs), width), nan_block, dtype=torch.int32)
    for b, (ctx, _) in enumerate(seqs):
        blocks = [perm.pop() for _ in range(need[b])]
        tables[b, : need[b]] = torch.tensor(blocks, dtype=torch.int32)
        flat_k = k_cache[blocks].flatten(0, 1)
        flat_v = v_cache[blocks].flatten(0, 1)
        flat_k[:ctx] = torch.randn(ctx, hkv, d, generator=g)
        flat_v[:ctx] = torch.randn(ctx, hkv, d, generator=g)
        k_cache[blocks] = flat_k.view(-1, block_size, hkv, d)
        v_cache[blocks] = flat_v.view(-1, block_size, hkv, d)
    qlens = [n for _, n in seqs]
    starts = torch.tensor([0] + qlens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(sum(qlens) + pad_rows, hq, d, generator=g)
    return Batch(q.to(DEVICE, dtype), k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype), starts.to(DEVICE),
                 torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32, device=DEVICE), tables.to(DEVICE),
                 max(qlens))


def run_both(batch: Batch, window: int | None, splits: int, hint: int | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's and the twin's outputs, both written into buffers prefilled with NaN."""
    scale = batch.q.shape[-1] ** -0.5
    hint = batch.max_query_len if hint is None else hint
    got = torch.full_like(batch.q, float("nan"))
    unified_attention(batch.q, batch.k_cache, batch.v_cache, got, batch.query_start_loc, batch.seq_lens,
                      batch.block_tables, scale, window, hint, num_kv_splits=splits)
    want = torch.full_like(batch.q, float("nan"))
    unified_attention_torch(batch.q, batch.k_cache, batch.v_cache, want, batch.query_start_loc, batch.seq_lens,
                            batch.block_tables, scale, window, hint, num_kv_splits=splits)
    return got, want


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert not got.isnan().any(), "the kernel left NaN (unwritten rows or keys read past seq_len)"
    tol = TOL[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


DECODE = [(1, 1), (63, 1), (64, 1), (65, 1), (127, 1), (128, 1), (129, 1)]     # around key-tile edges
PREFILL = [(5, 5), (70, 70), (130, 130)]
MIXED = [(130, 1), (40, 12), (9, 9), (0, 1), (25, 1), (0, 0), (150, 70)]     # cached prefixes, padding seqs


@pytest.mark.parametrize("seqs,hq,hkv,block_size,splits", [
    (DECODE, 4, 2, 4, 1),
    (DECODE, 8, 2, 16, 3),
    (PREFILL, 2, 2, 16, 1),
    (PREFILL, 4, 1, 4, 2),
    (MIXED, 8, 2, 4, 1),
    (MIXED, 6, 2, 16, 4),
    (MIXED, 2, 2, 4, 2),
], ids=["decode-g2-bs4", "decode-g4-bs16-split3", "prefill-g1-bs16", "prefill-g4-bs4-split2",
        "mixed-g4-bs4", "mixed-g3-bs16-split4", "mixed-g1-bs4-split2"])
def test_unified_attention_equals_twin(seqs, hq, hkv, block_size, splits):
    got, want = run_both(make_batch(seqs, hq, hkv, 16, block_size, torch.float32, seed=hq + splits), None, splits)
    assert_close(got, want)


@pytest.mark.parametrize("window,splits", [(1, 1), (7, 1), (24, 3), (150, 2)])
def test_sliding_window(window, splits):
    """Windows that start inside, and exactly at the edges of, the kernel's key tiles (up to 128 keys)."""
    decode = [(window + n, 1) for n in (63, 64, 65, 129, 130)]
    got, want = run_both(make_batch(MIXED + decode, 4, 2, 16, 4, torch.float32, seed=window), window, splits)
    assert_close(got, want)


def test_padding_rows_get_zeros_and_the_tiling_hint_does_not_change_the_result():
    """Rows past query_start_loc[-1] and sequences of seq_len 0 are zeros, whatever tiling max_query_len picks."""
    batch = make_batch(MIXED, 4, 2, 16, 4, torch.float32, seed=5, pad_rows=5)
    got, want = run_both(batch, None, 2, hint=1)
    assert_close(got, want)
    padding = [22, 94, 95, 96, 97, 98]     # the seq_len-0 query, then the rows past the last sequence
    assert got[padding].abs().sum() == 0
    other, _ = run_both(batch, None, 1, hint=batch.max_query_len)
    assert_close(other, want)


def test_other_head_dims_and_strided_q():
    """D = 32 and D = 24 (padded inside the kernel); q and out as views into a wider fused-QKV-like buffer."""
    for d in (32, 24):
        batch = make_batch(MIXED[:3], 4, 2, d, 4, torch.float32, seed=d)
        wide = torch.randn(batch.q.shape[0], 8, d, device=DEVICE)
        wide[:, :4] = batch.q
        batch.q = wide[:, :4]
        got, want = run_both(batch, None, 1)
        assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []))
def test_half_precision(dtype):
    got, want = run_both(make_batch(MIXED, 4, 2, 16, 4, dtype, seed=3), None, 3)
    assert got.dtype == dtype
    assert_close(got, want)


@pytest.mark.skipif(not CUDA, reason="model-sized shapes need a GPU (the interpreter runs the small ones)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("splits", [1, 8])
def test_model_sized_shapes_on_gpu(dtype, splits):
    seqs = [(2000, 1), (1500, 1), (700, 1), (2000, 300), (512, 512), (1, 1), (0, 1), (130, 64)]
    for window in (None, 256):
        got, want = run_both(make_batch(seqs, 32, 8, 128, 16, dtype, seed=splits), window, splits)
        assert_close(got, want)
    got, want = run_both(make_batch(seqs, 12, 2, 128, 16, dtype, seed=1), None, splits)
    assert_close(got, want)
    got, want = run_both(make_batch(seqs[:4], 8, 8, 256, 16, dtype, seed=2), None, splits)
    assert_close(got, want)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_with_new_lengths():
    """Captured once, replayed with other lengths and tables of the same T and B: the grid fits any data."""
    first = make_batch([(100, 1), (300, 1), (5, 1), (0, 1)], 32, 8, 128, 16, torch.bfloat16, seed=0)
    second = make_batch([(900, 1), (2, 1), (0, 1), (64, 1)], 32, 8, 128, 16, torch.bfloat16, seed=1)
    static = make_batch([(1000, 1)] * 4, 32, 8, 128, 16, torch.bfloat16, seed=2)
    out = torch.empty_like(static.q)
    args = (static.q, static.k_cache, static.v_cache, out, static.query_start_loc, static.seq_lens,
            static.block_tables, 128 ** -0.5, None, 1)
    unified_attention(*args, num_kv_splits=4)     # compile before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        unified_attention(*args, num_kv_splits=4)
    for batch in (first, second):
        for name in ("q", "query_start_loc", "seq_lens"):
            getattr(static, name).copy_(getattr(batch, name))
        static.block_tables[:, : batch.block_tables.shape[1]].copy_(batch.block_tables)
        static.k_cache[: batch.k_cache.shape[0]].copy_(batch.k_cache)
        static.v_cache[: batch.v_cache.shape[0]].copy_(batch.v_cache)
        graph.replay()
        _, want = run_both(batch, None, 4)
        assert_close(out, want)


def test_write_kv_skips_negative_slots():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(6, 2, 16, generator=g), torch.randn(6, 2, 16, generator=g)
    slots = torch.tensor([5, -1, 0, 13, -1, 30], dtype=torch.int32)
    caches = [torch.randn(8, 4, 2, 16, generator=g) for _ in range(2)]
    want_k, want_v = caches[0].clone(), caches[1].clone()
    write_kv_skip_torch(k, v, want_k, want_v, slots.long())
    for dtype in (torch.float32, torch.float16):
        got_k, got_v = (c.to(DEVICE, dtype) for c in caches)
        write_kv(k.to(DEVICE, dtype), v.to(DEVICE, dtype), got_k, got_v, slots.to(DEVICE))
        tol = TOL[dtype]
        torch.testing.assert_close(got_k.float().cpu(), want_k.to(dtype).float(), atol=tol, rtol=tol)
        torch.testing.assert_close(got_v.float().cpu(), want_v.to(dtype).float(), atol=tol, rtol=tol)
    assert torch.equal(want_k.view(-1, 2, 16)[[1, 2, 3]], caches[0].view(-1, 2, 16)[[1, 2, 3]])
