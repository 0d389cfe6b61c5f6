"""Samples every row of an iteration in one batched pass on the device (`kernels.sampling`), with one copy of
the results to the host; a row whose logits are unusable is flagged so only its request fails."""
from __future__ import annotations

import torch

from coserve.engine.sequence import Sequence
from coserve.kernels.sampling import GREEDY_BELOW, sample_batch


class Sampler:
    def __init__(self, device: str):
        self.device = device

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float], list[bool]]:
        """Token, logprob of the token, and `bad` for each row. Each row's randomness comes from its request's
        seed and output position alone, so a seeded request draws the same whatever else is in the batch."""
        params = [s.params for s in seqs]
        temperature = [p.temperature for p in params]
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        random_rows = [t >= GREEDY_BELOW and k != 1 for t, k in zip(temperature, top_k)]
        dev = logits.device
        f32 = torch.tensor([temperature, top_p], dtype=torch.float32).to(dev, non_blocking=True)
        i64 = torch.tensor([top_k, [s.sample_seed for s in seqs], [len(s.output_ids) for s in seqs]],
                           dtype=torch.int64).to(dev, non_blocking=True)
        out = sample_batch(logits, f32[0], i64[0], f32[1], i64[1], i64[2], any_random=any(random_rows),
                           any_top_k=any(k > 1 for k, r in zip(top_k, random_rows) if r),
                           any_top_p=any(p < 1.0 for p, r in zip(top_p, random_rows) if r))
        host = torch.stack([out.tokens.double(), out.logprobs.double(), out.bad.double()]).cpu()
        tokens, logprobs, bad = host.tolist()
        return [int(t) for t in tokens], logprobs, [b != 0 for b in bad]
