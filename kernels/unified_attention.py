"""Triton paged attention for a flat batch mixing decode tokens and prefill chunks, in one launch.

Every sequence b owns query rows query_start_loc[b]:query_start_loc[b+1], the last positions of its seq_lens[b]
keys in the paged cache. A program takes one query tile (BLOCK_Q consecutive queries of one sequence times the
Hq/Hkv query heads of one KV head, packed as the rows of one matrix) and walks the sequence's keys in tiles of
TILE_N (several cache blocks, looked up per key in the block table) with an online softmax in fp32, so each K/V
tile is read once per query tile and KV head; tiles that every row sees whole skip the masks. The grid is
(cdiv(T, BLOCK_Q) + B, Hkv, splits): it depends on shapes only (CUDA-graph safe); a program finds its sequence
by binary search over query_start_loc, and the programs past the last sequence write zeros into the rows
query_start_loc[B]:T. With splits > 1 each program covers one contiguous share of its key tiles and stores a
normalised partial output and its log-sum-exp; a second launch merges the shares. `write_kv` stores new keys
and values at their slots, skipping slot < 0.
"""
from __future__ import annotations


import torch

try:
    import triton
    import triton.language as tl
except ImportError:     # the PyTorch twins in paged_attention.py stay usable without Triton
    triton = None

HAS_TRITON = triton is not None
_LOG2E = 1.4426950408889634


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


if HAS_TRITON:
    @triton.jit
    def _attend(q, m_i, l_i, acc, table, k_ptr, v_ptr, k_s0, k_s1, v_s0, v_s1, pos, key_hi, t_lo, t_hi,
                qk_scale, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, TILE_N: tl.constexpr,
                WINDOW: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """Online-softmax update of (m_i, l_i, acc) with key tiles [t_lo, t_hi); MASKED applies causality,
        the window and the sequence end, which tiles seen whole by every row do without."""
        offs_n = tl.arange(0, TILE_N)
        offs_d = tl.arange(0, D_PAD)
        for t in range(t_lo, t_hi):
            keys = t * TILE_N + offs_n
            if MASKED:
                key_ok = keys < key_hi
                block = tl.load(table + keys // BS, mask=key_ok, other=0).to(tl.int64)
            else:
                block = tl.load(table + keys // BS).to(tl.int64)
            slot_k = block * k_s0 + (keys % BS) * k_s1
            slot_v = block * v_s0 + (keys % BS) * v_s1
            if MASKED:
                k = tl.load(k_ptr + slot_k[None, :] + offs_d[:, None], mask=key_ok[None, :] & (offs_d < D)[:, None],
                            other=0.0)
                v = tl.load(v_ptr + slot_v[:, None] + offs_d[None, :], mask=key_ok[:, None] & (offs_d < D)[None, :],
                            other=0.0)
            elif D_PAD != D:
                k = tl.load(k_ptr + slot_k[None, :] + offs_d[:, None], mask=(offs_d < D)[:, None], other=0.0)
                v = tl.load(v_ptr + slot_v[:, None] + offs_d[None, :], mask=(offs_d < D)[None, :], other=0.0)
            else:
                k = tl.load(k_ptr + slot_k[None, :] + offs_d[:, None])
                v = tl.load(v_ptr + slot_v[:, None] + offs_d[None, :])
            s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION) * qk_scale
            if MASKED:
                seen = key_ok[None, :] & (keys[None, :] <= pos[:, None])
                if WINDOW > 0:
                    seen = seen & (keys[None, :] > pos[:, None] - WINDOW)
                s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED:
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)     # rows that saw no key yet stay at zero
            else:
                m_ref = m_new
            p = tl.math.exp2(s - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit(do_not_specialize=["num_seqs", "num_rows"])
    def _attention_kernel(
            q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, lse_ptr, qsl_ptr, seq_lens_ptr, bt_ptr,
            qk_scale, num_seqs, num_rows,
            q_s0, q_s1, o_s0, o_s1, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2, bt_s0,
            HQ: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
            D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, TILE_N: tl.constexpr,
            WINDOW: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr):
        BLOCK_M: tl.constexpr = BLOCK_Q * G_PAD
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)

        # The sequence whose query tiles hold this program: the largest b in [0, B] with first_tile(b) <= pid,
        # where first_tile(b) = query_start_loc[b] // BLOCK_Q + b; b == B stands for the padding rows after the
        # last sequence. Sequence b gets (query_start_loc[b+1] // BLOCK_Q) - (query_start_loc[b] // BLOCK_Q) + 1
        # >= cdiv(query_len, BLOCK_Q) tiles, so every row has a program whatever the lengths.
        lo = num_seqs * 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
                lo = mid
            else:
                hi = mid - 1
        b = lo
        is_seq = b < num_seqs
        row_lo = tl.load(qsl_ptr + b)
        row_hi = tl.where(is_seq, tl.load(qsl_ptr + tl.minimum(b + 1, num_seqs)), num_rows)
        seq_len = tl.where(is_seq, tl.load(seq_lens_ptr + tl.minimum(b, num_seqs - 1)), 0)
        tile = pid - (row_lo // BLOCK_Q + b)
        row0 = row_lo + tile * BLOCK_Q
        if row0 >= row_hi:
            return
        ctx_start = seq_len - (row_hi - row_lo)      # position of the sequence's first query

        offs_m = tl.arange(0, BLOCK_M)
        rows = row0 + offs_m // G_PAD
        heads = kvh * G + offs_m % G_PAD
        row_ok = (rows >= row_lo) & (rows < row_hi) & (offs_m % G_PAD < G)
        pos = ctx_start + rows - row_lo
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * q_s0 + heads[:, None] * q_s1 + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        # Keys this tile can see: [key_lo, key_hi), cut into `SPLITS` shares of whole TILE_N tiles.
        first_pos = ctx_start + tl.maximum(row0, row_lo) - row_lo
        last_pos = ctx_start + tl.minimum(row0 + BLOCK_Q, row_hi) - 1 - row_lo
        key_hi = tl.maximum(tl.minimum(last_pos + 1, seq_len), 0)
        key_lo = 0
        if WINDOW > 0:
            key_lo = tl.maximum(first_pos - WINDOW + 1, 0)
        tile_lo = key_lo // TILE_N
        tile_hi = tl.maximum((key_hi + TILE_N - 1) // TILE_N, tile_lo)
        per_split = (tile_hi - tile_lo + SPLITS - 1) // SPLITS
        t_start = tile_lo + split * per_split
        t_end = tl.minimum(t_start + per_split, tile_hi)

        # Tiles where every row sees every key skip the masks: [full_lo, full_hi) keys are visible to all rows.
        full_hi = tl.maximum(first_pos + 1, 0) // TILE_N
        full_lo = tile_lo
        if WINDOW > 0:
            full_lo = (tl.maximum(last_pos - WINDOW + 1, 0) + TILE_N - 1) // TILE_N
        full_lo = tl.minimum(tl.maximum(full_lo, t_start), t_end)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), t_end)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        table = bt_ptr + b.to(tl.int64) * bt_s0
        k_ptr += kvh * k_s2
        v_ptr += kvh * v_s2
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, table, k_ptr, v_ptr, k_s0, k_s1, v_s0, v_s1, pos, key_hi,
                                t_start, full_lo, qk_scale, D, D_PAD, BS, TILE_N, WINDOW, True, PRECISION)
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, table, k_ptr, v_ptr, k_s0, k_s1, v_s0, v_s1, pos, key_hi,
                                full_lo, full_hi, qk_scale, D, D_PAD, BS, TILE_N, WINDOW, False, PRECISION)
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, table, k_ptr, v_ptr, k_s0, k_s1, v_s0, v_s1, pos, key_hi,
                                full_hi, t_end, qk_scale, D, D_PAD, BS, TILE_N, WINDOW, True, PRECISION)

        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        if SPLITS == 1:
            tl.store(out_ptr + rows.to(tl.int64)[:, None] * o_s0 + heads[:, None] * o_s1 + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:
            cell = (rows.to(tl.int64) * HQ + heads) * SPLITS + split
            tl.store(part_ptr + cell[:, None] * D_PAD + offs_d[None, :], o, mask=row_ok[:, None])
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            tl.store(lse_ptr + cell, lse, mask=row_ok)

    @triton.jit
    def _merge_splits_kernel(out_ptr, part_ptr, lse_ptr, o_s0, o_s1, HQ: tl.constexpr, D: tl.constexpr,
                             D_PAD: tl.constexpr, SPLITS: tl.constexpr, S_PAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D_PAD)
        s_ok = offs_s < SPLITS
        cell = (row * HQ + head) * SPLITS + offs_s
        lse = tl.load(lse_ptr + cell, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        weight = tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
        total = tl.sum(weight, 0)
        part = tl.load(part_ptr + cell[:, None] * D_PAD + offs_d[None, :], mask=s_ok[:, None], other=0.0)
        o = tl.sum(part * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
        tl.store(out_ptr + row * o_s0 + head * o_s1 + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, k_s0, k_s1, v_s0, v_s1,
                         kc_s0, kc_s1, kc_s2, vc_s0, vc_s1, vc_s2,
                         HKV: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                         BS: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot < 0:
            return
        offs_h = tl.arange(0, H_PAD)
        offs_d = tl.arange(0, D_PAD)
        ok = (offs_h < HKV)[:, None] & (offs_d < D)[None, :]
        block, off = slot // BS, slot % BS
        k = tl.load(k_ptr + t * k_s0 + offs_h[:, None] * k_s1 + offs_d[None, :], mask=ok)
        v = tl.load(v_ptr + t * v_s0 + offs_h[:, None] * v_s1 + offs_d[None, :], mask=ok)
        tl.store(kc_ptr + block * kc_s0 + off * kc_s1 + offs_h[:, None] * kc_s2 + offs_d[None, :],
                 k.to(kc_ptr.dtype.element_ty), mask=ok)
        tl.store(vc_ptr + block * vc_s0 + off * vc_s1 + offs_h[:, None] * vc_s2 + offs_d[None, :],
                 v.to(vc_ptr.dtype.element_ty), mask=ok)


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed: use the PyTorch twins in coserve.kernels.paged_attention")


def _tiling(group_pad: int, head_dim_pad: int, max_query_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_Q, TILE_N, num_warps, num_stages), swept on an H100 at D = 128 (bf16, 16-key cache blocks):
    decode packs 16 rows and streams 128-key tiles; prefill chunks take 128 rows against 32-key tiles."""
    if max_query_len <= 1:
        return max(1, 16 // group_pad), 128 if head_dim_pad <= 128 else 64, 4, 3 if head_dim_pad <= 128 else 2
    return max(1, (128 if head_dim_pad <= 128 else 64) // group_pad), 32, 4, 2


def unified_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, sliding_window: int | None, max_query_len: int,
                      num_kv_splits: int = 1) -> None:
    """Causal attention of q's rows over the paged cache into `out`; rows past query_start_loc[-1] get zeros.

    q, out: [T, Hq, D] (last dim contiguous); caches: [num_blocks, block_size, Hkv, D]; query_start_loc:
    int32 [B+1]; seq_lens: int32 [B] (keys of b, its queries included); block_tables: int32 [B, max_blocks].
    max_query_len only picks the tiling; the launch grid depends on T, B, Hkv and num_kv_splits alone.
    """
    _require_triton()
    num_rows, hq, d = q.shape
    num_seqs = seq_lens.shape[0]
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    if hq % hkv or out.shape != q.shape or k_cache.shape != v_cache.shape or k_cache.shape[3] != d:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, out {tuple(out.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if q.stride(2) != 1 or out.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q, out and the caches need a contiguous last dimension")
    if num_rows == 0:
        return
    if num_seqs == 0:
        out.zero_()
        return
    group = hq // hkv
    group_pad, d_pad = _next_pow2(group), max(16, _next_pow2(d))
    block_q, tile_n, num_warps, num_stages = _tiling(group_pad, d_pad, max_query_len)
    if block_q * group_pad < 16:
        block_q = 16 // group_pad
    splits = max(1, int(num_kv_splits))
    if splits > 1:
        part = torch.empty(num_rows, hq, splits, d_pad, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_rows, hq, splits, dtype=torch.float32, device=q.device)
    else:
        part = lse = out
    grid = (triton.cdiv(num_rows, block_q) + num_seqs, hkv, splits)
    _attention_kernel[grid](
        q, k_cache, v_cache, out, part, lse, query_start_loc, seq_lens, block_tables,
        scale * _LOG2E, num_seqs, num_rows,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HQ=hq, G=group, G_PAD=group_pad, BLOCK_Q=block_q, D=d, D_PAD=d_pad, BS=block_size, TILE_N=tile_n,
        WINDOW=int(sliding_window or 0), SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        _merge_splits_kernel[(num_rows, hq)](out, part, lse, out.stride(0), out.stride(1), HQ=hq, D=d,
                                              D_PAD=d_pad, SPLITS=splits, S_PAD=_next_pow2(splits),
                                              num_warps=4 if d_pad >= 128 else 1)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k, v ([T, Hkv, D]) at their slots (block * block_size + offset) of the caches; slot < 0 is skipped."""
    _require_triton()
    num_rows, hkv, d = k.shape
    if v.shape != k.shape or k_cache.shape[2:] != (hkv, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"shapes do not fit: k {tuple(k.shape)}, v {tuple(v.shape)}, cache {tuple(k_cache.shape)}")
    if k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k, v and the caches need a contiguous last dimension")
    if num_rows == 0:
        return
    _write_kv_kernel[(num_rows,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HKV=hkv, H_PAD=_next_pow2(hkv), D=d, D_PAD=_next_pow2(d), BS=k_cache.shape[1],
        num_warps=4 if hkv * d >= 1024 else 1)
