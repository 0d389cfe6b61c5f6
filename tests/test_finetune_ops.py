"""The backward units' fast ops equal their specs: the blocked linear cross-entropy equals full-logits autograd,
SDPA attention over [cached keys, own keys] equals the reference causal attention, values and gradients, and a
unit over a bucket of past positions (what one CUDA graph serves for many starts) equals the exact unit."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from coserve.engine.finetune import loss as loss_mod
from coserve.engine.finetune.dataset import IGNORE
from coserve.engine.finetune.loss import linear_cross_entropy, linear_cross_entropy_torch
from coserve.engine.finetune.adapter import TrainAdapter
from coserve.engine.finetune.backward import TOKEN_STEP, LayerInputs, context_bucket, layer_grads, unit_mask, unit_rows
from coserve.engine.finetune.spec import LoRASpec
from coserve.kernels import cross_entropy
from coserve.kernels.paged_attention import causal_attention, causal_attention_sdpa, masked_attention_sdpa
from coserve_testlib import make_engine


@pytest.mark.parametrize("rows,hidden,vocab,block_rows", [(1, 8, 11, 1), (37, 16, 50, 8), (64, 32, 300, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fast", [False, True])
def test_blocked_linear_cross_entropy_equals_full_logits(monkeypatch, rows, hidden, vocab, block_rows, dtype, fast):
    """Through the twin, and (`fast`) the fused kernel: on a GPU, or in Triton's interpreter on a CPU."""
    g = torch.Generator().manual_seed(rows * vocab)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(rows, hidden, generator=g).to(device, dtype)
    w = torch.randn(vocab, hidden, generator=g).to(device, dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g).to(device)
    targets[::3] = IGNORE
    monkeypatch.setattr(loss_mod, "BLOCK_BYTES", x.element_size() * vocab * block_rows)
    if fast:   # the fused kernel must be what runs
        monkeypatch.setattr(cross_entropy, "cross_entropy_backward_torch_", None)
    loss, grad = linear_cross_entropy(x, w, targets, 0.37, fast)
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


@pytest.mark.parametrize("n,start,kv_heads,window", [(4, 3, 2, None), (8, 16, 1, None), (5, 40, 2, 9), (3, 1, 2, 2)])
def test_attention_over_a_bucket_of_past_keys_equals_the_exact_past(n, start, kv_heads, window):
    """Past keys gathered up to the bucket and masked from the start on (there they are garbage, zeroed) give the
    exact attention, and the masked ones get no gradient."""
    g = torch.Generator().manual_seed(n * start)
    context = context_bucket(start)
    q = torch.randn(n, 4, 16, generator=g)
    past_k, past_v = torch.randn(context, kv_heads, 16, generator=g), torch.randn(context, kv_heads, 16, generator=g)
    own_k, own_v = torch.randn(n, kv_heads, 16, generator=g), torch.randn(n, kv_heads, 16, generator=g)
    up = torch.randn(n, 4, 16, generator=g)
    positions = torch.arange(start, start + n)
    exact = [t.clone().requires_grad_() for t in (q, past_k[:start], past_v[:start], own_k, own_v)]
    out = causal_attention(exact[0], torch.cat([exact[1], exact[3]]), torch.cat([exact[2], exact[4]]), 0.25, window)
    out.backward(up)
    bucket = [t.clone().requires_grad_() for t in (q, past_k, past_v, own_k, own_v)]
    mask = unit_mask(positions, context, torch.tensor(start), window)
    ours = masked_attention_sdpa(bucket[0], torch.cat([bucket[1], bucket[3]]), torch.cat([bucket[2], bucket[4]]),
                                 0.25, mask)
    ours.backward(up)
    torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-5)
    for mine, ref in zip(bucket, exact):
        torch.testing.assert_close(mine.grad[:ref.shape[0]], ref.grad, rtol=1e-5, atol=1e-5)
    assert not bucket[1].grad[start:].any() and not bucket[2].grad[start:].any()


def layer_unit(llama_dir, start: int, n: int):
    """A tiny model's layer 1 with random KV blocks (NaN past the start: not the unit's past), a random r=4 adapter
    and random unit inputs: (model, cache, adapter, params, inputs)."""
    engine = make_engine(llama_dir, num_kv_blocks=32)
    cfg, cache = engine.model.cfg, engine.kv_caches[1]
    g = torch.Generator().manual_seed(start)
    for c in cache:
        c.copy_(torch.randn(c.shape, generator=g))
    bs, context = cache[0].shape[1], context_bucket(start)
    blocks = -(-max(context, start + n) // bs)
    table = torch.randperm(32, generator=g)[:blocks]
    for pos in range(start, blocks * bs):      # what lies past the start in the sequence's blocks is not its past
        cache[0][table[pos // bs], pos % bs] = float("nan")
    adapter = TrainAdapter(engine.model, LoRASpec(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), 3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.1, generator=g)
    kv = (n, cfg.num_kv_heads, cfg.head_dim)
    hidden = (n, cfg.hidden_size)
    inputs = LayerInputs(torch.randn(hidden, generator=g), table, torch.randn(hidden, generator=g),
                         torch.randn(kv, generator=g), torch.randn(kv, generator=g), start)
    return engine.model, cache, adapter, adapter.layer_parameters(1), inputs


@pytest.mark.parametrize("start,n", [(5, 7), (16, 16), (33, 4)])
def test_a_layer_unit_over_a_bucket_of_past_keys_equals_the_exact_unit(llama_dir, start, n):
    """layer_grads with `context` (a graph's view: past keys up to the bucket, those past the start holding NaN
    here) equals the exact unit: gradients of the input, of the past keys and values, and of the LoRA weights."""
    model, cache, adapter, params, inputs = layer_unit(llama_dir, start, n)
    context = context_bucket(start)
    exact = layer_grads(model, 1, cache, adapter, inputs, params)
    bucket = layer_grads(model, 1, cache, adapter, dataclasses.replace(inputs, start=torch.tensor(start)),
                         params, context=context)
    torch.testing.assert_close(bucket[0], exact[0], rtol=1e-5, atol=1e-5)
    for i in (1, 2):
        assert bucket[i].shape[0] == context and not bucket[i][start:].any()
        torch.testing.assert_close(bucket[i][:start], exact[i], rtol=1e-5, atol=1e-5)
    for mine, ref in zip(bucket[3], exact[3]):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start,n", [(0, 5), (16, 13), (33, 3), (48, 40)])
def test_a_unit_padded_to_its_bucket_of_rows_equals_the_exact_unit(llama_dir, start, n):
    """A sequence's last span padded with zero rows to `unit_rows` (what its graph computes, so the graph recurs
    across sequence lengths) adds nothing: the real rows' input gradient, the past keys' and values' and the LoRA
    weights' gradients equal the exact unit's, with the padding past the end of the rotary table."""
    model, cache, adapter, params, inputs = layer_unit(llama_dir, start, n)
    rows, context = unit_rows(n), context_bucket(start)
    assert rows > n
    model.cos_sin = model.cos_sin[:start + n]      # the padding's positions lie past the table

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(rows - n, *t.shape[1:])])
    exact = layer_grads(model, 1, cache, adapter, inputs, params)
    pad = LayerInputs(padded(inputs.x), inputs.block_table, padded(inputs.grad_out), padded(inputs.dk),
                      padded(inputs.dv), torch.tensor(start))
    ours = layer_grads(model, 1, cache, adapter, pad, params, context=context)
    torch.testing.assert_close(ours[0][:n], exact[0], rtol=1e-5, atol=1e-5)
    for i in (1, 2):
        torch.testing.assert_close(ours[i][:start], exact[i], rtol=1e-5, atol=1e-5)
    for mine, ref in zip(ours[3], exact[3]):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_unit_rows_recur_across_lengths():
    """Powers of two up to TOKEN_STEP, then its multiples: never fewer rows than the span, at most TOKEN_STEP - 1
    more, and few shapes over every remainder a long sequence can end in."""
    assert [unit_rows(n) for n in (1, 3, 16, 17, 256, 257, 700, 1024)] == [1, 4, 16, 32, 256, 512, 768, 1024]
    shapes = {unit_rows(n) for n in range(1, 2049)}
    assert len(shapes) == 9 + 2048 // TOKEN_STEP - 1
    assert all(0 <= unit_rows(n) - n < TOKEN_STEP for n in range(1, 4097))
