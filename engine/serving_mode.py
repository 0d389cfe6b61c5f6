"""How one engine shares its GPU between inference and finetuning (`coserve serve --mode`): the co-serving default
and the baselines it is measured against, run by the same code so that a comparison changes nothing else.
The engine asks the policy before each iteration which kinds of work it may hold, and reports what it did."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coserve.engine.finetune.manager import FinetuneManager


class ServingMode(str, enum.Enum):
    COSERVE = "coserve"                # inference and finetuning tokens in the same iterations
    TEMPORAL = "temporal"              # N inference iterations, then one whole optimizer step, and again
    INFERENCE_ONLY = "inference-only"  # finetuning jobs are refused
    FINETUNE_ONLY = "finetune-only"    # inference requests are refused


MODE_HELP = {
    ServingMode.COSERVE: "(default) token-level co-serving, finetuning fills what inference leaves of each "
                         "iteration",
    ServingMode.TEMPORAL: "after every --temporal-interval inference iterations one whole finetuning optimizer "
                          "step runs with no inference beside it (at once when no inference waits)",
    ServingMode.INFERENCE_ONLY: "finetuning jobs are refused with 503 and never trained",
    ServingMode.FINETUNE_ONLY: "inference requests are refused with 503",
}


@dataclass(frozen=True)
class Turn:
    """What one iteration may hold."""

    inference: bool
    finetune: bool


def optimizer_steps(finetune: "FinetuneManager") -> int:
    """All jobs' optimizer steps so far: it moves when any job finishes a step."""
    return sum(job.step for job in list(finetune.jobs.values()))


class ServingPolicy:
    """The mode's decision for each iteration. Temporal sharing keeps state: inference iterations since the last
    finetuning step, and whether a step is under way (then no inference runs until it ends)."""

    def __init__(self, mode: ServingMode | str = ServingMode.COSERVE, temporal_interval: int = 128):
        if temporal_interval < 1:
            raise ValueError(f"temporal_interval must be at least 1, got {temporal_interval}")
        self.mode = ServingMode(mode)
        self.interval = temporal_interval
        self.since_step = 0            # inference iterations since the last finetuning step (temporal)
        self.in_step = False           # a finetuning step is under way (temporal)
        self.steps_at_start = 0

    @property
    def serves_inference(self) -> bool:
        return self.mode is not ServingMode.FINETUNE_ONLY

    @property
    def trains(self) -> bool:
        return self.mode is not ServingMode.INFERENCE_ONLY

    def turn(self, inference_ready: bool, finetune: "FinetuneManager") -> Turn:
        """Decide the next iteration; `inference_ready` says whether requests are waiting or running."""
        if self.mode is ServingMode.COSERVE:
            return Turn(True, True)
        if self.mode is ServingMode.INFERENCE_ONLY:
            return Turn(True, False)
        if self.mode is ServingMode.FINETUNE_ONLY:
            return Turn(False, True)
        if not self.in_step and (self.since_step >= self.interval or not inference_ready) and finetune.has_work():
            self.in_step, self.steps_at_start = True, optimizer_steps(finetune)
        return Turn(False, True) if self.in_step else Turn(True, False)

    def done(self, turn: Turn, finetune: "FinetuneManager", finetune_worked: bool) -> None:
        """Account for the iteration just run. A temporal step ends when a job finished an optimizer step, or when
        an iteration of it could do no finetuning work (the job ended, or it waits for KV blocks that stalled
        inference holds), so inference never waits on a step that cannot move."""
        if self.mode is not ServingMode.TEMPORAL:
            return
        if turn.inference:
            self.since_step += 1
        elif self.in_step and (optimizer_steps(finetune) != self.steps_at_start or not finetune_worked):
            self.in_step, self.since_step = False, 0
