"""The loss head of a backward unit: linear + cross-entropy over the vocabulary, a block of rows at a time, so
no [tokens, vocab] logits are ever kept (after Liger Kernel's fused linear cross-entropy). The plain autograd
version beside it is the spec."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from coserve.engine.finetune.dataset import IGNORE

BLOCK_BYTES = 64 * 2**20           # fp32 logits of one block of rows


def linear_cross_entropy_torch(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec: (summed loss, d(scale * summed loss)/dx) through full fp32 logits and autograd."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        loss = F.cross_entropy((x @ weight.T).float(), targets, ignore_index=IGNORE, reduction="sum")
        (loss * scale).backward()
    return loss.detach(), x.grad


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal to `linear_cross_entropy_torch` (same roundings: logits rounded to x's dtype, then fp32), in blocks
    of rows; the gradient of each block is written as soon as its logits are done, then they are dropped."""
    rows = max(1, BLOCK_BYTES // (4 * weight.shape[0]))
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    grad = torch.empty_like(x)
    with torch.no_grad():
        for lo in range(0, x.shape[0], rows):
            xs, t = x[lo:lo + rows], targets[lo:lo + rows]
            logits = (xs @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = t != IGNORE
            safe = torch.where(valid, t, 0)
            picked = logits.gather(1, safe[:, None])[:, 0]
            loss += torch.where(valid, lse - picked, 0.0).sum()
            probs = torch.exp_(logits.sub_(lse[:, None]))
            probs.scatter_add_(1, safe[:, None], torch.full_like(picked, -1.0)[:, None])
            probs.mul_((valid.float() * scale)[:, None])
            torch.matmul(probs.to(x.dtype), weight, out=grad[lo:lo + rows])
    return loss, grad
