"""Iteration time against work, learned per kind of work. Each piece of an iteration (the forward, each backward
unit, the optimizer step) is timed on the device by its own CUDA events, read once they have completed (no sync),
so each kind is learned from its own measurements: the forward as a line in tokens and attention pairs, a backward
unit per shape (a job's unit shapes recur, so the last few timings of the same shape price it best), the step by its
recent median. A start-up profile is the prior. A margin from whole measured iterations against their predictions
covers what no piece shows (host gaps between pieces), so the planner fills each iteration up to the latency target
but not past it."""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from coserve.engine.engine import LLMEngine

WINDOW = 256            # measurements each fit looks back on
REFIT_EVERY = 16        # measurements between refits
PRIOR_WEIGHT = 0.01     # the prior's pull, against one measurement's squared relative error
MAX_MARGIN = 2.0        # past this the fit is not the problem (a noisy host): plan on the fit, do not starve
START_MARGIN = 1.25     # a learning model's margin until it has measured iterations of its own to set it
SHAPE_SAMPLES = 8       # recent timings kept per unit shape (and of the optimizer step)

HEAD, GRAPH, EAGER = "head", "graph", "eager"   # a loss-head unit; a layer unit replayed from its graph; launched


def context(start: int, length: int) -> int:
    """Attention pairs of `length` queries after `start` earlier positions (what a chunk or unit adds)."""
    return length * (start + length)


@dataclass(frozen=True)
class Unit:
    """One backward unit as the cost model prices it: its kind, its tokens and the past keys it attends to (for a
    graphed unit, its bucket of them: what its graph computes)."""

    kind: str
    tokens: int
    past: int = 0

    @property
    def key(self) -> tuple[str, int, int]:
        return self.kind, self.tokens, self.past


@dataclass(frozen=True)
class Forward:
    """One iteration's forward: its tokens, their attention pairs, whether it replayed a CUDA graph, and whether
    any row has an adapter (a finetuning chunk always does): the LoRA kernels of every projection then run."""

    tokens: int
    pairs: int = 0
    graphed: bool = False
    lora: bool = False

    def features(self) -> list[float]:
        return [float(not self.graphed), float(self.graphed), float(self.tokens), float(self.pairs), float(self.lora)]


STEP = "step"
Piece = Union[Forward, Unit, str]


@dataclass(frozen=True)
class Work:
    """What one iteration ran: the pieces the cost model prices."""

    forward: Forward | None = None
    units: tuple[Unit, ...] = ()
    optimizer_steps: int = 0
    saved: bool = False          # a checkpoint was written or a CUDA graph captured (host time, not learned)
    finetune: bool = False       # it carried finetuning work (forward chunks or units)
    inference: bool = False      # it carried inference: the planner sized its finetuning to the latency target


@dataclass
class CostModel:
    """The prior's coefficients (a start-up profile, or given), and what measurements taught since (`learn`)."""

    fwd_fixed_s: float                   # an eagerly launched forward
    fwd_per_token_s: float
    unit_fixed_s: float                  # a backward unit replayed from its CUDA graph (or any unit, on a CPU)
    unit_per_token_s: float
    step_s: float = 0.0                  # an optimizer step
    graph_fwd_fixed_s: float | None = None  # a forward replayed from a CUDA graph; None: as an eager one
    eager_unit_s: float = 0.0            # what an eagerly launched unit costs beyond a replayed one
    fwd_per_pair_s: float = 0.0          # per attention pair of a forward (all layers)
    fwd_lora_s: float = 0.0              # what a forward with adapter rows costs beyond one without
    unit_per_pair_s: float = 0.0         # per attention pair of a unit (one layer, recomputed and backward)
    margin: float | None = None          # predictions are multiplied by this (>= 1) when planning; None: 1.0
                                         # for a given model, START_MARGIN for a learning one
    learn: bool = False                  # refine from measurements (the profiled model does; a given one is fixed)
    error: float | None = None           # median relative error of iteration predictions over the window
    _forwards: deque = field(default_factory=lambda: deque(maxlen=WINDOW), repr=False)
    _forward_prior: np.ndarray | None = field(default=None, repr=False)
    _units: dict = field(default_factory=dict, repr=False)          # Unit.key -> recent seconds
    _kind_scale: dict = field(default_factory=dict, repr=False)     # kind -> measured over prior, across its shapes
    _steps: deque = field(default_factory=lambda: deque(maxlen=SHAPE_SAMPLES), repr=False)
    _iterations: deque = field(default_factory=lambda: deque(maxlen=WINDOW), repr=False)   # (measured, predicted)
    _since_forward_fit: int = field(default=0, repr=False)
    _since_margin: int = field(default=0, repr=False)
    _since_scale: int = field(default=0, repr=False)
    pad: Callable[[int], int] | None = field(default=None, repr=False)   # rows a graphed forward of n tokens computes

    def __post_init__(self) -> None:
        if self.margin is None:
            self.margin = START_MARGIN if self.learn else 1.0
        if self.graph_fwd_fixed_s is None:
            self.graph_fwd_fixed_s = self.fwd_fixed_s
        self._forward_prior = self._forward_theta()

    # ---- prices (with the margin), for planning --------------------------------------------------------
    def forward_s(self, tokens: int, graphed: bool = False, pairs: int = 0, lora: bool = False) -> float:
        """A forward of `tokens` tokens whose attention covers `pairs` (query, key) pairs."""
        return self._forward(Forward(tokens, pairs, graphed, lora)) * self.margin

    def unit_s(self, unit: Unit) -> float:
        return self._unit(unit) * self.margin

    def optimizer_step_s(self) -> float:
        return self._step() * self.margin

    def forward_tokens_within(self, seconds: float, fixed_paid: bool, graphed: bool = False, tokens: int = 0,
                              pairs: int = 0, start: int = 0, most: int = 1 << 30, lora: bool = False) -> int:
        """How many more tokens, up to `most`, of a chunk after `start` positions fit in a forward that already holds
        `tokens` tokens and `pairs` attention pairs, within `seconds` (its fixed cost included unless paid; `lora`:
        the forward runs the LoRA kernels). A graphed forward is priced at the rows its graph computes (`pad`), so
        a chunk fills its token bucket."""
        fixed = 0.0 if fixed_paid else ((self.graph_fwd_fixed_s if graphed else self.fwd_fixed_s)
                                         + (self.fwd_lora_s if lora else 0.0))
        spare = seconds / self.margin - fixed - self.fwd_per_pair_s * pairs
        pad = self.pad if graphed and self.pad is not None else (lambda n: n)
        lo, hi = 0, max(0, min(most, int(spare / max(self.fwd_per_token_s, 1e-12)) - tokens))
        while lo < hi:   # the pairs grow with the chunk: the largest n that still fits
            mid = (lo + hi + 1) // 2
            if self.fwd_per_token_s * pad(tokens + mid) + self.fwd_per_pair_s * context(start, mid) <= spare:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def predict(self, work: Work) -> float:
        """Seconds of an iteration, without the margin."""
        return ((self._forward(work.forward) if work.forward is not None else 0.0)
                + sum(self._unit(u) for u in work.units) + work.optimizer_steps * self._step())

    # ---- the model without the margin ---------------------------------------------------------------
    def _forward_theta(self) -> np.ndarray:
        return np.array([self.fwd_fixed_s, self.graph_fwd_fixed_s, self.fwd_per_token_s, self.fwd_per_pair_s,
                         self.fwd_lora_s])

    def _forward(self, f: Forward) -> float:
        return float(np.dot(f.features(), self._forward_theta()))

    def _unit_prior(self, unit: Unit) -> float:
        extra = self.eager_unit_s if unit.kind != GRAPH else 0.0
        return (self.unit_fixed_s + extra + self.unit_per_token_s * unit.tokens
                + self.unit_per_pair_s * context(unit.past, unit.tokens))

    def _unit(self, unit: Unit) -> float:
        seen = self._units.get(unit.key)
        if seen:
            return statistics.median(seen)
        return self._unit_prior(unit) * self._kind_scale.get(unit.kind, 1.0)

    def _step(self) -> float:
        return statistics.median(self._steps) if self._steps else self.step_s

    # ---- learning ------------------------------------------------------------------------------------
    def observe_piece(self, piece: Piece, seconds: float) -> None:
        """One piece's measured device time."""
        if not self.learn or seconds <= 0:
            return
        if isinstance(piece, Forward):
            self._forwards.append((piece.features(), seconds))
            self._since_forward_fit += 1
            if self._since_forward_fit >= REFIT_EVERY:
                self._since_forward_fit = 0
                self._fit_forward()
        elif isinstance(piece, Unit):
            new_shape = piece.key not in self._units
            self._units.setdefault(piece.key, deque(maxlen=SHAPE_SAMPLES)).append(seconds)
            self._since_scale += 1
            if new_shape or self._since_scale >= REFIT_EVERY:   # not per unit: host time in every iteration
                self._since_scale = 0
                self._fit_kind_scales()
        elif piece == STEP:
            self._steps.append(seconds)

    def observe(self, work: Work, seconds: float) -> None:
        """One whole measured iteration that carried finetuning beside inference: against what its pieces predict,
        it sets the margin and the error. Only these did the planner size to the target: the tails of inference
        alone (a prefill beside a host pause) would only starve finetuning, and finetuning alone runs past the
        target on purpose (nobody waits), so its outliers would hold the margin high long after inference
        returns."""
        if not self.learn or work.saved or seconds <= 0 or not (work.finetune and work.inference):
            return
        self._iterations.append((seconds, max(self.predict(work), 1e-9)))   # as predicted then: no re-pricing
        self._since_margin += 1
        if self._since_margin >= REFIT_EVERY:
            self._since_margin = 0
            measured, predicted = np.array(self._iterations).T
            self.margin = float(min(MAX_MARGIN, max(1.0, np.quantile(measured / predicted, 0.99))))
            self.error = float(np.median(np.abs(predicted - measured) / measured))

    def _fit_kind_scales(self) -> None:
        """Shapes of a kind not measured yet are priced at the prior times what that kind measured against it."""
        ratios: dict[str, list[float]] = {}
        for key, seen in self._units.items():
            ratios.setdefault(key[0], []).append(statistics.median(seen) / max(self._unit_prior(Unit(*key)), 1e-12))
        self._kind_scale = {kind: statistics.median(r) for kind, r in ratios.items()}

    def _fit_forward(self) -> None:
        """Least squares of the relative error over the window, each coefficient pulled weakly toward the prior
        (which alone decides those the window never exercised, e.g. the eager fixed cost while every forward is
        graphed) and kept >= 0."""
        x = np.array([f for f, _ in self._forwards])
        y = np.array([t for _, t in self._forwards])
        prior = self._forward_prior
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
        (self.fwd_fixed_s, self.graph_fwd_fixed_s, self.fwd_per_token_s, self.fwd_per_pair_s,
         self.fwd_lora_s) = map(float, theta)

    def to_dict(self) -> dict:
        return {"fwd_fixed_s": self.fwd_fixed_s, "graph_fwd_fixed_s": self.graph_fwd_fixed_s,
                "fwd_per_token_s": self.fwd_per_token_s, "fwd_per_pair_s": self.fwd_per_pair_s,
                "fwd_lora_s": self.fwd_lora_s,
                "unit_prior": {"fixed_s": self.unit_fixed_s, "per_token_s": self.unit_per_token_s,
                               "eager_s": self.eager_unit_s, "per_pair_s": self.unit_per_pair_s},
                "unit_kind_scale": dict(self._kind_scale),
                "unit_shapes_s": {f"{k}/{n}/{p}": statistics.median(s) for (k, n, p), s in sorted(self._units.items())},
                "step_s": self._step(), "margin": self.margin, "error": self.error}


class DeviceClock:
    """Times iterations and their pieces without a host sync: on CUDA, events around each are read once they have
    completed (an iteration or two later); on the CPU the wall time is the device time."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self._pending: deque = deque()
        self._start: torch.cuda.Event | float | None = None

    def _mark(self) -> torch.cuda.Event | float:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _close(self, what: Work | Piece, start: torch.cuda.Event | float) -> None:
        end = self._mark()
        self._pending.append((what, start, end))

    @contextlib.contextmanager
    def timing(self, piece: Piece | None) -> Iterator[None]:
        """Time the device work queued inside the block as `piece` (None: do not time it)."""
        start = self._mark() if piece is not None else None
        yield
        if piece is not None:
            self._close(piece, start)

    def start(self) -> None:
        self._start = self._mark()

    def stop(self, work: Work) -> list[tuple[Work | Piece, float]]:
        """Close the iteration started last; returns every (iteration work or piece, seconds) now known."""
        self._close(work, self._start)
        done = []
        while self._pending and (not self.cuda or self._pending[0][2].query()):
            what, start, end = self._pending.popleft()
            done.append((what, end - start if not self.cuda else start.elapsed_time(end) / 1000))
        return done

    def discard(self) -> None:
        """Forget the pieces timed since the iteration started (it captured a graph: host time, not learned)."""
        while self._pending and not isinstance(self._pending[-1][0], Work):
            self._pending.pop()


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
    on a scratch sequence, and fit lines. Units are timed as CUDA graph replays where the engine has graphs (what
    a job's units run as, and what sizes their spans), and eagerly, whose extra launch time prices eager units."""
    from coserve.engine.finetune.adapter import TrainAdapter
    from coserve.engine.finetune.backward import SequenceBackward, Span, UnitGraphs, unit_rows
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
    graphs = UnitGraphs(set(), sizes[1]) if engine.runner.graphs is not None and engine.config.use_fast_path else None
    fwd, eager, graphed = [], [], []
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

            acts = forward()

            def unit_time(graph: UnitGraphs | None) -> float:
                """The top layer's unit alone, after the loss head's (a graph is captured by the untimed first)."""
                times = []
                for _ in range(4):
                    bwd = SequenceBackward(engine.model, adapter, acts, [Span(0, n)], [1] * n, table,
                                           engine.kv_caches, 1.0, graph)
                    bwd.run_unit()
                    times.append(_median_time(lambda: bwd.run_unit(capture=graph is not None), repeats=1))
                return statistics.median(times[1:])
            eager.append(unit_time(None))
            graphed.append(unit_time(graphs) if graphs is not None else eager[-1])
    finally:
        engine.blocks.release(seq.request_id)
    fwd_fixed, per_token = _line(sizes, tuple(fwd))
    replay = _graph_replay_s(engine)
    graph_fixed = max(0.0, replay[1] - per_token * replay[0]) if replay else None
    # attention pairs priced at the rate the forward's matmuls ran: 4 * q_size FLOPs a pair and layer (QK^T, PV);
    # a unit recomputes one layer and runs its backward, about three times that
    cfg = engine.model_config
    rate = 2 * sum(p.numel() for p in engine.model.parameters()) * sizes[1] / fwd[1]   # at most (host time in it)
    per_pair = 4 * cfg.num_heads * cfg.head_dim / rate
    rows = tuple(unit_rows(n) for n in sizes) if graphs is not None else sizes   # what a graph computes
    return CostModel(fwd_fixed, per_token, *_line(rows, tuple(graphed)), graph_fwd_fixed_s=graph_fixed,
                     eager_unit_s=max(0.0, eager[0] - graphed[0]), fwd_per_pair_s=per_pair * cfg.num_layers,
                     unit_per_pair_s=3 * per_pair, learn=True)
