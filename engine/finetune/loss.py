"""The loss head of a backward unit: linear + cross-entropy over the vocabulary, a block of rows at a time, so
no [tokens, vocab] logits are ever kept (after Liger Kernel's fused linear cross-entropy). The plain autograd
version beside it is the spec."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from coserve.engine.finetune.dataset import IGNORE
from coserve.engine.layers.ops import use_kernels
from coserve.kernels import cross_entropy

BLOCK_BYTES = 256 * 2**20          # logits of one block of rows, in x's dtype: 1024 rows of a 128k vocabulary in
                                   # bf16, so the projection's GEMMs read the head's weight once per 1024 rows


def linear_cross_entropy_torch(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec: (summed loss, d(scale * summed loss)/dx) through full fp32 logits and autograd."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        loss = F.cross_entropy((x @ weight.T).float(), targets, ignore_index=IGNORE, reduction="sum")
        (loss * scale).backward()
    return loss.detach(), x.grad


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                         fast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal to `linear_cross_entropy_torch` (same roundings: logits rounded to x's dtype, then fp32), in blocks
    of rows; each block's logits are overwritten by their gradient (the fused kernel with `fast` on a GPU, else its
    twin), projected back into the block's rows of dx, then dropped."""
    rows = max(1, BLOCK_BYTES // (x.element_size() * weight.shape[0]))
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    grad = torch.empty_like(x)
    with torch.no_grad():
        fused = cross_entropy.AVAILABLE and use_kernels(fast, x)
        ce = cross_entropy.cross_entropy_backward_ if fused else cross_entropy.cross_entropy_backward_torch_
        for lo in range(0, x.shape[0], rows):
            logits = x[lo:lo + rows] @ weight.T
            loss += ce(logits, targets[lo:lo + rows], scale, IGNORE).sum()
            torch.matmul(logits, weight, out=grad[lo:lo + rows])
    return loss, grad
