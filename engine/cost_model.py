"""Iteration time against work: a start-up profile gives the prior, then every measured iteration refines it
(online least squares over a window, pulled toward the prior), with a margin from the recent under-predictions,
so the planner fills each iteration up to the latency target but not past it."""
from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from coserve.engine.engine import LLMEngine

WINDOW = 256            # iterations the fit looks back on
REFIT_EVERY = 16        # observations between refits
PRIOR_WEIGHT = 0.01     # the prior's pull, against one iteration's squared relative error
MAX_MARGIN = 2.0        # past this the fit is not the problem (a noisy host): plan on the fit, do not starve


@dataclass(frozen=True)
class Work:
    """What one iteration ran: the features the cost model prices."""

    forward_tokens: int = 0      # prefill, finetuning-forward and decode tokens in the forward, if one ran
    units: int = 0               # backward units
    unit_tokens: int = 0         # their tokens
    optimizer_steps: int = 0
    saved: bool = False          # a checkpoint was written or a CUDA graph captured (host time, not learned)
    graphed_forward: bool = False  # the forward replayed a CUDA graph (no per-kernel launches)
    eager_units: int = 0         # units that ran eagerly, not as graph replays
    forward_context: int = 0     # attention pairs of the forward: sum over chunks of length * (start + length)
    unit_context: int = 0        # the same over the units (a unit late in a long sequence attends to all before it)

    def features(self) -> list[float]:
        forward = self.forward_tokens > 0
        return [float(forward and not self.graphed_forward), float(self.forward_tokens), float(self.units),
                float(self.unit_tokens), float(self.optimizer_steps), float(forward and self.graphed_forward),
                float(self.eager_units), float(self.forward_context), float(self.unit_context)]


def context(start: int, length: int) -> int:
    """Attention pairs of `length` queries after `start` earlier positions (what a chunk or unit adds)."""
    return length * (start + length)


@dataclass
class CostModel:
    fwd_fixed_s: float                   # an eagerly launched forward
    fwd_per_token_s: float
    unit_fixed_s: float                  # a backward unit replayed from its CUDA graph (or any unit, on a CPU)
    unit_per_token_s: float
    step_s: float = 0.0                  # an optimizer step (learned; the profile leaves it at 0)
    graph_fwd_fixed_s: float | None = None  # a forward replayed from a CUDA graph; None: as an eager one
    eager_unit_s: float = 0.0            # what an eagerly launched unit costs beyond a replayed one
    fwd_per_pair_s: float = 0.0          # per attention pair of a forward (all layers)
    unit_per_pair_s: float = 0.0         # per attention pair of a unit (one layer, recomputed and backward)
    margin: float = 1.0                  # predictions are multiplied by this (>= 1) when planning
    learn: bool = False                  # refine from measured iterations (the profiled model does; a given one is fixed)
    error: float | None = None           # median relative prediction error over the window, at the last refit
    prior: tuple[float, ...] | None = field(default=None, repr=False)
    _seen: deque = field(default_factory=lambda: deque(maxlen=WINDOW), repr=False)
    _since_fit: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.graph_fwd_fixed_s is None:
            self.graph_fwd_fixed_s = self.fwd_fixed_s
        if self.prior is None:
            self.prior = self.params()

    def params(self) -> tuple[float, ...]:
        """The coefficients, in the order of `Work.features` (and of the constructor)."""
        return (self.fwd_fixed_s, self.fwd_per_token_s, self.unit_fixed_s, self.unit_per_token_s, self.step_s,
                self.graph_fwd_fixed_s, self.eager_unit_s, self.fwd_per_pair_s, self.unit_per_pair_s)

    def predict(self, work: Work) -> float:
        return float(np.dot(work.features(), self.params()))

    def forward_s(self, tokens: int, graphed: bool = False, pairs: int = 0) -> float:
        """A forward of `tokens` tokens whose attention covers `pairs` (query, key) pairs."""
        fixed = self.graph_fwd_fixed_s if graphed else self.fwd_fixed_s
        return (fixed + self.fwd_per_token_s * tokens + self.fwd_per_pair_s * pairs) * self.margin

    def unit_s(self, tokens: int, eager: bool = False, start: int = 0) -> float:
        """A backward unit of `tokens` positions after `start` earlier ones."""
        extra = self.eager_unit_s if eager else 0.0
        return (self.unit_fixed_s + extra + self.unit_per_token_s * tokens
                + self.unit_per_pair_s * context(start, tokens)) * self.margin

    def forward_tokens_within(self, seconds: float, fixed_paid: bool, graphed: bool = False, tokens: int = 0,
                              pairs: int = 0, start: int = 0, most: int = 1 << 30) -> int:
        """How many more tokens, up to `most`, of a chunk after `start` positions fit in a forward that already holds
        `tokens` tokens and `pairs` attention pairs, within `seconds` (its fixed cost included unless paid)."""
        fixed = 0.0 if fixed_paid else (self.graph_fwd_fixed_s if graphed else self.fwd_fixed_s)
        spare = seconds / self.margin - fixed - self.fwd_per_token_s * tokens - self.fwd_per_pair_s * pairs
        lo, hi = 0, max(0, min(most, int(spare / max(self.fwd_per_token_s, 1e-12))))
        while lo < hi:   # the pairs grow with the chunk: the largest n that still fits
            mid = (lo + hi + 1) // 2
            if self.fwd_per_token_s * mid + self.fwd_per_pair_s * context(start, mid) <= spare:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def observe(self, work: Work, seconds: float) -> None:
        """Record one measured iteration (with what was predicted for it); every REFIT_EVERY of them the fit and
        the margin are updated."""
        if not self.learn or work.saved or seconds <= 0 or work.forward_tokens + work.units == 0:
            return
        self._seen.append((work.features(), seconds, self.predict(work)))
        self._since_fit += 1
        if self._since_fit >= REFIT_EVERY:
            self._since_fit = 0
            self.refit()

    def refit(self) -> None:
        """Least squares of the relative error over the window, each coefficient pulled weakly toward the prior
        (which alone decides those the window never exercised, e.g. unit costs while no job trains) and kept
        >= 0; the margin covers the 99th percentile of how much the refit model under-predicts the window."""
        x = np.array([f for f, _, _ in self._seen])
        y = np.array([t for _, t, _ in self._seen])
        prior = np.array(self.prior)
        rel = x / y[:, None]
        pull = np.sqrt(PRIOR_WEIGHT) * rel.mean(axis=0)
        theta = prior.copy()
        free = [j for j in range(len(prior)) if rel[:, j].any()]
        while free:
            rows = np.vstack([rel[:, free], np.diag(pull[free])])
            target = np.concatenate([np.ones(len(y)), pull[free] * prior[free]])
            sol = np.linalg.lstsq(rows, target, rcond=None)[0]
            if (sol >= 0).all():
                theta[free] = sol
                break
            for j, v in zip(free, sol):
                if v < 0:
                    theta[j] = 0.0
            free = [j for j, v in zip(free, sol) if v >= 0]
        (self.fwd_fixed_s, self.fwd_per_token_s, self.unit_fixed_s, self.unit_per_token_s, self.step_s,
         self.graph_fwd_fixed_s, self.eager_unit_s, self.fwd_per_pair_s, self.unit_per_pair_s) = map(float, theta)
        ratios = y / np.maximum(x @ theta, 1e-9)
        self.margin = float(min(MAX_MARGIN, max(1.0, np.quantile(ratios, 0.99))))
        predicted = np.array([p for _, _, p in self._seen])
        self.error = float(np.median(np.abs(predicted - y) / y))

    def to_dict(self) -> dict:
        return {"fwd_fixed_s": self.fwd_fixed_s, "graph_fwd_fixed_s": self.graph_fwd_fixed_s,
                "fwd_per_token_s": self.fwd_per_token_s, "unit_fixed_s": self.unit_fixed_s,
                "unit_per_token_s": self.unit_per_token_s, "step_s": self.step_s, "eager_unit_s": self.eager_unit_s,
                "fwd_per_pair_s": self.fwd_per_pair_s, "unit_per_pair_s": self.unit_per_pair_s,
                "margin": self.margin}


class IterationClock:
    """Times iterations without a host sync: on CUDA, events around each iteration are read once they have
    completed (an iteration or two later); on the CPU the wall time is the iteration time."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self._pending: deque = deque()
        self._start: torch.cuda.Event | float | None = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self, work: Work) -> list[tuple[Work, float]]:
        """Close the iteration started last; returns every (work, seconds) whose timing is now known."""
        if not self.cuda:
            return [(work, time.perf_counter() - self._start)]
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((self._start, end, work))
        done = []
        while self._pending and self._pending[0][1].query():
            start, end, w = self._pending.popleft()
            done.append((w, start.elapsed_time(end) / 1000))
        return done


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


def _graph_replay_s(engine: "LLMEngine") -> tuple[int, float] | None:
    """(batch, seconds) of the largest captured decode graph's replay (writing no KV), if the engine has one."""
    graphs = engine.runner.graphs
    if graphs is None or not graphs.graphs:
        return None
    bs = max(b for b, lora in graphs.graphs if not lora)
    graphs.inputs.slots.fill_(-1)
    graphs.inputs.seq_lens.zero_()
    return bs, _median_time(graphs.graphs[(bs, False)][0].replay)


def profile(engine: "LLMEngine") -> CostModel:
    """The prior: time real forwards, a decode graph's replay and layer backward units (LoRA on every projection)
    on a scratch sequence, and fit lines; units are timed eagerly (an upper bound for replayed ones)."""
    from coserve.engine.finetune.adapter import TrainAdapter
    from coserve.engine.finetune.backward import SequenceBackward, Span
    from coserve.engine.finetune.spec import LoRASpec
    from coserve.engine.model.llama import LORA_TARGETS
    from coserve.engine.runner import build_batch
    from coserve.engine.sampling import SamplingParams
    from coserve.engine.scheduler import Chunk
    from coserve.engine.sequence import Sequence

    sizes = (8, max(16, min(256, engine.config.max_batched_tokens, engine.blocks.num_free * engine.blocks.block_size
                              // 2)))   # the large size must leave launch-bound territory, or the slope reads flat
    seq = Sequence("profile", [1] * sizes[1], SamplingParams(max_tokens=1))
    engine.blocks.allocate(seq.request_id, sizes[1])
    adapter = TrainAdapter(engine.model, LoRASpec(r=16, target_modules=list(LORA_TARGETS)), seed=0)
    fwd, unit = [], []
    try:
        for n in sizes:
            chunk = Chunk(seq, 0, n, finetune=True)

            def forward() -> torch.Tensor:
                batch = build_batch([chunk], engine.blocks, engine.config.device)
                with torch.no_grad():
                    engine.model(batch, engine.kv_caches)
                return batch.captured

            forward()
            fwd.append(_median_time(forward))
            table = torch.tensor(engine.blocks.tables[seq.request_id], device=engine.config.device)

            def units(count: int) -> None:
                bwd = SequenceBackward(engine.model, adapter, forward(), [Span(0, n)], [1] * n, table,
                                       engine.kv_caches, 1.0)
                for _ in range(count):
                    bwd.run_unit()   # the loss head, then the top layer
            units(2)
            unit.append(max(1e-9, _median_time(lambda: units(2)) - _median_time(lambda: units(1))))
    finally:
        engine.blocks.release(seq.request_id)
    fwd_fixed, per_token = _line(sizes, tuple(fwd))
    replay = _graph_replay_s(engine)
    graph_fixed = max(0.0, replay[1] - per_token * replay[0]) if replay else None
    # attention pairs priced at the rate the forward's matmuls ran: 4 * q_size FLOPs a pair and layer (QK^T, PV);
    # a unit recomputes one layer and runs its backward, about three times that
    cfg = engine.model_config
    rate = 2 * sum(p.numel() for p in engine.model.parameters()) / max(per_token, 1e-12)
    per_pair = 4 * cfg.num_heads * cfg.head_dim / rate
    return CostModel(fwd_fixed, per_token, *_line(sizes, tuple(unit)), graph_fwd_fixed_s=graph_fixed,
                     fwd_per_pair_s=per_pair * cfg.num_layers, unit_per_pair_s=3 * per_pair, learn=True)
