"""LoRA dropout that a chunk's forward (in a serving batch) and its backward recompute draw identically: the
mask is a pure function of (job, step, sequence, module, chunk start)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkDropout:
    p: float
    key: str        # job seed, step and sequence within the step
    start: int      # the chunk's first position

    def __call__(self, module: str, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device=x.device).manual_seed(zlib.crc32(f"{self.key}|{module}|{self.start}".encode()))
        keep = torch.rand(x.shape, generator=g, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)
