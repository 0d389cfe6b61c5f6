"""Sampling: greedy, temperature, top-k, top-p, seeds, stop strings and ids, max_tokens, logprobs."""
from __future__ import annotations

import pytest
import torch

from coserve_testlib import make_engine
from coserve.engine.sampling import SamplingParams, filter_logits, sample


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    kept = filter_logits(logits, top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [[False, True, False, True]]
    probs = torch.softmax(logits, -1)[0]   # ~[0.03, 0.64, 0.09, 0.24]
    kept = filter_logits(logits, top_k=0, top_p=0.7).isfinite()[0]
    assert kept.tolist() == [False, True, False, True] and probs[1] < 0.7 <= probs[1] + probs[3]
    assert filter_logits(logits, 0, 0.01).isfinite().sum() == 1


def test_sample_is_reproducible_per_row_generator():
    logits = torch.randn(3, 50)
    p = [SamplingParams(temperature=1.0, seed=1)] * 3
    first = sample(logits, p, [torch.Generator().manual_seed(5) for _ in range(3)])[0]
    again = sample(logits, p, [torch.Generator().manual_seed(5) for _ in range(3)])[0]
    assert first == again
    greedy, lps = sample(logits, [SamplingParams(temperature=0)] * 3, [None] * 3)
    assert greedy == logits.argmax(-1).tolist()
    assert lps == pytest.approx(torch.log_softmax(logits, -1).max(-1).values.tolist(), abs=1e-6)


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)])
def test_invalid_sampling_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_same_seed_same_tokens_whatever_the_batch(llama_dir):
    engine = make_engine(llama_dir)
    prompt = engine.tokenizer("Hello, world!").input_ids
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    alone = engine.generate([prompt], seeded)[0].output_ids
    other = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    mixed = engine.generate([[7, 8, 9], prompt, [10, 11]], [other, seeded, other])[1].output_ids
    assert alone == mixed
    different = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=43,
                                                         ignore_eos=True))[0].output_ids
    assert different != alone


def test_top_k_one_equals_greedy(llama_dir):
    engine = make_engine(llama_dir)
    prompt = engine.tokenizer("One, two, three").input_ids
    greedy = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    topk = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=3,
                                                    ignore_eos=True))[0]
    assert greedy.output_ids == topk.output_ids


def test_stop_token_ids_max_tokens_and_logprobs(llama_dir):
    engine = make_engine(llama_dir)
    prompt = engine.tokenizer("One, two, three").input_ids
    free = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                    logprobs=True))[0]
    assert free.finish_reason == "length" and len(free.output_ids) == 8
    assert all(lp <= 0 for lp in free.output_logprobs)
    stop_id = free.output_ids[3]
    first = free.output_ids.index(stop_id)
    stopped = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                       stop_token_ids=[stop_id]))[0]
    assert stopped.finish_reason == "stop" and stopped.output_ids == free.output_ids[:first + 1]


def test_stop_strings_cut_the_text(llama_dir):
    engine = make_engine(llama_dir)
    prompt = engine.tokenizer("The quick brown").input_ids
    free = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    text = free.text
    stop = text[5:8]
    assert len(stop) == 3
    stopped = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                       stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[:text.find(stop)]
