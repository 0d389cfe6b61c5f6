"""Sample one token for every row of a batch on the device, in one pass of batched tensor ops.

No per-row Python and no host synchronisation, so it can follow the forward directly (inside a CUDA graph when
the shapes are static). Each row's randomness is one uniform number hashed from its (seed, step), so a seeded
request draws the same tokens whatever else shares its batch. A row is drawn by inverse CDF, in vocab order, over
its temperature-scaled distribution; top-k/top-p masks come from one sort of the batch, done only if a row needs it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

GREEDY_BELOW = 1e-5     # temperatures under this (0, 1e-300, NaN) pick the argmax
MAX_TEMPERATURE = 1e5   # beyond this the distribution is uniform over the kept tokens to fp32 precision

_GOLDEN = -7046029254386353131     # 0x9E3779B97F4A7C15 as a signed int64
_MIX1 = -4658895280553007687       # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685       # 0x94D049BB133111EB


class Sampled(NamedTuple):
    tokens: torch.Tensor     # int64 [B]
    logprobs: torch.Tensor   # fp32 [B], of the chosen token under log_softmax of the unmodified logits
    bad: torch.Tensor        # bool [B], the row's logits held NaN or +inf, or nothing finite


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser: a bijection of 64-bit integers whose outputs look independent (int64 wraps)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform_from(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One uniform fp32 in [0, 1) per row, a pure function of (seed, step): counter-based, no generator state."""
    z = _mix64(_mix64(seeds.to(torch.int64) + _GOLDEN) + steps.to(torch.int64) * _GOLDEN)
    return _shr(z, 40).to(torch.float32) * 2.0 ** -24


def keep_mask(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, any_top_k: bool = True,
              any_top_p: bool = True) -> torch.Tensor:
    """Tokens each row may draw ([B, V] bool, vocab order) from its scaled logits: one sort for the batch.

    Top-k keeps every logit >= the k-th (ties kept); top-p then keeps the smallest prefix of the sorted
    distribution whose probability reaches p: exactly what the plain per-row filter keeps.
    """
    vocab = scaled.shape[-1]
    sorted_scaled, order = scaled.sort(dim=-1, descending=True, stable=True)
    if any_top_k:
        k_on = (top_k > 0) & (top_k < vocab)
        kth = sorted_scaled.gather(1, (top_k.clamp(1, vocab) - 1).to(torch.int64)[:, None])
        sorted_scaled = sorted_scaled.masked_fill(k_on[:, None] & (sorted_scaled < kth), float("-inf"))
    kept = sorted_scaled > float("-inf")
    if any_top_p:
        probs = torch.softmax(sorted_scaled, dim=-1)
        p = torch.where(top_p < 1.0, top_p, torch.full_like(top_p, float("inf")))
        kept &= (probs.cumsum(dim=-1) - probs) < p[:, None]
    return torch.empty_like(kept).scatter_(1, order, kept)


def scale(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """(logits - row max) / temperature, greedy rows divided by 1: the top logit is 0, so no temperature can
    overflow it into NaN."""
    t = torch.where(temperature >= GREEDY_BELOW, temperature.clamp(max=MAX_TEMPERATURE),
                    torch.ones_like(temperature))
    return (logits - logits.amax(-1, keepdim=True)) / t[:, None]


def sample_batch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 seeds: torch.Tensor, steps: torch.Tensor, *, any_random: bool = True, any_top_k: bool = True,
                 any_top_p: bool = True) -> Sampled:
    """One token per row of logits [B, V]. temperature fp32 [B] (< 1e-5: greedy), top_k int [B] (0: off),
    top_p fp32 [B] (1: off), seeds/steps int64 [B] (the row's random number is a hash of both).

    The host-side flags let the caller skip work no row needs (False is a promise: no row samples at random /
    uses top-k / uses top-p); without top-k and top-p nothing is sorted, and a row draws the same token either
    way (the draw runs in vocab order). A bad row (its logits hold NaN or +inf, or nothing finite) gets token 0
    and logprob NaN; rows never mix, so it cannot disturb the others.
    """
    logits = logits.float()
    bad = ~logits.amax(-1).isfinite()    # amax is NaN if any NaN, +inf if any +inf, -inf if nothing finite
    tokens = logits.argmax(dim=-1)
    if any_random:
        greedy = ~(temperature >= GREEDY_BELOW) | (top_k == 1)
        scaled = scale(logits, temperature)
        probs = torch.softmax(scaled, dim=-1)
        if any_top_k or any_top_p:
            probs = probs.masked_fill(~keep_mask(scaled, top_k, top_p, any_top_k, any_top_p), 0.0)
        cum = probs.cumsum(dim=-1)
        total = cum[:, -1:]
        below = total.nextafter(torch.zeros_like(total))   # the draw must land strictly inside the kept mass
        target = torch.minimum(uniform_from(seeds, steps)[:, None] * total, below)
        pick = torch.searchsorted(cum, target, right=True).clamp(max=logits.shape[-1] - 1)
        usable = probs.gather(1, pick)[:, 0] > 0   # guards against a scan rounding onto a zero-probability token
        tokens = torch.where(greedy | ~usable, tokens, pick[:, 0])
    tokens = torch.where(bad, torch.zeros_like(tokens), tokens)
    logprobs = logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return Sampled(tokens, torch.where(bad, torch.full_like(logprobs, float("nan")), logprobs), bad)
