"""Our decoder's logits equal transformers' on the same weights: prefill (whole and chunked) and decode."""
from __future__ import annotations

import pytest
import torch

from coserve_testlib import hf_model, make_engine, rel_err
from coserve.engine.runner import build_batch
from coserve.engine.sampling import SamplingParams
from coserve.engine.scheduler import Chunk
from coserve.engine.sequence import Sequence


def forward_chunk(engine, seq: Sequence, start: int, length: int) -> torch.Tensor:
    """Run tokens [start, start+length) of `seq` through our engine and return all their logits."""
    engine.blocks.allocate(seq.request_id, start + length)
    batch = build_batch([Chunk(seq, start, length)], engine.blocks, "cpu", all_logits=True)
    with torch.inference_mode():
        return engine.model(batch, engine.kv_caches)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("prefill_chunk", [None, 5])
def test_prefill_and_16_decode_steps_match_transformers(model_dirs, arch, prefill_chunk):
    engine = make_engine(model_dirs[arch])
    hf = hf_model(model_dirs[arch])
    prompt = engine.tokenizer("The quick brown fox jumps over the lazy dog. Pack my box").input_ids
    seq = Sequence("r", prompt, SamplingParams(temperature=0))
    step = prefill_chunk or len(prompt)
    ours = torch.cat([forward_chunk(engine, seq, s, min(step, len(prompt) - s)) for s in range(0, len(prompt), step)])
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert rel_err(ours, ref) <= 1e-4
    for _ in range(16):
        seq.output_ids.append(int(ours[-1].argmax()))
        ours = forward_chunk(engine, seq, seq.num_tokens - 1, 1)
        with torch.no_grad():
            ref = hf(torch.tensor([seq.token_ids])).logits[0, -1:]
        assert rel_err(ours, ref) <= 1e-4


def test_greedy_generation_matches_transformers_generate(llama_dir):
    engine = make_engine(llama_dir)
    hf = hf_model(llama_dir)
    prompts = [engine.tokenizer(t).input_ids for t in ["Hello, world!", "One, two, three, four", "def add(a, b):"]]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, seq in zip(prompts, seqs):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        assert seq.output_ids == out[0, len(prompt):].tolist()


def test_bf16_weights_load_and_run(llama_dir):
    engine = make_engine(llama_dir, dtype="bfloat16")
    assert engine.model.lm_head.weight.dtype == torch.bfloat16
    seq = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(seq.output_ids) == 4
