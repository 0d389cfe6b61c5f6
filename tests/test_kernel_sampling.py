"""The batched sampler against the plain per-row way: greedy is argmax, filters mask what a per-row top-k/top-p
masks, draws follow softmax of the filtered logits, a (seed, step) draws the same token in any batch, and a bad
row is flagged without disturbing the others."""
from __future__ import annotations

import math

import pytest
import torch

from coserve.kernels.sampling import keep_mask, sample_batch, scale, uniform_from

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def plain_filter(row: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """One row, the obvious way: mask below the k-th largest, then beyond the smallest prefix reaching p."""
    if 0 < top_k < row.shape[-1]:
        row = row.masked_fill(row < torch.topk(row, top_k).values[-1], float("-inf"))
    if top_p < 1.0:
        values, order = torch.sort(row, descending=True)
        probs = torch.softmax(values, -1)
        values = values.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
        row = torch.full_like(row, float("-inf")).scatter(-1, order, values)
    return row


def params(rows: list[tuple[float, int, float]], repeat: int = 1):
    temperature = torch.tensor([r[0] for r in rows] * repeat, dtype=torch.float32, device=DEVICE)
    top_k = torch.tensor([r[1] for r in rows] * repeat, dtype=torch.int32, device=DEVICE)
    top_p = torch.tensor([r[2] for r in rows] * repeat, dtype=torch.float32, device=DEVICE)
    return temperature, top_k, top_p


def splitmix_uniform(seed: int, step: int) -> float:
    mask, golden = 2 ** 64 - 1, 0x9E3779B97F4A7C15

    def mix(x: int) -> int:
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & mask
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & mask
        return x ^ (x >> 31)
    return (mix((mix((seed + golden) & mask) + step * golden) & mask) >> 40) / 2 ** 24


def test_row_uniform_is_splitmix64_of_seed_and_step():
    seeds = [0, 1, 42, -1, 2 ** 62 + 12345, -(2 ** 63)]
    steps = [0, 1, 7, 1000, 2 ** 40, 3]
    got = uniform_from(torch.tensor(seeds, device=DEVICE), torch.tensor(steps, device=DEVICE)).tolist()
    assert got == [splitmix_uniform(s, t) for s, t in zip(seeds, steps)]


def test_greedy_rows_are_argmax_with_its_logprob():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 300, generator=g)).to(DEVICE)
    temperature, top_k, top_p = params([(0.0, 0, 1.0), (1e-300, 0, 1.0), (1e-7, 0, 0.5), (float("nan"), 0, 1.0),
                                        (1.5, 1, 1.0), (0.0, 50, 0.9)])
    out = sample_batch(logits, temperature, top_k, top_p, torch.arange(6, device=DEVICE),
                       torch.zeros(6, dtype=torch.int64, device=DEVICE))
    assert out.tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1).amax(-1))
    assert not out.bad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tiny_and_huge_temperatures_stay_finite(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(8, 1000, generator=g)).to(DEVICE, dtype)
    rows = [(1e-5, 0, 1.0), (2e-5, 0, 0.9), (1e-4, 20, 1.0), (1e-3, 0, 1.0),
            (1e30, 0, 1.0), (float("inf"), 0, 0.5), (3.4e38, 7, 1.0), (1e-5, 3, 0.2)]
    logits[4:7, :10] = float("-inf")          # masked tokens under a huge temperature stay masked
    hot = []
    for step in range(5):
        out = sample_batch(logits, *params(rows), torch.arange(8, device=DEVICE),
                           torch.full((8,), step, device=DEVICE))
        assert out.logprobs.isfinite().all() and not out.bad.any()
        chosen = logits.float().gather(1, out.tokens[:, None])[:, 0]
        assert (chosen[[0, 1, 2, 3, 7]] >= logits.float().amax(-1)[[0, 1, 2, 3, 7]] - 0.05).all()
        torch.testing.assert_close(out.logprobs, torch.log_softmax(logits.float(), -1).gather(
            1, out.tokens[:, None])[:, 0])
        hot.append(out.tokens[4:7].tolist())
    for row in zip(*hot):      # a huge temperature draws near uniformly, it does not fall back to argmax
        assert len(set(row)) > 2


def test_keep_mask_equals_the_plain_per_row_filter():
    g = torch.Generator().manual_seed(2)
    rows = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.5), (1.0, 40, 0.9), (2.0, 1, 0.3), (0.5, 0, 0.05),
            (1.0, 200, 1.0), (1.0, 1000, 0.999), (0.9, 3, 0.0001)]
    logits = (2 * torch.randn(len(rows), 200, generator=g)).to(DEVICE)
    logits[1, 10:20] = float("-inf")                   # masked tokens stay masked
    logits[3, :5] = logits[3, 5]                        # ties at the k-th logit are kept, as topk keeps them
    temperature, top_k, top_p = params(rows)
    mask = keep_mask(scale(logits, temperature), top_k, top_p)
    for i, (t, k, p) in enumerate(rows):
        assert mask[i].tolist() == plain_filter(logits[i] / t, k, p).isfinite().tolist(), rows[i]


def test_draws_follow_softmax_of_the_filtered_logits():
    """Chi-square of 6000 seeded draws per row against softmax(plain_filter(logits / T)); rows never leave
    their mask. Seeds are fixed, so the test is deterministic; the bound is the 99.9% quantile."""
    g = torch.Generator().manual_seed(3)
    vocab, draws = 12, 6000
    rows = [(0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.8), (1.0, 6, 0.7), (5.0, 0, 1.0)]
    logits = torch.randn(len(rows), vocab, generator=g).to(DEVICE)
    seeds = torch.arange(draws * len(rows), device=DEVICE) * 7919 + 11
    out = sample_batch(logits.repeat(draws, 1), *params(rows, draws), seeds,
                       torch.full_like(seeds, 3))
    counts = torch.zeros(len(rows), vocab).index_put_(
        (torch.arange(len(rows)).repeat(draws), out.tokens.cpu()), torch.ones(len(seeds)), accumulate=True)
    for i, (t, k, p) in enumerate(rows):
        probs = torch.softmax(plain_filter(logits[i].cpu() / t, k, p), -1)
        assert counts[i][probs == 0].sum() == 0
        expected = draws * probs[probs > 0]
        chi2 = ((counts[i][probs > 0] - expected) ** 2 / expected).sum().item()
        dof = int((probs > 0).sum()) - 1
        bound = dof + 3.1 * math.sqrt(2 * dof) + 6   # ~ 99.9% quantile for these degrees of freedom
        assert chi2 < bound, (rows[i], chi2, bound)


def test_same_seed_and_step_draw_the_same_token_in_any_batch():
    g = torch.Generator().manual_seed(4)
    vocab = 500
    mine = torch.randn(1, vocab, generator=g).to(DEVICE)
    others = torch.randn(6, vocab, generator=g).to(DEVICE)
    others[2] = float("nan")
    other_rows = [(1.0, 10, 1.0), (0.0, 0, 1.0), (1.0, 0, 0.5), (0.8, 0, 1.0), (1.2, 3, 0.9), (1.0, 0, 1.0)]
    alone, together = [], []
    for step in range(40):
        seed = torch.tensor([1234], device=DEVICE)
        one = sample_batch(mine, *params([(0.9, 0, 1.0)]), seed, torch.tensor([step], device=DEVICE),
                           any_top_k=False, any_top_p=False)
        batch = torch.cat([others[:3], mine, others[3:]])
        rows = other_rows[:3] + [(0.9, 0, 1.0)] + other_rows[3:]
        seeds = torch.tensor([1, 2, 3, 1234, 5, 6, 7], device=DEVICE)
        many = sample_batch(batch, *params(rows), seeds, torch.tensor([step] * 3 + [step] + [9] * 3, device=DEVICE))
        alone.append(one.tokens.item())
        together.append(many.tokens[3].item())
    assert alone == together
    assert len(set(alone)) > 10   # the step moves the draw


def test_bad_rows_are_flagged_alone():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 64, generator=g).to(DEVICE)
    rows = [(1.0, 0, 1.0), (1.0, 5, 0.9), (0.0, 0, 1.0), (1.0, 0, 0.7), (0.8, 0, 1.0), (1.0, 0, 1.0)]
    seeds, steps = torch.arange(6, device=DEVICE), torch.full((6,), 2, device=DEVICE)
    clean = sample_batch(logits, *params(rows), seeds, steps)
    broken = logits.clone()
    broken[1, 7] = float("nan")
    broken[2, 3] = float("inf")
    broken[4] = float("-inf")
    broken[5, 1:] = float("-inf")            # a single allowed token: legitimate, always drawn
    out = sample_batch(broken, *params(rows), seeds, steps)
    assert out.bad.tolist() == [False, True, True, False, True, False]
    assert out.tokens[[0, 3]].tolist() == clean.tokens[[0, 3]].tolist()
    torch.testing.assert_close(out.logprobs[[0, 3]], clean.logprobs[[0, 3]])
    assert out.tokens[5].item() == 0 and out.logprobs[5].item() == 0.0
    assert out.tokens[[1, 2, 4]].tolist() == [0, 0, 0] and out.logprobs[[1, 2, 4]].isnan().all()


def test_host_flags_skip_work_without_changing_tokens():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(16, 256, generator=g).to(DEVICE)
    temperature = torch.rand(16, generator=g).to(DEVICE) + 0.5
    off_k = torch.zeros(16, dtype=torch.int32, device=DEVICE)
    off_p = torch.ones(16, device=DEVICE)
    seeds, steps = torch.arange(16, device=DEVICE) + 100, torch.arange(16, device=DEVICE)
    full = sample_batch(logits, temperature, off_k, off_p, seeds, steps)
    lean = sample_batch(logits, temperature, off_k, off_p, seeds, steps, any_top_k=False, any_top_p=False)
    assert torch.equal(full.tokens, lean.tokens)
    greedy = sample_batch(logits, temperature, off_k, off_p, seeds, steps, any_random=False)
    assert torch.equal(greedy.tokens, logits.argmax(-1))
    assert not torch.equal(full.tokens, greedy.tokens)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs and host-sync detection need a GPU")
def test_full_vocab_batch_runs_without_host_sync_and_inside_a_cuda_graph():
    g = torch.Generator().manual_seed(7)
    batch, vocab = 64, 128256
    logits = (3 * torch.randn(batch, vocab, generator=g)).to(DEVICE, torch.bfloat16)
    rows = [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 50, 1.0), (0.7, 0, 0.9)] * (batch // 4)
    temperature, top_k, top_p = params(rows)
    seeds = torch.arange(batch, device=DEVICE) * 31
    steps = torch.full((batch,), 5, device=DEVICE)
    eager = sample_batch(logits, temperature, top_k, top_p, seeds, steps)   # warms up the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = sample_batch(logits, temperature, top_k, top_p, seeds, steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(eager.tokens, again.tokens)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sample_batch(logits, temperature, top_k, top_p, seeds, steps)
        with torch.cuda.graph(graph, stream=stream):
            captured = sample_batch(logits, temperature, top_k, top_p, seeds, steps)
    torch.cuda.current_stream().wait_stream(stream)
    steps.fill_(6)
    graph.replay()
    fresh = sample_batch(logits, temperature, top_k, top_p, seeds, steps)
    assert torch.equal(captured.tokens, fresh.tokens) and torch.equal(captured.logprobs, fresh.logprobs)
    assert torch.equal(fresh.tokens[0::4], logits.float().argmax(-1)[0::4])
    kept = keep_mask(scale(logits.float(), temperature), top_k, top_p)
    assert kept.gather(1, fresh.tokens[:, None]).all()
    assert not torch.equal(fresh.tokens, eager.tokens)   # the step moved the draws
