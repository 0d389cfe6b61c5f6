"""Adapters made with `peft` on the transformers model give the same logits and greedy tokens in our engine,
alone and when eight requests of four adapters and the base share one batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coserve_testlib import ADAPTERS, hf_model, make_engine, make_peft_adapter, rel_err
from coserve.engine.lora import AdapterError
from coserve.engine.runner import build_batch
from coserve.engine.sampling import SamplingParams
from coserve.engine.scheduler import Chunk
from coserve.engine.sequence import Sequence

@pytest.fixture(scope="module")
def peft_adapters(llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_peft_adapter(llama_dir, root / name, seed, **cfg)
            for seed, (name, cfg) in enumerate(ADAPTERS.items())}


def peft_model(model_dir: Path, adapter: Path | None):
    from peft import PeftModel

    base = hf_model(model_dir)
    return base if adapter is None else PeftModel.from_pretrained(base, str(adapter)).eval()


REQUESTS = [("qv-r4", "Hello, world! How"), ("attn-r8", "One, two, three"), ("all-r16-rslora", "The quick brown"),
            ("mlp-r128", "Question: what is"), (None, "Monday, Tuesday"), ("qv-r4", "Pack my box with"),
            (None, "def add(a, b):"), ("all-r16-rslora", "Sphinx of black")]


def test_mixed_batch_prefill_logits_match_peft(llama_dir, peft_adapters):
    engine = make_engine(llama_dir)
    for name, path in peft_adapters.items():
        engine.loras.load(name, path)
    chunks = []
    for i, (adapter, text) in enumerate(REQUESTS):
        seq = Sequence(f"r{i}", engine.tokenizer(text).input_ids, SamplingParams(temperature=0))
        seq.adapter_slot = engine.loras.adapters[adapter].slot if adapter else None
        engine.blocks.allocate(seq.request_id, len(seq.prompt_ids))
        chunks.append(Chunk(seq, 0, len(seq.prompt_ids)))
    with torch.inference_mode():
        logits = engine.model(build_batch(chunks, engine.blocks, "cpu", all_logits=True), engine.kv_caches)
    refs = {name: peft_model(llama_dir, peft_adapters.get(name)) for name in {a for a, _ in REQUESTS}}
    row = 0
    for (adapter, _), chunk in zip(REQUESTS, chunks):
        with torch.no_grad():
            ref = refs[adapter](torch.tensor([chunk.seq.prompt_ids])).logits[0]
        assert rel_err(logits[row:row + chunk.length], ref) <= 1e-4, adapter
        row += chunk.length
    base = refs[None](torch.tensor([chunks[0].seq.prompt_ids])).logits[0]
    assert rel_err(logits[:chunks[0].length], base) > 1e-2, "the adapter must change the output"


def test_mixed_batch_greedy_tokens_and_logprobs_match_peft(llama_dir, peft_adapters):
    engine = make_engine(llama_dir)
    for name, path in peft_adapters.items():
        engine.loras.load(name, path)
    prompts = [engine.tokenizer(text).input_ids for _, text in REQUESTS]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=True)
    seqs = engine.generate(prompts, params, [a for a, _ in REQUESTS])
    for (adapter, _), prompt, seq in zip(REQUESTS, prompts, seqs):
        ref = peft_model(llama_dir, peft_adapters.get(adapter))
        out = ref.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                           pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        assert seq.output_ids == out.sequences[0, len(prompt):].tolist(), adapter
        ref_lp = torch.stack([torch.log_softmax(s[0], -1)[t] for s, t in zip(out.scores, seq.output_ids)])
        assert torch.allclose(torch.tensor(seq.output_logprobs), ref_lp, atol=1e-4), adapter


def test_adapter_reload_keeps_running_requests_on_old_weights(llama_dir, peft_adapters):
    engine = make_engine(llama_dir)
    engine.loras.load("a", peft_adapters["qv-r4"])
    prompt = engine.tokenizer("Hello, world! How").input_ids
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = engine.generate([prompt], params, ["a"])[0].output_ids
    engine.add_request("long", prompt, params, "a")
    engine.step()
    engine.loras.load("a", peft_adapters["attn-r8"])   # hot reload while "long" runs
    seq = engine.requests["long"]
    while engine.has_work():
        engine.step()
    assert seq.output_ids == expected
    assert engine.loras.free_slots() == engine.loras.max_loras - 1


def test_bad_adapters_are_refused_with_reasons(llama_dir, peft_adapters, tmp_path):
    engine = make_engine(llama_dir, max_lora_rank=16)
    with pytest.raises(AdapterError, match="rank"):
        engine.loras.load("big", peft_adapters["mlp-r128"])
    with pytest.raises(AdapterError, match="adapter_config.json"):
        engine.loras.load("missing", tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "peft_type": "LORA"}')
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickled adapters are refused"):
        engine.loras.load("pickled", tmp_path)
    assert engine.loras.adapters == {}
