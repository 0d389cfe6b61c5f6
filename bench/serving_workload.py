"""The serving benchmark's workload, generated with fixed seeds (these machines reach no dataset hub): open-loop
arrival times (Poisson, or a bursty Gamma process), ShareGPT-like prompt and output lengths, and a finetuning
dataset of long sequences like Sky-T1's reasoning traces."""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class LogNormal:
    """Token counts drawn as round(exp(N(log(median), sigma))), clipped to [low, high]."""

    median: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return int(min(self.high, max(self.low, round(rng.lognormvariate(math.log(self.median), self.sigma)))))


@dataclass(frozen=True)
class Workload:
    """Every parameter of the generated workload; the JSON result records it.

    Defaults (the 8B run): prompts of median 128 tokens (sigma 1.0, so a mean near 210, in [4, 2048]) and outputs
    of median 128 (sigma 0.8, mean near 167, in [4, 512]) approximate the long-tailed ShareGPT conversations
    that serving papers replay (means of roughly 200 prompt and 200 output tokens); finetuning sequences of
    median 3000 tokens (sigma 0.6, in [512, 8192]) stand in for Sky-T1's long reasoning traces."""

    prompt: LogNormal = LogNormal(128, 1.0, 4, 2048)
    output: LogNormal = LogNormal(128, 0.8, 4, 512)
    finetune: LogNormal = LogNormal(3000, 0.6, 512, 8192)
    finetune_sequences: int = 48
    gamma_cv: float = 3.0          # coefficient of variation of bursty inter-arrival gaps (Poisson's is 1)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


SMOKE = Workload(prompt=LogNormal(16, 0.6, 4, 64), output=LogNormal(6, 0.5, 2, 12),
                 finetune=LogNormal(96, 0.5, 32, 256), finetune_sequences=8)


@dataclass(frozen=True)
class Request:
    arrival_s: float      # offset from the start of the window
    prompt_ids: list[int]
    max_tokens: int


def arrival_times(trace: str, rate: float, duration_s: float, cv: float, rng: random.Random) -> list[float]:
    """Open-loop arrival offsets in [0, duration_s): exponential gaps (Poisson) or Gamma gaps of mean 1/rate and
    coefficient of variation `cv` (shape 1/cv^2: bursts of close arrivals between long quiet gaps)."""
    if rate <= 0:
        return []
    shape = 1.0 if trace == "poisson" else 1.0 / cv ** 2
    if trace not in ("poisson", "gamma"):
        raise ValueError(f"unknown trace {trace!r}: poisson or gamma")
    times, t = [], rng.gammavariate(shape, 1.0 / (rate * shape))
    while t < duration_s:
        times.append(t)
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
    return times


def requests(workload: Workload, trace: str, rate: float, duration_s: float, vocab_size: int,
             max_context: int) -> list[Request]:
    """The window's requests: arrival, random prompt token ids (the weights are random, so only lengths matter)
    and an output length served in full (`ignore_eos`). Seeded by (seed, trace, rate): every mode sees the same."""
    rng = random.Random(f"{workload.seed}:{trace}:{rate}")
    out = []
    for t in arrival_times(trace, rate, duration_s, workload.gamma_cv, rng):
        n_prompt = min(workload.prompt.draw(rng), max_context // 2)
        n_out = min(workload.output.draw(rng), max_context - n_prompt - 1)
        out.append(Request(t, [rng.randrange(10, vocab_size) for _ in range(n_prompt)], n_out))
    return out


def write_finetune_dataset(path: Path, tokenizer, workload: Workload) -> list[int]:
    """A `{"text": ...}` JSONL file whose rows tokenize to the drawn lengths (within a few tokens); the text is
    words of the project's corpus in a seeded random order. Returns the drawn lengths."""
    rng = random.Random(f"{workload.seed}:finetune")
    lengths = [workload.finetune.draw(rng) for _ in range(workload.finetune_sequences)]
    corpus = (Path(__file__).resolve().parents[1] / "engine" / "data" / "corpus.txt").read_text().split()
    words = [rng.choice(corpus) for _ in range(int(sum(lengths) * 1.2) + 100)]
    text = " ".join(words)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    rows, start = [], 0
    for n in lengths:
        if start + n > len(offsets):
            start = 0
        rows.append(json.dumps({"text": text[offsets[start][0]:offsets[start + n - 1][1]].strip()}))
        start += n
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return lengths
