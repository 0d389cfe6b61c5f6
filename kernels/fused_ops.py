"""Triton kernels for the small per-token ops: RMSNorm fused with the residual add, in-place rotary, SiLU-and-mul.

Same signatures and numerics as their twins in `norm_rotary` (the spec). Without Triton this module still
imports; `AVAILABLE` is then False and the callers use the twins.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:   # CPU-only installs (macOS): the twins serve
    AVAILABLE = False


def _require_triton() -> None:
    if not AVAILABLE:
        raise RuntimeError("Triton is not installed; use coserve.kernels.norm_rotary instead")


def _warps(block: int) -> int:
    return 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with a unit column stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


if AVAILABLE:
    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, x_stride, res_stride, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        dtype = out_ptr.dtype.element_ty
        x_row = x_ptr + row * x_stride
        res_row = res_ptr + row * res_stride
        out_row = out_ptr + row * n_cols
        res_out_row = res_out_ptr + row * n_cols
        cols = tl.arange(0, BLOCK)
        if ONE_PASS:
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                r = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
                x = (x + r).to(dtype).to(tl.float32)
                tl.store(res_out_row + cols, x.to(dtype), mask=mask)
            rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(dtype).to(tl.float32)
            normed = (x * rstd).to(dtype).to(tl.float32)
            tl.store(out_row + cols, (w * normed).to(dtype), mask=mask)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_RES:
                    r = tl.load(res_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                    x = (x + r).to(dtype).to(tl.float32)
                    tl.store(res_out_row + start + cols, x.to(dtype), mask=mask)
                acc += x * x
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                if HAS_RES:
                    x = tl.load(res_out_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(dtype).to(tl.float32)
                normed = (x * rstd).to(dtype).to(tl.float32)
                tl.store(out_row + start + cols, (w * normed).to(dtype), mask=mask)

    @triton.jit
    def _rotate_heads(base, head0, n_heads, head_stride, cos, sin, half, BLOCK_H: tl.constexpr,
                      BLOCK_D: tl.constexpr):
        heads = head0 + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (heads < n_heads)[:, None] & (d < half)[None, :]
        p1 = base + heads[:, None].to(tl.int64) * head_stride + d[None, :]
        p2 = p1 + half
        dtype = base.dtype.element_ty
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        c = cos[None, :]
        s = sin[None, :]
        tl.store(p1, (x1 * c - x2 * s).to(dtype), mask=mask)
        tl.store(p2, (x2 * c + x1 * s).to(dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cache_ptr, q_tok_stride, q_head_stride, k_tok_stride,
                       k_head_stride, cache_stride, n_q_heads, n_k_heads, half,
                       BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        cos = tl.load(cache_ptr + pos * cache_stride + d, mask=d < half, other=0.0)
        sin = tl.load(cache_ptr + pos * cache_stride + half + d, mask=d < half, other=0.0)
        q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
        if blk < q_blocks:
            _rotate_heads(q_ptr + tok * q_tok_stride, blk * BLOCK_H, n_q_heads, q_head_stride, cos, sin, half,
                          BLOCK_H, BLOCK_D)
        else:
            _rotate_heads(k_ptr + tok * k_tok_stride, (blk - q_blocks) * BLOCK_H, n_k_heads, k_head_stride,
                          cos, sin, half, BLOCK_H, BLOCK_D)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, inter, x_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * inter + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


_MAX_ONE_PASS = 16384


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of `x + residual` in one kernel (one program per row): returns (normed, residual_out)."""
    _require_triton()
    hidden = x.shape[-1]
    x2 = _rows(x)
    res2 = _rows(residual) if residual is not None else x2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else x
    if x2.shape[0] == 0:
        return out, res_out
    block = min(triton.next_power_of_2(hidden), _MAX_ONE_PASS)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, res2, weight, out, res_out if residual is not None else out, hidden, x2.stride(0), res2.stride(0),
        eps, HAS_RES=residual is not None, BLOCK=block, ONE_PASS=block >= hidden, num_warps=_warps(block))
    return out, res_out


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place; any token and head strides, unit stride within a head."""
    _require_triton()
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary needs a unit stride along the head dimension")
    tokens, n_q, d = q.shape
    n_k = k.shape[1]
    if tokens == 0:
        return
    block_d = triton.next_power_of_2(d // 2)
    block_h = max(1, min(triton.next_power_of_2(max(n_q, n_k)), 2048 // block_d))
    grid = (tokens, triton.cdiv(n_q, block_h) + triton.cdiv(n_k, block_h))
    _rotary_kernel[grid](q, k, positions, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         cos_sin_cache.stride(0), n_q, n_k, d // 2, BLOCK_H=block_h, BLOCK_D=block_d,
                         num_warps=_warps(block_h * block_d))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] = [gate | up] -> silu(gate) * up ([..., I]), fp32 math, rounded once."""
    _require_triton()
    inter = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out
    block = min(triton.next_power_of_2(inter), 1024)
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](x2, out, inter, x2.stride(0), BLOCK=block,
                                                                   num_warps=_warps(block))
    return out
