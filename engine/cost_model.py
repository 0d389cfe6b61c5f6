"""Iteration time against work, measured at start-up: forward time against tokens and backward-unit time
against the unit's tokens. The scheduler fills each iteration up to the latency target with it."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from coserve.engine.engine import LLMEngine


@dataclass
class CostModel:
    fwd_fixed_s: float
    fwd_per_token_s: float
    unit_fixed_s: float
    unit_per_token_s: float

    def forward_s(self, tokens: int) -> float:
        return self.fwd_fixed_s + self.fwd_per_token_s * tokens

    def unit_s(self, tokens: int) -> float:
        return self.unit_fixed_s + self.unit_per_token_s * tokens

    def unit_tokens_within(self, seconds: float, most: int) -> int:
        """The largest backward unit, up to `most` tokens, predicted to take at most `seconds`."""
        if self.unit_per_token_s <= 0:
            return most if seconds >= self.unit_fixed_s else 0
        return max(0, min(most, int((seconds - self.unit_fixed_s) / self.unit_per_token_s)))

    def to_dict(self) -> dict:
        return asdict(self)


def _line(x: tuple[int, int], y: tuple[float, float]) -> tuple[float, float]:
    slope = max(1e-9, (y[1] - y[0]) / (x[1] - x[0]))
    return max(0.0, y[0] - slope * x[0]), slope


def _median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(engine: "LLMEngine") -> CostModel:
    """Time real forwards and backward units on a scratch sequence, and fit two lines."""
    from coserve.engine.finetune.adapter import TrainAdapter
    from coserve.engine.finetune.backward import SavedChunk, SequenceBackward
    from coserve.engine.finetune.spec import LoRASpec
    from coserve.engine.runner import build_batch
    from coserve.engine.sampling import SamplingParams
    from coserve.engine.scheduler import Chunk
    from coserve.engine.sequence import Sequence

    sizes = (8, max(16, min(256, engine.config.max_batched_tokens, engine.blocks.num_free * engine.blocks.block_size
                              // 2)))   # the large size must leave launch-bound territory, or the slope reads flat
    seq = Sequence("profile", [1] * sizes[1], SamplingParams(max_tokens=1))
    engine.blocks.allocate(seq.request_id, sizes[1])
    adapter = TrainAdapter(engine.model, LoRASpec(r=8, target_modules=["q_proj", "v_proj"]), seed=0)
    fwd, unit = [], []
    try:
        for n in sizes:
            chunk = Chunk(seq, 0, n, finetune=True)

            def forward() -> list[torch.Tensor]:
                batch = build_batch([chunk], engine.blocks, engine.config.device)
                with torch.no_grad():
                    engine.model(batch, engine.kv_caches)
                return batch.captured

            forward()
            fwd.append(_median_time(forward))
            table = torch.tensor(engine.blocks.tables[seq.request_id], device=engine.config.device)

            def one_unit() -> None:
                saved = [SavedChunk(0, n, forward())]
                bwd = SequenceBackward(engine.model, adapter, saved, [1] * n, table, engine.kv_caches, 1.0)
                bwd.run_unit()   # the loss head
                bwd.run_unit()   # the top layer
            unit.append(max(1e-9, _median_time(one_unit) - fwd[-1]) / 2)
    finally:
        engine.blocks.release(seq.request_id)
    return CostModel(*_line(sizes, tuple(fwd)), *_line(sizes, tuple(unit)))
