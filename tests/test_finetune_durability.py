"""Durability of finetuning jobs inside one engine: retention keeps the last N checkpoints plus the best-loss and
the final one (on disk and in the record), a resume refuses tampered checkpoints naming resume_from, a
non-finite loss fails the job without writing a checkpoint or touching the serving slot, and outputs belong
to one job whatever their spelling."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from coserve_testlib import make_engine, write_task
from coserve.engine.cost_model import CostModel
from coserve.engine.finetune.adapter import TrainAdapter, lora_shapes
from coserve.engine.finetune.checkpoint import FILES, SUMS_FILE, NonFiniteError, save_checkpoint, sha256_file
from coserve.engine.finetune.job import JobState
from coserve.engine.finetune.manager import JobError, build_job
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.lora import write_adapter

FIXED_COST = CostModel(0.0, 1e-6, 0.0, 1e-6)


def spec(job_id: str, output: str | None = None, epochs: int = 3, **over) -> JobSpec:
    body = {"id": job_id, "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "output": output or job_id,
            "checkpoint_every": 1, "training": {"lr": 0.3, "epochs": epochs, "chunk_tokens": 8, "seed": 1}}
    body.update(over)
    return JobSpec.model_validate(body)


def train(engine, job) -> None:
    engine.finetune.add(job)
    while engine.has_work():
        engine.step()


@pytest.fixture(scope="module")
def trained(llama_dir, tmp_path_factory):
    """One finished job with a checkpoint at every step and retention 2."""
    root = tmp_path_factory.mktemp("durable")
    write_task(root)
    engine = make_engine(llama_dir, data_root=str(root), tpot_slo_ms=1e6, cost_model=FIXED_COST)
    job = build_job(engine, spec("kept", save_total_limit=2))
    train(engine, job)
    assert job.state is JobState.SUCCEEDED, job.error
    return root, engine, job


def test_retention_keeps_the_last_n_the_best_and_the_final_checkpoint(trained):
    root, _, job = trained
    assert job.total_steps == 12
    best = min(range(job.total_steps), key=lambda i: job.losses[i]) + 1
    assert best < job.total_steps - 1, "the data must make the best step an early one for this test to bite"
    want = {job.total_steps - 1, job.total_steps, best}
    assert {c.step for c in job.checkpoints} == want
    assert {p.name for p in (root / "kept").glob("checkpoint-*")} == {f"checkpoint-{s}" for s in want}
    record = json.loads((root / "kept/job.json").read_text())
    assert record["state"] == "succeeded" and {c["step"] for c in record["checkpoints"]} == want
    for c in record["checkpoints"]:
        assert sha256_file(root / c["path"] / "adapter_model.safetensors") == c["sha256"]


def rewrite_sums(folder) -> None:
    """What a careful tamperer does: make SHA256SUMS agree with the changed files."""
    (folder / SUMS_FILE).write_text("".join(f"{sha256_file(folder / n)}  {n}\n" for n in FILES))


def scale_weights(folder, factor: float) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = {k: v * factor for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def set_step(folder, step) -> None:
    path = folder / "trainer_state.json"
    state = json.loads(path.read_text())
    state["step"] = step
    path.write_text(json.dumps(state))


def negate_second_moment(folder) -> None:
    path = folder / "optimizer.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("exp_avg_sq"))
    tensors[key] = -tensors[key] - 1
    save_file(tensors, str(path))


TAMPERS = {   # name: (change, keep the job record, rewrite SHA256SUMS, what the refusal says)
    "weights x100, recorded": (lambda f: scale_weights(f, 100.0), True, True, "job record says"),
    "weights x100, sums only": (lambda f: scale_weights(f, 100.0), False, False, "does not match its sha256"),
    "NaN weights": (lambda f: scale_weights(f, float("nan")), False, True, "NaN or infinity"),
    "step 1000000": (lambda f: set_step(f, 1000000), False, True, "not an integer in 1..12"),
    "negative step": (lambda f: set_step(f, -4), False, True, "not an integer in 1..12"),
    "step of another folder": (lambda f: set_step(f, 3), False, True, "differs from the folder's step"),
    "negative second moment": (negate_second_moment, False, True, "inconsistent"),
    "no hashes at all": (lambda f: (f / SUMS_FILE).unlink(), False, False, "integrity cannot be checked"),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_a_tampered_checkpoint_is_refused_naming_resume_from(trained, name):
    root, engine, job = trained
    change, keep_record, resum, message = TAMPERS[name]
    out = root / f"t-{abs(hash(name))}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    step = job.checkpoints[-2].step
    shutil.copytree(root / job.checkpoints[-2].path, out / f"checkpoint-{step}")
    if keep_record:
        shutil.copy(root / "kept/job.json", out / "job.json")
    resume = f"{out.name}/checkpoint-{step}"
    ok = build_job(engine, spec("again", out.name + "-r", resume_from=resume))   # untouched: accepted
    assert ok.step == step and ok.losses == job.losses[:step]
    change(out / f"checkpoint-{step}")
    if resum:
        rewrite_sums(out / f"checkpoint-{step}")
    with pytest.raises(JobError) as err:
        build_job(engine, spec("again", out.name + "-r", resume_from=resume))
    assert err.value.param == "resume_from" and message in str(err.value), str(err.value)


def test_a_non_finite_loss_fails_the_job_and_writes_nothing(trained, llama_dir):
    root, engine, _ = trained
    shapes = lora_shapes(engine.model, spec("x").lora)
    huge = {m: (torch.full(a, 1e30), torch.full(b, 1e30)) for m, (a, b) in shapes.items()}   # finite, but
    write_adapter(root / "huge", huge, 4, 8, str(llama_dir))                                  # overflows
    job = build_job(engine, spec("blows-up", init_from="huge"))
    train(engine, job)
    assert job.state is JobState.FAILED and "step 1: the loss is nan" in job.error
    assert not list((root / "blows-up").glob("checkpoint-*")) and job.checkpoints == []
    assert engine.loras.free_slots() == engine.loras.max_loras
    record = json.loads((root / "blows-up/job.json").read_text())
    assert record["state"] == "failed" and record["error"] == job.error and record["loss"] is None


def test_a_non_finite_adapter_or_optimizer_state_is_never_written(trained, tmp_path):
    _, engine, _ = trained
    adapter = TrainAdapter(engine.model, spec("x").lora, 0)
    optimizer = torch.optim.AdamW(adapter.parameters())
    with torch.no_grad():
        adapter.parameters()[1][0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        save_checkpoint(tmp_path, tmp_path, 3, adapter, optimizer, {"tokens": 0, "losses": [1.0] * 3}, "m")
    assert list(tmp_path.iterdir()) == []


def test_an_output_belongs_to_one_job_whatever_its_spelling(trained):
    root, engine, job = trained
    live = build_job(engine, spec("owner", "ft/x", epochs=50))
    engine.finetune.add(live)
    assert live.state is JobState.RUNNING
    for alias in ("ft//x/", "ft/./x", "ft/y/../x"):
        with pytest.raises(JobError) as err:
            engine.finetune.check_new(spec("intruder", alias))
        assert (err.value.status, err.value.param) == (409, "output") and "owner" in str(err.value)
    while live.step < 2:
        engine.step()
    engine.finetune.cancel("owner")
    assert [c.step for c in live.checkpoints] == [1, 2]
    with pytest.raises(JobError) as err:   # stopped, but its checkpoints are its own
        engine.finetune.check_new(spec("intruder", "ft//x"))
    assert (err.value.status, err.value.param) == (409, "output") and "checkpoint-2" in str(err.value)
    with pytest.raises(JobError) as err:   # the same id starts afresh only by resuming
        engine.finetune.check_new(spec("owner", "ft/x"))
    assert (err.value.status, err.value.param) == (409, "id")
    again = build_job(engine, spec("owner", "ft/x", epochs=50, resume_from="ft//x/checkpoint-2"))
    engine.finetune.add(again)
    assert engine.finetune.jobs["owner"] is again and again.state is JobState.RUNNING and again.step == 2
    engine.finetune.cancel("owner")
    with pytest.raises(JobError) as err:   # kept "finished" output too
        engine.finetune.check_new(spec("other", "kept"))
    assert (err.value.status, err.value.param) == (409, "output")
    taker = build_job(engine, spec("taker", "ft//x/", epochs=50, resume_from="ft/x/checkpoint-2"))
    engine.finetune.add(taker)   # resuming from one of its checkpoints takes the output over
    assert taker.state is JobState.RUNNING and [c.step for c in taker.checkpoints] == [1, 2]
    assert json.loads((root / "ft/x/job.json").read_text())["id"] == "taker"
    engine.finetune.cancel("taker")


def test_records_are_read_back_only_from_their_own_folder_under_the_data_root(trained, tmp_path):
    root, engine, _ = trained
    record = (root / "kept/job.json").read_text()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "job.json").write_text(record.replace('"kept"', '"linked"'))
    (root / "linked").symlink_to(outside)
    (root / "moved").mkdir()
    (root / "moved/job.json").write_text(record.replace('"id": "kept"', '"id": "copied"'))   # output: "kept"
    (root / "corrupt").mkdir()
    (root / "corrupt/job.json").write_text('{"id": "corrupt", "state": ')
    restored = {j.spec.id: j for j in engine.finetune.restore()}
    assert restored["kept"].output == root / "kept" and restored["kept"].state is JobState.SUCCEEDED
    assert [c.step for c in restored["kept"].checkpoints] == [c.step for c in trained[2].checkpoints]
    assert "linked" not in restored and "corrupt" not in restored and "copied" not in restored
    assert all(j.output.parent == root or root in j.output.parents for j in restored.values())


def test_a_step_with_non_finite_gradients_is_skipped_on_the_device_and_fails_the_job(trained):
    """The optimizer step never syncs: the fused optimizer skips a step whose gradients hold NaN (found_inf),
    and the job fails when the step's checks reach the host, its weights and optimizer state untouched."""
    root, engine, _ = trained
    job = build_job(engine, spec("nan-grads", epochs=5))
    engine.finetune.add(job)
    params = job.adapter.parameters()

    def step_with(grads_value: float, loss: float) -> None:
        for p in params:
            p.grad.fill_(0.01)
        params[-1].grad[0, 0] = grads_value
        job.step_loss, job.step_targets = torch.tensor(2.0 * loss), 2
        job._optimizer_step()

    step_with(0.01, 1.5)
    assert job.step == 1 and job.losses == [1.5] and job.state is JobState.RUNNING
    before = [p.detach().clone() for p in params]
    moments = [job.optimizer.state[p]["exp_avg"].clone() for p in params]
    step_with(float("nan"), 1.25)
    assert job.state is JobState.FAILED and "step 2: the gradients hold NaN" in job.error, job.error
    assert job.step == 1 and job.losses == [1.5]
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "the skipped step changed the weights"
    assert all(torch.equal(job.optimizer.state[p]["exp_avg"], m) for p, m in zip(params, moments))
    assert all(int(job.optimizer.state[p]["step"]) == 1 for p in params)
    assert [c.step for c in job.checkpoints] == [1]
    assert {p.name for p in (root / "nan-grads").glob("checkpoint-*")} == {"checkpoint-1"}
