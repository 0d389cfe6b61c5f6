"""Norm, rotary and activation: the fused Triton kernel on a GPU when no gradient is wanted, else the twin."""
from __future__ import annotations

import os

import torch
from torch import nn

from coserve.kernels import fused_ops, gemv, norm_rotary

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_kernels(fast: bool, x: torch.Tensor) -> bool:
    """Kernels serve on a GPU (or in Triton's interpreter, which tests use on a CPU) when no gradient is wanted:
    they have no backward, so finetuning's recompute units run the twins."""
    return fast and (x.is_cuda or INTERPRET) and not torch.is_grad_enabled()


class RMSNorm(nn.Module):
    """RMSNorm that first adds the residual stream when given one: returns (normed, new residual)."""

    def __init__(self, dim: int, eps: float, fast: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.fast = eps, fast

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ops = fused_ops if use_kernels(self.fast, x) else norm_rotary
        return ops.rms_norm(x, self.weight, self.eps, residual)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
           fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by their positions (in place on the fast path)."""
    if use_kernels(fast, q):
        fused_ops.rotary(q, k, positions, cos_sin)
        return q, k
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    return norm_rotary.rotate(q, cos, sin), norm_rotary.rotate(k, cos, sin)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fast: bool) -> torch.Tensor:
    """A single row (batch-1 decode) through the one-row kernel, which streams the weight faster than cuBLAS;
    any other batch through F.linear, the twin."""
    if x.shape[0] == 1 and gemv.AVAILABLE and use_kernels(fast, x):
        return gemv.linear_one_row(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


def silu_and_mul(x: torch.Tensor, fast: bool) -> torch.Tensor:
    return (fused_ops if use_kernels(fast, x) else norm_rotary).silu_and_mul(x)
