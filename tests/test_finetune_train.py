"""Training through the engine learns, matches peft + transformers step for step, writes checkpoints that
peft loads, and resumes to the same adapter as an uninterrupted run."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from coserve_testlib import TASK, hf_model, make_engine, rel_err, write_task
from coserve.engine.cost_model import CostModel
from coserve.engine.finetune.dataset import IGNORE
from coserve.engine.finetune.job import FinetuneJob, JobState
from coserve.engine.finetune.manager import build_job
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.lora import read_adapter
from coserve.engine.runner import build_batch
from coserve.engine.sampling import SamplingParams
from coserve.engine.scheduler import Chunk
from coserve.engine.sequence import Sequence

FIXED_COST = CostModel(0.0, 1e-6, 0.0, 1e-6)
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def job_spec(job_id: str, output: str, **training) -> JobSpec:
    t = {"optimizer": "adamw", "lr": 0.01, "epochs": 12, "chunk_tokens": 5, "seed": 3, **training}
    return JobSpec.model_validate({"id": job_id, "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
                                   "lora": {"r": 8, "alpha": 16, "target_modules": TARGETS}, "output": output,
                                   "checkpoint_every": 8, "save_total_limit": None, "training": t})


def run_until_done(engine, job: FinetuneJob, inference: bool = True) -> None:
    engine.finetune.add(job)
    prompts = [engine.tokenizer(p).input_ids for p, _ in TASK]
    n = 0
    while engine.has_work():
        if inference and n < 40 and len(engine.scheduler.running) < 2:
            engine.add_request(f"bg{n}", prompts[n % len(prompts)],
                               SamplingParams(max_tokens=6, temperature=0.7, seed=n))
            n += 1
        engine.step()
    assert job.state is JobState.SUCCEEDED, job.error


@pytest.fixture(scope="module")
def trained(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_task(root)
    engine = make_engine(llama_dir, data_root=str(root), tpot_slo_ms=1e6, cost_model=FIXED_COST)
    job = build_job(engine, job_spec("learn", "out"))
    run_until_done(engine, job)
    return root, engine, job


def test_loss_falls_and_the_adapter_answers_as_taught(trained):
    root, engine, job = trained
    assert job.step == job.total_steps == 48
    assert sum(job.losses[-4:]) < 0.05 * sum(job.losses[:4])
    assert [c.step for c in job.checkpoints] == [8, 16, 24, 32, 40, 48]
    engine.loras.load("learned", root / job.checkpoints[-1].path)
    for prompt, completion in TASK:
        ids = engine.tokenizer(prompt).input_ids
        want = engine.tokenizer(completion).input_ids
        out = engine.generate([ids], SamplingParams(max_tokens=len(want), temperature=0), ["learned"])[0]
        base = engine.generate([ids], SamplingParams(max_tokens=len(want), temperature=0, ignore_eos=True))[0]
        assert out.output_ids == want, prompt
        assert base.output_ids != want


def test_peft_and_transformers_give_the_same_loss_curve(trained, llama_dir):
    from peft import LoraConfig, get_peft_model

    root, engine, job = trained
    fresh = build_job(engine, job_spec("replay", "replay"))
    fresh.start()   # our seeded initial adapter, to hand the same start to peft
    model = get_peft_model(hf_model(llama_dir), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                           lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
                p.copy_(fresh.adapter.params[module][0 if "lora_A" in name else 1])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    for step in range(job.total_steps):
        (i,) = fresh._sequence_indices(step)   # the same seed, so the same data order as the trained job
        ex = fresh.sequences[i]
        logits = model(torch.tensor([ex.ids])).logits[0]
        loss = F.cross_entropy(logits[:-1], torch.tensor(ex.labels[1:]), ignore_index=IGNORE)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    fresh.cancel()
    assert job.losses == pytest.approx(losses, rel=2e-3)


def test_checkpoint_loads_in_peft_with_the_same_logits(trained, llama_dir):
    from peft import PeftModel

    root, engine, job = trained
    ckpt = root / job.checkpoints[1].path
    engine.loras.load("ckpt", ckpt)
    ids = engine.tokenizer("Question: what colour is the sky? Answer: blue").input_ids
    seq = Sequence("interop", ids, SamplingParams(), adapter_slot=engine.loras.adapters["ckpt"].slot)
    engine.blocks.allocate(seq.request_id, len(ids))
    with torch.no_grad():
        ours = engine.model(build_batch([Chunk(seq, 0, len(ids))], engine.blocks, "cpu", all_logits=True),
                            engine.kv_caches)
    engine.blocks.release(seq.request_id)
    peft_model = PeftModel.from_pretrained(hf_model(llama_dir), str(ckpt)).eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor([ids])).logits[0]
    assert rel_err(ours, ref) <= 1e-4


def test_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_does(trained, llama_dir):
    root, _, job = trained
    engine = make_engine(llama_dir, data_root=str(root), tpot_slo_ms=1e6, cost_model=FIXED_COST)
    first = build_job(engine, job_spec("part", "part"))
    engine.finetune.add(first)
    while first.step < 16:
        engine.step()
    engine.finetune.cancel("part")
    assert [c.step for c in first.checkpoints] == [8, 16] and (root / "part/checkpoint-16").is_dir()
    spec = job_spec("rest", "rest").model_copy(update={"resume_from": "part/checkpoint-16"})
    rest = build_job(engine, spec)
    run_until_done(engine, rest, inference=False)
    assert rest.step == 48 and rest.losses == pytest.approx(job.losses, rel=1e-4)
    _, resumed = read_adapter(root / "rest/checkpoint-48")
    _, straight = read_adapter(root / job.checkpoints[-1].path)
    for module in straight:   # float-level differences only: interleaving changes how backward units group
        for ab in "AB":
            assert rel_err(resumed[module][ab], straight[module][ab]) <= 1e-4, module