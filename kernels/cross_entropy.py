"""Cross-entropy's backward from logits, in place, in one Triton kernel: each row's log-sum-exp in fp32 over the
vocabulary, then the row overwritten with d(scale * loss)/d(logits). The finetuning loss head runs it on a block of
rows of the vocabulary projection; the unfused chain (fp32 copy, logsumexp, exp, scatter, scale, cast back) reads
and writes the [rows, vocab] block about ten times, this reads it twice and writes it once.
`cross_entropy_backward_torch_` beside it is the spec."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:   # CPU-only installs: the twin serves
    AVAILABLE = False

BLOCK_V = 4096
INTERPRET_BLOCK_V = 1024


def cross_entropy_backward_torch_(logits: torch.Tensor, targets: torch.Tensor, scale: float,
                                  ignore_index: int) -> torch.Tensor:
    """The spec: each row's loss (fp32, 0 where the target is `ignore_index`); `logits` [R, V] becomes
    scale * (softmax - onehot) of its fp32 values, rounded to its dtype (0 on ignored rows)."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    picked = z.gather(1, safe[:, None])[:, 0]
    loss = torch.where(valid, lse - picked, 0.0)
    probs = torch.exp_(z.sub_(lse[:, None]))
    probs.scatter_add_(1, safe[:, None], torch.full_like(picked, -1.0)[:, None])
    probs.mul_((valid.float() * scale)[:, None])
    logits.copy_(probs)
    return loss


def cross_entropy_backward_(logits: torch.Tensor, targets: torch.Tensor, scale: float,
                            ignore_index: int) -> torch.Tensor:
    """`cross_entropy_backward_torch_` in one launch, a program per row: equal up to the order of the fp32 sums."""
    if not AVAILABLE:
        raise RuntimeError("Triton is not installed; use cross_entropy_backward_torch_")
    rows, vocab = logits.shape
    if logits.stride(1) != 1 or targets.shape != (rows,):
        raise ValueError(f"cross_entropy_backward_ takes row-major logits [R, V] and targets [R]; got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(BLOCK_V if logits.is_cuda else INTERPRET_BLOCK_V, triton.next_power_of_2(vocab))
        _ce_backward_kernel[(rows,)](logits, targets, loss, vocab, logits.stride(0), float(scale), ignore_index,
                                     BLOCK_V=block, num_warps=8)
    return loss


if AVAILABLE:
    @triton.jit
    def _ce_backward_kernel(z_ptr, t_ptr, loss_ptr, V, stride_row, scale, ignore, BLOCK_V: tl.constexpr):
        """One row: online max and sum of exponentials over V tiles, then the gradient written over the row."""
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_row
        offs = tl.arange(0, BLOCK_V)
        m = tl.full((BLOCK_V,), -1e30, tl.float32)     # finite: a lane no tile reaches adds exp(-1e30 - max) = 0
        s = tl.zeros((BLOCK_V,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            z = tl.load(z_row + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, z)
            s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
            m = m_new
        m_row = tl.max(m, 0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
        target = tl.load(t_ptr + row)
        valid = target != ignore
        safe = tl.where(valid, target, 0)
        picked = tl.load(z_row + safe).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
        coef = tl.where(valid, scale, 0.0)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            mask = idx < V
            z = tl.load(z_row + idx, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(z - lse) - tl.where(idx == safe, 1.0, 0.0)
            tl.store(z_row + idx, (p * coef).to(z_ptr.dtype.element_ty), mask=mask)
