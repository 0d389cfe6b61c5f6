"""RMSNorm (with the residual add), rotary embedding and SiLU-and-mul in plain PyTorch: the specification the
Triton kernels of `fused_ops` are tested against, and the path used where Triton is not (CPU, training)."""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face Llama RMSNorm of `x + residual` (the sum rounded to x.dtype, as the unfused model adds).

    Normalises in fp32, rounds to x.dtype, then multiplies by the weight in x.dtype. x: [..., hidden].
    Returns (normed, residual_out); residual_out is the sum, or x itself when there is no residual.
    """
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.to(x.dtype) * normed, x


def rotary_cache(inv_freq: torch.Tensor, max_pos: int) -> torch.Tensor:
    """cos and sin of every position up to `max_pos`, fp32 [max_pos, D]: the first D/2 columns cos, the rest sin.

    Computed as the unfused model computes them per batch (position * inv_freq in fp32), so lookups are equal.
    """
    freqs = torch.arange(max_pos, device=inv_freq.device).float()[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (Hugging Face Llama / NeoX convention) in fp32, rounded once. x: [T, H, D]; cos/sin: [T, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (they may be strided views of one qkv output)."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    q.copy_(rotate(q, cos, sin))
    k.copy_(rotate(k, cos, sin))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2I] = [gate | up] -> silu(gate) * up, [..., I], computed in fp32 and rounded once."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
