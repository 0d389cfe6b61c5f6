"""A request's life in the engine: its tokens, how many are cached, its adapter, and its output text."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from coserve.engine.sampling import SamplingParams

_arrivals = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one engine step produced for one request (a delta, for streaming)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter_slot: int | None = None
    adapter_name: str | None = None
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_computed: int = 0            # tokens whose keys/values are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    arrival: int = field(default_factory=lambda: next(_arrivals))
    generator: torch.Generator | None = None
    text: str = ""                   # decoded output, stop strings cut off
    emitted_chars: int = 0
    emitted_tokens: int = 0
    num_preemptions: int = 0
    cache_salt: str | None = None    # names the adapter version in prefix-cache hashes (None: base model)

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed
