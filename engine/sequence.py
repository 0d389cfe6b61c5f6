"""A request's life in the engine: its tokens, how many are cached, its adapter, and its output text."""
from __future__ import annotations

import enum
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

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
    error: str | None = None         # why the request failed (finish_reason "error"); the batch went on

    @staticmethod
    def join(outs: list[RequestOutput]) -> RequestOutput:
        """Consecutive deltas of one request as one: texts, tokens and logprobs in order, the rest from the last."""
        if len(outs) == 1:
            return outs[0]
        last = outs[-1]
        return RequestOutput(last.request_id, "".join(o.text for o in outs), [t for o in outs for t in o.token_ids],
                             [lp for o in outs for lp in o.logprobs], last.finished, last.finish_reason,
                             last.prompt_tokens, last.completion_tokens, last.error)


@dataclass(eq=False)      # a request is itself: compared by identity, cheap in `running` and `waiting`
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
    sample_seed: int = 0             # the request's seed, or one drawn for it: its random stream is its own
    text: str = ""                   # decoded output, stop strings cut off
    emitted_chars: int = 0
    emitted_tokens: int = 0
    num_preemptions: int = 0
    detokenizer: Any = None          # the engine's incremental detokenizer for this output
    cache_salt: str | None = None    # names the adapter version in prefix-cache hashes (None: base model)

    def __post_init__(self) -> None:
        self.sample_seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)

    def token(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed
