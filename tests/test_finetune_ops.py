"""The backward units' fast ops equal their specs: the blocked linear cross-entropy equals full-logits autograd,
and SDPA attention over [cached keys, own keys] equals the reference causal attention, values and gradients."""
from __future__ import annotations

import pytest
import torch

from coserve.engine.finetune import loss as loss_mod
from coserve.engine.finetune.dataset import IGNORE
from coserve.engine.finetune.loss import linear_cross_entropy, linear_cross_entropy_torch
from coserve.kernels.paged_attention import causal_attention, causal_attention_sdpa


@pytest.mark.parametrize("rows,hidden,vocab,block_rows", [(1, 8, 11, 1), (37, 16, 50, 8), (64, 32, 300, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_linear_cross_entropy_equals_full_logits(monkeypatch, rows, hidden, vocab, block_rows, dtype):
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    w = torch.randn(vocab, hidden, generator=g).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::3] = IGNORE
    monkeypatch.setattr(loss_mod, "BLOCK_BYTES", 4 * vocab * block_rows)
    loss, grad = linear_cross_entropy(x, w, targets, 0.37)
    ref_loss, ref_grad = linear_cross_entropy_torch(x, w, targets, 0.37)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert grad.dtype == x.dtype
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol * grad.float().abs().max().item())


def test_all_ignored_rows_give_zero_loss_and_gradient():
    x, w = torch.randn(5, 8), torch.randn(13, 8)
    loss, grad = linear_cross_entropy(x, w, torch.full((5,), IGNORE), 1.0)
    assert loss.item() == 0.0 and not grad.any()


@pytest.mark.parametrize("n,ctx,heads,kv_heads,window", [(5, 5, 4, 4, None), (3, 17, 8, 2, None),
                                                         (16, 40, 4, 1, None), (6, 30, 4, 2, 8), (4, 9, 2, 2, 64)])
def test_sdpa_attention_equals_reference_values_and_gradients(n, ctx, heads, kv_heads, window):
    g = torch.Generator().manual_seed(n * ctx + heads)
    q = torch.randn(n, heads, 16, generator=g)
    k = torch.randn(ctx, kv_heads, 16, generator=g)
    v = torch.randn(ctx, kv_heads, 16, generator=g)
    up = torch.randn(n, heads, 16, generator=g)
    results = []
    for fn in (causal_attention_sdpa, causal_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, 0.25, window)
        out.backward(up)
        results.append([out.detach()] + [t.grad for t in leaves])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
