"""Samples every row of an iteration in one batched pass on the device (`kernels.sampling`), with one copy of
the results to the host that the caller waits for only when it needs them; a row whose logits are unusable is
flagged so only its request fails."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from coserve.engine.sequence import Sequence
from coserve.kernels import fused_ops
from coserve.kernels.sampling import GREEDY_BELOW, sample_batch, sample_batch_fused


@dataclass
class SamplingInputs:
    """The rows' settings on the device, and the host flags that let the sampler skip work no row needs."""

    f32: torch.Tensor     # [2, B]: temperature, top_p
    i64: torch.Tensor     # [3, B]: top_k, seed, step (tokens generated so far)
    any_random: bool
    any_top_k: bool
    any_top_p: bool


class SampledOnHost:
    """The sampled tokens on their way to the host: `wait()` blocks until the copy (queued after the iteration's
    work on the device) has landed."""

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None, tokens: torch.Tensor):
        self.host, self.event = host, event
        self.tokens = tokens      # int64 [B] on the device: what an iteration queued behind this one reads

    def wait(self) -> tuple[list[int], list[float], list[bool]]:
        if self.event is not None:
            self.event.synchronize()
        tokens, logprobs, bad = self.host.tolist()
        return list(map(int, tokens)), logprobs, list(map(bool, bad))


class Sampler:
    def __init__(self, device: str):
        self.device = device
        self.pin = device.startswith("cuda")

    def prepare(self, seqs: list[Sequence], pending: int = 0) -> SamplingInputs:
        """The rows' settings, sent from pinned memory so that the host never waits for the device here. Each
        row's randomness comes from its request's seed and output position alone, so a seeded request draws the
        same whatever else is in the batch. `pending`: tokens each row has sampled that are not in its output
        yet (an iteration queued behind one still on the device)."""
        params = [s.params for s in seqs]
        temperature = [p.temperature for p in params]
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        random_rows = [t >= GREEDY_BELOW and k != 1 for t, k in zip(temperature, top_k)]
        f32 = self._send(np.array([temperature, top_p], dtype=np.float32))
        i64 = self._send(np.array([top_k, [s.sample_seed for s in seqs], [len(s.output_ids) + pending for s in seqs]],
                                  dtype=np.int64))
        return SamplingInputs(f32, i64,
                              any(random_rows), any(k > 1 for k, r in zip(top_k, random_rows) if r),
                              any(p < 1.0 for p, r in zip(top_p, random_rows) if r))

    def _send(self, values: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(values)
        return host.pin_memory().to(self.device, non_blocking=True) if self.pin else host

    def sample(self, logits: torch.Tensor, rows: SamplingInputs) -> SampledOnHost:
        """Token, logprob of the token, and `bad` for each row of `logits`, queued on the device."""
        fn = sample_batch_fused if logits.is_cuda and fused_ops.AVAILABLE else sample_batch
        f32, i64 = rows.f32, rows.i64
        out = fn(logits, f32[0], i64[0], f32[1], i64[1], i64[2], any_random=rows.any_random,
                 any_top_k=rows.any_top_k, any_top_p=rows.any_top_p)
        stacked = torch.stack([out.tokens.double(), out.logprobs.double(), out.bad.double()])
        if not stacked.is_cuda:
            return SampledOnHost(stacked, None, out.tokens)
        host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
        host.copy_(stacked, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return SampledOnHost(host, event, out.tokens)
