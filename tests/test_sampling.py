"""Sampling: greedy, temperature, top-k, top-p, seeds, stop strings and ids, max_tokens, logprobs."""
from __future__ import annotations

import pytest
import torch

from coserve_testlib import make_engine
from coserve.engine.sampling import SamplingParams


def test_a_request_whose_logits_go_bad_fails_alone(llama_dir):
    """A poisoned adapter slot makes one request's logits NaN: it ends with an error, its batch-mates finish."""
    engine = make_engine(llama_dir)
    slot = engine.loras.reserve_training_slot()
    weights = {n: (torch.full((4, i), float("nan")), torch.ones(o, 4)) for n, (i, o) in
               engine.model.lora_targets().items() if n.endswith("q_proj")}
    engine.loras.write_slot(slot, weights, 1.0)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    engine.add_request("poisoned", [5, 6, 7], params)
    engine.requests["poisoned"].adapter_slot = slot
    engine.add_request("healthy", [5, 6, 7], params)
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    poisoned = [o for o in outputs if o.request_id == "poisoned"]
    healthy = [o for o in outputs if o.request_id == "healthy"]
    assert poisoned[-1].finish_reason == "error" and "non-finite" in poisoned[-1].error
    assert healthy[-1].finish_reason == "length" and sum(len(o.token_ids) for o in healthy) == 6


def test_tiny_temperatures_are_greedy(llama_dir):
    engine = make_engine(llama_dir)
    prompt = engine.tokenizer("Hello, world!").input_ids
    greedy = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    tiny = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=1e-300, ignore_eos=True))[0]
    assert tiny.output_ids == greedy.output_ids
    assert all(lp == lp for lp in tiny.output_logprobs)   # no NaN


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


def test_incremental_detokenizer_equals_a_full_decode(llama_dir):
    """Token by token (multi-byte characters split across tokens included) the text equals decoding it all."""
    from coserve.engine.detokenizer import IncrementalDetokenizer

    engine = make_engine(llama_dir)
    tok = engine.tokenizer
    ids = tok("Grüße, 東京! naïve café — ünïcödé 123 end", add_special_tokens=False).input_ids
    plain = type("Plain", (), {"decode": staticmethod(tok.decode), "clean_up_tokenization_spaces": False})()
    for detok in (IncrementalDetokenizer(tok), IncrementalDetokenizer(plain)):   # Rust backend, then HF decode
        text = "".join(detok.step(ids[:n], final=n == len(ids)) for n in range(1, len(ids) + 1))
        assert text == tok.decode(ids, skip_special_tokens=True)
    assert IncrementalDetokenizer(tok).backend is not None and IncrementalDetokenizer(plain).backend is None
