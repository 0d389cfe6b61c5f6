"""Multi-adapter LoRA for a batch whose tokens use different adapters: shrink then expand (PyTorch twins; the
spec of `lora_triton`)."""
from __future__ import annotations

import torch


def lora_shrink_torch(x: torch.Tensor, lora_a: torch.Tensor, token_lora: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """buf[t, i] = lora_a[token_lora[t], i] @ x[t] in fp32, for every slice i of a merged projection.

    x: [T, K]; lora_a: [S, n, R, K]; token_lora: [T] (a slot outside [0, S), e.g. -1, means no adapter: zero row).
    Returns (or fills) the fp32 buffer [T, n, R].
    """
    num_slots, n, rank, _ = lora_a.shape
    out = torch.empty(x.shape[0], n, rank, dtype=torch.float32, device=x.device) if out is None else out
    out.zero_()
    for slot in range(num_slots):
        rows = (token_lora == slot).nonzero().squeeze(1)
        if rows.numel():
            out[rows] = torch.einsum("tk,irk->tir", x[rows].float(), lora_a[slot].float())
    return out


def lora_expand_torch(buf: torch.Tensor, lora_b: torch.Tensor, token_lora: torch.Tensor,
                      offsets: list[int] | tuple[int, ...], y: torch.Tensor) -> torch.Tensor:
    """y[t, offsets[i]:offsets[i+1]] += lora_b[token_lora[t], offsets[i]:offsets[i+1]] @ buf[t, i].

    buf: fp32 [T, n, R]; lora_b: [S, N, R] with the LoRA scaling folded in; y: [T, N]. The delta is added to
    y in fp32 and rounded once; rows of tokens without an adapter stay untouched. Returns y.
    """
    for slot in range(lora_b.shape[0]):
        rows = (token_lora == slot).nonzero().squeeze(1)
        if not rows.numel():
            continue
        acc = y[rows].float()
        for i, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
            acc[:, lo:hi] += buf[rows, i] @ lora_b[slot, lo:hi].float().T
        y[rows] = acc.to(y.dtype)
    return y
