"""Multi-adapter LoRA delta for a batch whose tokens use different adapters (PyTorch twin; the spec)."""
from __future__ import annotations

import torch


def lora_delta_torch(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor,
                     groups: list[tuple[int, torch.Tensor]], out: torch.Tensor) -> torch.Tensor:
    """Add scale[s] * B[s] @ A[s] @ x to `out` for each (slot s, token indices) group; other rows untouched.

    x: [T, in]; lora_a: [S, R, in]; lora_b: [S, out, R]; scale: [S]. Ranks below R are zero-padded,
    so the padding contributes nothing.
    """
    for slot, rows in groups:
        xs = x.index_select(0, rows)
        delta = (xs @ lora_a[slot].T) @ lora_b[slot].T
        out.index_add_(0, rows, delta * scale[slot])
    return out
