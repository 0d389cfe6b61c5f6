"""The serving benchmark's generated workload: arrival processes with the rate and burstiness asked for, seeded
lengths in range, the same requests for every mode, and a finetuning dataset whose rows tokenize to the drawn
lengths."""
from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from serving_workload import SMOKE, LogNormal, Workload, arrival_times, requests, write_finetune_dataset  # noqa: E402


@pytest.mark.parametrize("trace, cv", [("poisson", 1.0), ("gamma", 3.0)])
def test_arrivals_have_the_rate_and_burstiness_asked_for(trace, cv):
    times = arrival_times(trace, 50.0, 400.0, cv, random.Random(1))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) / 400.0 == pytest.approx(50.0, rel=0.08)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.15)
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 400.0


def test_requests_are_seeded_and_lengths_in_range():
    w = Workload()
    a = requests(w, "poisson", 4.0, 30.0, 1000, 8192)
    assert a == requests(w, "poisson", 4.0, 30.0, 1000, 8192) != requests(w, "gamma", 4.0, 30.0, 1000, 8192)
    assert all(w.prompt.low <= len(r.prompt_ids) <= w.prompt.high and w.output.low <= r.max_tokens <= w.output.high
               and all(10 <= t < 1000 for t in r.prompt_ids) for r in a)
    draws = [LogNormal(128, 1.0, 4, 2048).draw(random.Random(i)) for i in range(3000)]
    assert statistics.median(draws) == pytest.approx(128, rel=0.1)


def test_finetune_rows_tokenize_to_the_drawn_lengths(llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    lengths = write_finetune_dataset(tmp_path / "ft.jsonl", tokenizer, SMOKE)
    rows = [json.loads(line)["text"] for line in (tmp_path / "ft.jsonl").read_text().splitlines()]
    assert len(rows) == len(lengths) == SMOKE.finetune_sequences
    for text, n in zip(rows, lengths):
        assert SMOKE.finetune.low <= n <= SMOKE.finetune.high
        assert abs(len(tokenizer(text, add_special_tokens=False).input_ids) - n) <= 2
