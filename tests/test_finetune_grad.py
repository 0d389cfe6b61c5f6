"""Token-level finetuning is exact: LoRA gradients from chunked forwards and backward units of one or more
chunks of a layer, interleaved with inference requests in the same iterations, equal full-sequence autograd
through peft."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from coserve_testlib import hf_model, make_engine, make_peft_adapter, rel_err
from coserve.engine.cost_model import CostModel
from coserve.engine.finetune.job import UNIT_SHARE, JobState
from coserve.engine.finetune.manager import build_job
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.lora import read_adapter
from coserve.engine.sampling import SamplingParams

FIXED_COST = CostModel(0.0, 1e-6, 0.0, 1e-6)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = ("The scheduler admits decode tokens first, then prefill chunks, then fills what time is left with "
        "finetuning work. Adapters are small matrices added beside each projection.")


def peft_grads(model_dir, adapter_dir, ids: list[int]) -> tuple[float, dict[str, torch.Tensor]]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model(model_dir), str(adapter_dir), is_trainable=True)
    logits = model(torch.tensor([ids])).logits[0]
    loss = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
            grads[f"{module}.{'A' if 'lora_A' in name else 'B'}"] = p.grad
    return float(loss), grads


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk_tokens", [3, 7, 16])
@pytest.mark.parametrize("max_unit", [16, 128], ids=["units-of-16", "units-of-128"])
def test_token_level_gradients_equal_full_sequence_autograd(model_dirs, tmp_path, arch, chunk_tokens, max_unit):
    """Backward units follow a fixed grid of positions, across the forward's chunk boundaries, sized to their share
    of the iteration's target (`max_unit` tokens for the whole target here, by the cost model); any grid and any
    chunking give the same gradients."""
    model_dir = model_dirs[arch]
    make_peft_adapter(model_dir, tmp_path / "init", 0, r=8, lora_alpha=16, target_modules=TARGETS)
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    engine = make_engine(model_dir, data_root=str(tmp_path), tpot_slo_ms=max_unit * 1e-3, cost_model=FIXED_COST)
    spec = JobSpec.model_validate({
        "id": "grad", "dataset": {"path": "data.jsonl", "format": "text"}, "output": "out", "init_from": "init",
        "lora": {"r": 8, "alpha": 16, "target_modules": TARGETS},
        "training": {"optimizer": "sgd", "lr": 1.0, "max_steps": 1, "chunk_tokens": chunk_tokens,
                     "shuffle": False, "max_seq_len": 64}})
    job = build_job(engine, spec)
    ids = job.sequences[0].ids
    assert len(ids) > 4 * chunk_tokens or chunk_tokens == 16 and len(ids) > 2 * chunk_tokens
    for i, prompt in enumerate(["Hello, world!", "One, two, three", "Question: what is"]):
        engine.add_request(f"inf{i}", engine.tokenizer(prompt).input_ids,
                           SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.finetune.add(job)
    shared = units = largest = 0
    while engine.has_work():
        engine.step()
        s = engine.last_step
        shared += bool(s.finetune_tokens and (s.prefill_tokens or s.decode_tokens))
        units += s.backward_units
        if s.backward_units:
            largest = max(largest, s.unit_tokens // s.backward_units)
    assert job.state is JobState.SUCCEEDED, job.error
    assert shared >= 2, "finetuning chunks must ride in the same forward as inference tokens"
    passes = engine.model.cfg.num_layers + 1   # the loss head, then each layer
    assert units > passes, "a pass over a sequence longer than a unit takes several units"
    assert largest == max(16, int(max_unit * UNIT_SHARE)), "a unit takes its share of the target (>= 16 positions)"
    assert largest > chunk_tokens or chunk_tokens == 16, "units span several forward chunks"

    _, init = read_adapter(tmp_path / "init")
    _, final = read_adapter(tmp_path / "out" / "checkpoint-1")
    ours = torch.cat([(init[m][ab] - final[m][ab]).flatten() for m in sorted(init) for ab in "AB"])
    ref_loss, ref = peft_grads(model_dir, tmp_path / "init", ids)
    theirs = torch.cat([ref[f"{m}.{ab}"].flatten() for m in sorted(init) for ab in "AB"])
    assert rel_err(ours, theirs) <= 1e-5
    assert job.loss == pytest.approx(ref_loss, rel=1e-5)


def test_lora_dropout_gradients_equal_autograd_with_the_same_masks(llama_dir, tmp_path):
    """Dropout masks drawn in the serving forward are drawn again identically in the backward units."""
    from peft import PeftModel

    from coserve.engine.finetune.dropout import ChunkDropout

    p, chunk = 0.3, 6
    make_peft_adapter(llama_dir, tmp_path / "init", 0, r=8, lora_alpha=16, target_modules=TARGETS)
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=1e6, cost_model=FIXED_COST)
    spec = JobSpec.model_validate({
        "id": "drop", "dataset": {"path": "data.jsonl", "format": "text"}, "output": "out", "init_from": "init",
        "lora": {"r": 8, "alpha": 16, "target_modules": TARGETS, "dropout": p},
        "training": {"optimizer": "sgd", "lr": 1.0, "max_steps": 1, "chunk_tokens": chunk, "shuffle": False,
                     "max_seq_len": 64, "seed": 4}})
    job = build_job(engine, spec)
    ids = job.sequences[0].ids
    key = job.dropout_key()
    engine.finetune.add(job)
    while engine.has_work():
        engine.step()
    assert job.state is JobState.SUCCEEDED, job.error

    class ChunkMasks(torch.nn.Module):
        def __init__(self, module: str):
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            parts = [ChunkDropout(p, key, s)(self.module, x[0, s:s + chunk]) for s in range(0, x.shape[1], chunk)]
            return torch.cat(parts)[None]

    model = PeftModel.from_pretrained(hf_model(llama_dir), str(tmp_path / "init"), is_trainable=True)
    for name, m in model.named_modules():
        if hasattr(m, "lora_dropout") and "default" in m.lora_dropout:
            m.lora_dropout["default"] = ChunkMasks(name.split("base_model.model.", 1)[1])
    logits = model(torch.tensor([ids])).logits[0]
    F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).backward()
    _, init = read_adapter(tmp_path / "init")
    _, final = read_adapter(tmp_path / "out" / "checkpoint-1")
    ours = torch.cat([(init[m][ab] - final[m][ab]).flatten() for m in sorted(init) for ab in "AB"])
    grads = {}
    for name, prm in model.named_parameters():
        if "lora_" in name:
            module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
            grads[f"{module}.{'A' if 'lora_A' in name else 'B'}"] = prm.grad
    theirs = torch.cat([grads[f"{m}.{ab}"].flatten() for m in sorted(init) for ab in "AB"])
    assert rel_err(ours, theirs) <= 1e-5
    no_drop = peft_grads(llama_dir, tmp_path / "init", ids)[1]
    plain = torch.cat([no_drop[f"{m}.{ab}"].flatten() for m in sorted(init) for ab in "AB"])
    assert rel_err(ours, plain) > 1e-2, "dropout must change the gradients"


def test_a_step_of_several_sequences_runs_the_next_forward_beside_the_last_backward_and_stays_exact(llama_dir,
                                                                                                     tmp_path):
    """With sequences_per_step 3, each sequence's forward chunks run beside the previous one's backward units (and
    the decode tokens) in the same iterations; one SGD step equals PEFT's gradient of the step's loss (every
    target of the three sequences, averaged)."""
    make_peft_adapter(llama_dir, tmp_path / "init", 0, r=8, lora_alpha=16, target_modules=TARGETS)
    texts = [TEXT, TEXT[:90], TEXT[40:]]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=64e-3, cost_model=FIXED_COST)
    spec = JobSpec.model_validate({
        "id": "sps", "dataset": {"path": "data.jsonl", "format": "text"}, "output": "out", "init_from": "init",
        "lora": {"r": 8, "alpha": 16, "target_modules": TARGETS},
        "training": {"optimizer": "sgd", "lr": 1.0, "max_steps": 1, "chunk_tokens": 4, "sequences_per_step": 3,
                     "shuffle": False, "max_seq_len": 64}})
    job = build_job(engine, spec)
    seqs = [s.ids for s in job.sequences]
    engine.add_request("inf", engine.tokenizer("Hello").input_ids,
                       SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    engine.finetune.add(job)
    beside = 0
    while job.active:
        backward_running = job.backward is not None
        engine.step()
        beside += backward_running and engine.last_step.finetune_tokens > 0
    assert job.state is JobState.SUCCEEDED, job.error
    assert beside >= 2, "the next sequence's forward must share iterations with the last one's backward"

    from peft import PeftModel
    model = PeftModel.from_pretrained(hf_model(llama_dir), str(tmp_path / "init"), is_trainable=True)
    total = sum(F.cross_entropy(model(torch.tensor([ids])).logits[0][:-1], torch.tensor(ids[1:]), reduction="sum")
                for ids in seqs)
    (total / sum(len(ids) - 1 for ids in seqs)).backward()
    grads = {}
    for name, prm in model.named_parameters():
        if "lora_" in name:
            module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
            grads[f"{module}.{'A' if 'lora_A' in name else 'B'}"] = prm.grad
    _, init = read_adapter(tmp_path / "init")
    _, final = read_adapter(tmp_path / "out" / "checkpoint-1")
    ours = torch.cat([(init[m][ab] - final[m][ab]).flatten() for m in sorted(init) for ab in "AB"])
    theirs = torch.cat([grads[f"{m}.{ab}"].flatten() for m in sorted(init) for ab in "AB"])
    assert rel_err(ours, theirs) <= 1e-5
