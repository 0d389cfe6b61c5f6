"""A job's optimizer step works on its adapter's flat tensors (one launch to check, clip or zero all gradients,
where hundreds of per-tensor calls cost tens of milliseconds of host time an iteration must wait through): it
equals torch's AdamW with clip_grad_norm_ over the separate tensors, catches a NaN in any one of them, and leaves
the serving slot holding exactly what write_slot puts there."""
from __future__ import annotations

import pytest
import torch

from coserve_testlib import make_engine, write_task
from coserve.engine.cost_model import CostModel
from coserve.engine.finetune.adapter import TrainAdapter
from coserve.engine.finetune.job import JobState
from coserve.engine.finetune.manager import build_job
from coserve.engine.finetune.spec import JobSpec, LoRASpec

FIXED_COST = CostModel(0.0, 1e-6, 0.0, 1e-6)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def spec(job_id: str, **training) -> JobSpec:
    return JobSpec.model_validate({
        "id": job_id, "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
        "lora": {"r": 4, "alpha": 8, "target_modules": TARGETS}, "output": job_id, "checkpoint_every": None,
        "training": {"lr": 0.05, "epochs": 5, "chunk_tokens": 8, "seed": 1, "weight_decay": 0.1, **training}})


@pytest.fixture(scope="module")
def engine(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("optimizer-step")
    write_task(root)
    return make_engine(llama_dir, data_root=str(root), tpot_slo_ms=1e6, cost_model=FIXED_COST, max_loras=3)


def test_parameters_and_gradients_are_views_of_the_flat_tensors(engine):
    adapter = TrainAdapter(engine.model, LoRASpec(r=4, alpha=8, target_modules=TARGETS), seed=0)
    params = adapter.parameters()
    assert len(params) == 2 * len(engine.model.lora_targets())
    assert sum(p.numel() for p in params) == adapter.flat.numel() == adapter.flat_grad.numel()
    assert all(p.is_leaf and p.requires_grad and p.grad is not None for p in params)
    with torch.no_grad():
        params[5].add_(1.0)
    params[7].grad.fill_(2.0)
    assert adapter.flat.eq(1.0).sum() >= params[5].numel() and adapter.flat_grad.eq(2.0).sum() == params[7].numel()
    adapter.zero_grad()
    assert not params[7].grad.any()


@pytest.mark.parametrize("where", [0, 13, -1])
def test_a_non_finite_value_in_any_tensor_is_seen(engine, where):
    adapter = TrainAdapter(engine.model, LoRASpec(r=4, alpha=8, target_modules=TARGETS), seed=0)
    params = adapter.parameters()
    assert bool(adapter.grads_finite()) and bool(adapter.weights_finite())
    params[where].grad.view(-1)[-1] = float("inf")
    with torch.no_grad():
        params[where].view(-1)[0] = float("nan")
    assert not bool(adapter.grads_finite()) and not bool(adapter.weights_finite())


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_clipping_equals_torch_clip_grad_norm(engine, max_norm):
    adapter = TrainAdapter(engine.model, LoRASpec(r=4, alpha=8, target_modules=TARGETS), seed=0)
    gen = torch.Generator().manual_seed(int(max_norm * 1000))
    ref = [torch.zeros(p.shape, requires_grad=True) for p in adapter.parameters()]
    for p, r in zip(adapter.parameters(), ref):
        r.grad = torch.randn(p.shape, generator=gen)
        p.grad.copy_(r.grad)
    norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert (norm > max_norm) == (max_norm < 1), "one case clips, the other does not"
    adapter.clip_grad_norm_(max_norm)
    for p, r in zip(adapter.parameters(), ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_a_job_step_equals_torch_adamw_with_clipping_and_rewrites_the_slot(engine, max_grad_norm):
    job = build_job(engine, spec("clipped" if max_grad_norm else "plain", max_grad_norm=max_grad_norm))
    engine.finetune.add(job)
    params = job.adapter.parameters()
    ref = [p.detach().clone().requires_grad_() for p in params]
    t = job.spec.training
    opt = torch.optim.AdamW(ref, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, r, g in zip(params, ref, grads):
            p.grad.copy_(g)
            r.grad = g.clone()
        job.step_loss, job.step_targets = torch.tensor(3.0), 2
        job._optimizer_step()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref, max_grad_norm)
        opt.step()
        assert job.step == step + 1 and job.losses[-1] == pytest.approx(1.5) and job.state is JobState.RUNNING
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-7)
        assert not any(p.grad.any() for p in params), "the step leaves the gradients zeroed"
    loras = engine.loras
    slot_now = [(m.lora_a[job.slot].clone(), m.lora_b[job.slot].clone()) for m in loras.linears]
    loras.write_slot(job.slot, job.adapter.weights(), job.adapter.scaling)
    for (a, b), m in zip(slot_now, loras.linears):
        assert torch.equal(a, m.lora_a[job.slot]) and torch.equal(b, m.lora_b[job.slot])
    engine.finetune.cancel(job.spec.id)


def test_the_slot_writer_slices_again_after_the_stacks_widen(engine):
    loras = engine.loras
    adapter = TrainAdapter(engine.model, LoRASpec(r=4, alpha=8, target_modules=TARGETS), seed=0)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    slot = loras.reserve_training_slot()
    try:
        write = loras.slot_writer(slot, adapter.weights(), adapter.scaling)
        write()
        loras._grow(loras.rank + 4)   # what loading an adapter of a higher rank does
        with torch.no_grad():
            adapter.flat.mul_(-1)
        write()
        m = loras.linears[0]
        a, _ = adapter.params[m.names[0]]
        torch.testing.assert_close(m.lora_a[slot, 0, :4], a.detach().to(m.lora_a.dtype))
        assert not m.lora_a[slot, 0, 4:].any()
    finally:
        loras.release_training_slot(slot)
