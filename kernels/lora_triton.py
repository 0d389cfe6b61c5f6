"""Multi-LoRA shrink/expand in Triton (SGMV style): one launch per projection for every adapter in the batch.

Tokens are grouped by adapter slot on the device (`lora_batch_meta`), so each program multiplies one tile of
one slot's tokens by that slot's weights: an adapter's A and B are read once per tile of its tokens, not once
per token. The grid enumerates (slot, token tile) pairs up to their bound for T tokens over S slots (a program
finds its pair from the per-slot counts), so it depends only on T and static sizes, never on how tokens spread
over slots: kernels and metadata can be captured in a CUDA graph, and tokens without an adapter get no
program at all. The PyTorch twins in `lora.py` are the
specification.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the twins and the metadata still work without Triton
    triton = None

MAX_SLICES = 4


@dataclass(frozen=True)
class LoRABatchMeta:
    """Tokens of a batch grouped by adapter slot; device tensors only, so building it never syncs the host.

    sorted_tokens: int32 [T], token indices ordered by slot (stable), tokens without an adapter last;
    counts: int32 [S + 1], tokens per slot (counts[S]: tokens without an adapter); starts: int32 [S + 1],
    where each slot's run begins in sorted_tokens.
    """

    sorted_tokens: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor

    @property
    def num_slots(self) -> int:
        return self.counts.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.sorted_tokens.numel()

    @staticmethod
    def allocate(max_tokens: int, num_slots: int, device: torch.device | str) -> LoRABatchMeta:
        """Static buffers for `fill_lora_batch_meta` (e.g. the inputs of a CUDA graph)."""
        def buf(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int32, device=device)
        return LoRABatchMeta(buf(max_tokens), buf(num_slots + 1), buf(num_slots + 1))


def fill_lora_batch_meta(token_lora: torch.Tensor, buffers: LoRABatchMeta) -> LoRABatchMeta:
    """Group `token_lora` ([T], slot per token, -1 = none) into `buffers` in place; returns views sized for T.

    Fixed-shape device ops only (stable sort, scatter_add, cumsum), so it can run inside a CUDA graph. A slot
    outside [0, S) counts as no adapter, as in the twins.
    """
    num_tokens, num_slots = token_lora.numel(), buffers.num_slots
    if num_tokens > buffers.num_tokens:
        raise ValueError(f"{num_tokens} tokens exceed the metadata buffers' {buffers.num_tokens}")
    keys = token_lora.long()
    keys = torch.where((keys < 0) | (keys >= num_slots), num_slots, keys)
    order = torch.sort(keys, stable=True).indices
    sorted_tokens = buffers.sorted_tokens[:num_tokens]
    sorted_tokens.copy_(order)
    buffers.counts.zero_()
    buffers.counts.scatter_add_(0, keys, torch.ones_like(buffers.counts[:1]).expand(num_tokens))
    torch.cumsum(buffers.counts, 0, dtype=torch.int32, out=buffers.starts)
    buffers.starts.sub_(buffers.counts)
    return LoRABatchMeta(sorted_tokens, buffers.counts, buffers.starts)


def lora_batch_meta(token_lora: torch.Tensor, num_slots: int) -> LoRABatchMeta:
    """Fresh metadata for one batch (see `fill_lora_batch_meta`)."""
    return fill_lora_batch_meta(token_lora, LoRABatchMeta.allocate(token_lora.numel(), num_slots,
                                                                   token_lora.device))


@dataclass(frozen=True)
class LoRAKernelConfig:
    """Tiles of one launch. Shrink: block_n tiles the n*R outputs, split_k splits K over programs. Expand:
    block_n tiles y's columns, split_n spreads a token tile's column tiles over that many programs."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    split_n: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _pow2_at_least(n: int, least: int = 16) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


def max_token_tiles(num_tokens: int, num_slots: int, block_m: int) -> int:
    """Bound on (slot, token tile) pairs for any mix of T tokens over S slots: the launch's fixed M extent."""
    return -(-num_tokens // block_m) + min(num_slots, num_tokens)


def _block_m(num_tokens: int) -> int:
    return 16 if num_tokens <= 256 else 64


def shrink_config(num_tokens: int, num_slots: int, k: int, outputs: int) -> LoRAKernelConfig:
    """Split K until the launch has enough programs to stream every slot's A at memory bandwidth."""
    block_m = _block_m(num_tokens)
    block_n = min(128, _pow2_at_least(outputs))
    block_k = min(256 if block_n <= 64 else 128, _pow2_at_least(k))
    programs = max_token_tiles(num_tokens, num_slots, block_m) * -(-outputs // block_n)
    split_k = max(1, min(-(-k // (2 * block_k)), -(-_TARGET_PROGRAMS // programs)))
    return LoRAKernelConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k)


def expand_config(num_tokens: int, num_slots: int, col_tiles: int, rank: int) -> LoRAKernelConfig:
    """Spread each token tile's column tiles over programs until the launch can stream B at bandwidth."""
    block_m = _block_m(num_tokens)
    block_n = 128 if _pow2_at_least(rank) <= 64 else 64
    split_n = max(1, min(col_tiles, -(-_TARGET_PROGRAMS // max_token_tiles(num_tokens, num_slots, block_m))))
    return LoRAKernelConfig(block_m=block_m, block_n=block_n, split_n=split_n)


_TARGET_PROGRAMS = 1024


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("Triton is not installed; use the PyTorch twins in coserve.kernels.lora")


def _in_fp32(dtype: torch.dtype) -> bool:
    """fp32 operands multiply in full fp32; so do bf16 ones in Triton's interpreter, which multiplies bf16
    tiles wrongly (3.x)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRABatchMeta, out: torch.Tensor,
                config: LoRAKernelConfig | None = None) -> torch.Tensor:
    """out[t, i] = lora_a[slot(t), i] @ x[t] (fp32), one launch for all slots and slices; twin: lora_shrink_torch.

    x: [T, K]; lora_a: [S, n, R, K] in x's dtype; out: fp32 [T, n, R], zeroed first (rows without an adapter
    stay zero).
    """
    _require_triton()
    num_tokens, k = x.shape
    num_slots, n, rank, k_a = lora_a.shape
    if k_a != k or lora_a.dtype != x.dtype:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} {lora_a.dtype} does not fit x {tuple(x.shape)} {x.dtype}")
    if out.shape != (num_tokens, n, rank) or out.dtype != torch.float32:
        raise ValueError(f"out must be fp32 {(num_tokens, n, rank)}, got {out.dtype} {tuple(out.shape)}")
    _check_meta(meta, num_tokens, num_slots)
    out.zero_()
    if num_tokens == 0 or num_slots == 0:
        return out
    cfg = config or shrink_config(num_tokens, num_slots, k, n * rank)
    grid = (max_token_tiles(num_tokens, num_slots, cfg.block_m) * cfg.split_k, triton.cdiv(n * rank, cfg.block_n))
    _shrink_kernel[grid](
        x, lora_a, out, meta.sorted_tokens, meta.counts, meta.starts, num_slots, k, rank, n * rank,
        x.stride(0), x.stride(1), *lora_a.stride(), *out.stride(),
        BLOCK_S=_pow2_at_least(num_slots), BLOCK_M=cfg.block_m, BLOCK_J=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k, EVEN_K=k % (cfg.block_k * cfg.split_k) == 0, EVEN_J=(n * rank) % cfg.block_n == 0,
        IN_FP32=_in_fp32(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def lora_expand(buf: torch.Tensor, lora_b: torch.Tensor, meta: LoRABatchMeta, offsets: list[int] | tuple[int, ...],
                y: torch.Tensor, config: LoRAKernelConfig | None = None) -> torch.Tensor:
    """y[t, slice i] += lora_b[slot(t), slice i] @ buf[t, i], added in fp32 and rounded once; twin: lora_expand_torch.

    buf: fp32 [T, n, R]; lora_b: [S, N, R] (scaling folded in); offsets: n + 1 host ints bounding the slices
    of y's columns. Rows without an adapter are untouched.
    """
    _require_triton()
    num_tokens, n, rank = buf.shape
    num_slots, width_b, rank_b = lora_b.shape
    offsets = tuple(int(o) for o in offsets)
    if len(offsets) != n + 1 or not 1 <= n <= MAX_SLICES or list(offsets) != sorted(offsets):
        raise ValueError(f"offsets {offsets} must be {n + 1} ascending ints (at most {MAX_SLICES} slices)")
    if rank_b != rank or offsets[-1] > min(width_b, y.shape[1]) or y.shape[0] != num_tokens:
        raise ValueError(f"lora_b {tuple(lora_b.shape)}, y {tuple(y.shape)} and buf {tuple(buf.shape)} "
                         f"do not fit offsets {offsets}")
    _check_meta(meta, num_tokens, num_slots)
    if num_tokens == 0 or num_slots == 0 or offsets[-1] == offsets[0]:
        return y
    block_n = (config or expand_config(num_tokens, num_slots, 1, rank)).block_n
    col_tiles = sum(triton.cdiv(hi - lo, block_n) for lo, hi in zip(offsets[:-1], offsets[1:]))
    cfg = config or expand_config(num_tokens, num_slots, col_tiles, rank)
    split_n = min(cfg.split_n, col_tiles)
    bounds = offsets + (offsets[-1],) * (MAX_SLICES + 1 - len(offsets))
    grid = (max_token_tiles(num_tokens, num_slots, cfg.block_m), split_n)
    _expand_kernel[grid](
        buf, lora_b, y, meta.sorted_tokens, meta.counts, meta.starts, num_slots, rank, col_tiles,
        triton.cdiv(col_tiles, split_n), *bounds, *buf.stride(), *lora_b.stride(), *y.stride(),
        BLOCK_S=_pow2_at_least(num_slots), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_R=_pow2_at_least(rank), PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def lora_apply(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, meta: LoRABatchMeta,
               offsets: list[int] | tuple[int, ...], buf: torch.Tensor) -> torch.Tensor:
    """Add every token's adapter delta of a (merged) projection to its base output y: shrink, then expand."""
    lora_shrink(x, lora_a, meta, buf)
    return lora_expand(buf, lora_b, meta, offsets, y)


def _check_meta(meta: LoRABatchMeta, num_tokens: int, num_slots: int) -> None:
    if meta.num_tokens != num_tokens or meta.num_slots != num_slots:
        raise ValueError(f"metadata for {meta.num_tokens} tokens over {meta.num_slots} slots used for "
                         f"{num_tokens} tokens over {num_slots} slots")


if triton is not None:
    @triton.jit
    def _token_tile(pid_m, sorted_ptr, counts_ptr, starts_ptr, S, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr):
        """Map this program to the pid_m-th (slot, tile of that slot's tokens) pair, over every slot's tiles in
        order; returns the slot (S when pid_m is past the last tile), its tile's token rows and their mask."""
        offs_s = tl.arange(0, BLOCK_S)
        counts = tl.load(counts_ptr + offs_s, mask=offs_s < S, other=0)
        starts = tl.load(starts_ptr + offs_s, mask=offs_s < S, other=0)
        tiles = (counts + BLOCK_M - 1) // BLOCK_M
        ends = tl.cumsum(tiles, 0)
        slot = tl.sum((ends <= pid_m).to(tl.int32), 0)
        this = offs_s == slot
        first = tl.sum(tl.where(this, ends - tiles, 0), 0)
        count = tl.sum(tl.where(this, counts, 0), 0)
        start = tl.sum(tl.where(this, starts, 0), 0)
        offs_m = (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = offs_m < count
        rows = tl.load(sorted_ptr + start + offs_m, mask=mask, other=0).to(tl.int64)
        return slot, rows, mask

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, out_ptr, sorted_ptr, counts_ptr, starts_ptr, S, K, R, NR,
                       sx_t, sx_k, sa_s, sa_i, sa_r, sa_k, so_t, so_i, so_r,
                       BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_J: tl.constexpr, IN_FP32: tl.constexpr):
        """One tile of one slot's tokens times that slot's A, all slices at once: output j = (slice j // R,
        rank j % R); with SPLIT_K > 1 each program adds one K range's partial sums atomically."""
        pid_k = tl.program_id(0) % SPLIT_K
        slot, rows, m_mask = _token_tile(tl.program_id(0) // SPLIT_K, sorted_ptr, counts_ptr, starts_ptr, S,
                                         BLOCK_S, BLOCK_M)
        if slot >= S:
            return
        offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        j_mask = offs_j < NR
        part, rank = offs_j // R, offs_j % R
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None] * sx_t + offs_k[None, :] * sx_k
        a_ptrs = (a_ptr + slot.to(tl.int64) * sa_s + (part * sa_i + rank * sa_r)[None, :]
                  + offs_k[:, None] * sa_k)
        step = BLOCK_K * SPLIT_K
        acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
        for i in range(0, tl.cdiv(K - pid_k * BLOCK_K, step)):
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
                if EVEN_J:
                    at = tl.load(a_ptrs)
                else:
                    at = tl.load(a_ptrs, mask=j_mask[None, :], other=0.0)
            else:
                k_mask = offs_k < K - i * step
                xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=j_mask[None, :] & k_mask[:, None], other=0.0)
            if IN_FP32:
                acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, at, acc)
            x_ptrs += step * sx_k
            a_ptrs += step * sa_k
        out_ptrs = out_ptr + rows[:, None] * so_t + (part * so_i + rank * so_r)[None, :]
        mask = m_mask[:, None] & j_mask[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc, mask=mask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")

    @triton.jit
    def _expand_kernel(buf_ptr, b_ptr, y_ptr, sorted_ptr, counts_ptr, starts_ptr, S, R, COL_TILES, TILES_PER_PROG,
                       o0, o1, o2, o3, o4, sh_t, sh_i, sh_r, sb_s, sb_n, sb_r, sy_t, sy_n,
                       BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
        """One tile of one slot's tokens against a run of column tiles (numbered slice by slice, so none
        straddles two slices); each adds B_slice @ buf[:, slice] to y in fp32 and rounds once."""
        slot, rows, m_mask = _token_tile(tl.program_id(0), sorted_ptr, counts_ptr, starts_ptr, S, BLOCK_S, BLOCK_M)
        if slot >= S:
            return
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        t1 = (o1 - o0 + BLOCK_N - 1) // BLOCK_N
        t2 = t1 + (o2 - o1 + BLOCK_N - 1) // BLOCK_N
        t3 = t2 + (o3 - o2 + BLOCK_N - 1) // BLOCK_N
        b_slot = b_ptr + slot.to(tl.int64) * sb_s
        first_tile = tl.program_id(1) * TILES_PER_PROG
        for tile in range(first_tile, min(first_tile + TILES_PER_PROG, COL_TILES)):
            part = (tile >= t1).to(tl.int32) + (tile >= t2).to(tl.int32) + (tile >= t3).to(tl.int32)
            lo = tl.where(part == 0, o0, tl.where(part == 1, o1, tl.where(part == 2, o2, o3)))
            hi = tl.where(part == 0, o1, tl.where(part == 1, o2, tl.where(part == 2, o3, o4)))
            tile0 = tl.where(part == 0, 0, tl.where(part == 1, t1, tl.where(part == 2, t2, t3)))
            cols = lo + (tile - tile0) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = cols < hi
            h = tl.load(buf_ptr + rows[:, None] * sh_t + part * sh_i + offs_r[None, :] * sh_r,
                        mask=m_mask[:, None] & r_mask[None, :], other=0.0)
            b = tl.load(b_slot + cols[None, :] * sb_n + offs_r[:, None] * sb_r,
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            delta = tl.dot(h, b.to(tl.float32), input_precision=PRECISION)
            y_ptrs = y_ptr + rows[:, None] * sy_t + cols[None, :] * sy_n
            mask = m_mask[:, None] & n_mask[None, :]
            base = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (base + delta).to(y_ptr.dtype.element_ty), mask=mask)
