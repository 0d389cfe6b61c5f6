"""Per-request sampling: greedy, temperature, top-k, top-p, seeded generators, logprobs of chosen tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0                 # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask all but the top-k tokens and the smallest set whose probability reaches top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """One token per row. A row with a generator is reproducible whatever else is in the batch."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    tokens: list[int] = logits.argmax(dim=-1).tolist()   # one device sync for all greedy rows
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            filtered = filter_logits(logits[row].float() / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(filtered, dim=-1)
            tokens[row] = int(torch.multinomial(probs.cpu(), 1, generator=gen))
    chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens, device=logits.device)]
    return tokens, chosen.tolist()
