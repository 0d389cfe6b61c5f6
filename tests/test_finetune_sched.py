"""Co-serving invariants: inference output is untouched by concurrent finetuning, inference is admitted
first and finetuning only fills what the latency target leaves, and finetuning progresses under load."""
from __future__ import annotations

import json

import pytest

from coserve_testlib import make_engine
from coserve.engine.cost_model import EAGER, CostModel, Forward, Unit
from coserve.engine.finetune.backward import UnitGraphs
from coserve.engine.finetune.job import UNIT_SHARE, JobState
from coserve.engine.finetune.manager import PATIENCE, build_job
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.sampling import SamplingParams
from coserve_testlib import write_task
from coserve_testlib import ADAPTERS, make_peft_adapter

PROMPTS = ["Hello, world! How are", "One, two, three", "The quick brown fox", "Monday, Tuesday"]


def spec(job_id: str, **training) -> JobSpec:
    return JobSpec.model_validate({"id": job_id, "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
                                   "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                                   "output": job_id, "training": {"lr": 0.01, "epochs": 3, "chunk_tokens": 4,
                                                                  **training}})


def serve_all(engine, with_jobs: int) -> list[tuple[list[int], list[float]]]:
    """Run the same inference requests, optionally beside finetuning jobs; returns tokens and logprobs."""
    for i in range(with_jobs):
        engine.finetune.add(build_job(engine, spec(f"job{i}")))
    seqs = []
    for i, p in enumerate(PROMPTS * 2):
        engine.add_request(f"r{i}", engine.tokenizer(p).input_ids,
                           SamplingParams(max_tokens=12, temperature=0.8 if i % 2 else 0, seed=i, ignore_eos=True,
                                          logprobs=True), "other" if i % 3 == 0 else None)
        seqs.append(engine.requests[f"r{i}"])
    while any(s.finish_reason is None for s in seqs):
        engine.step()
    return [(s.output_ids, s.output_logprobs) for s in seqs]


def test_base_and_other_adapters_are_unchanged_by_concurrent_finetuning(llama_dir, tmp_path):
    """Tokens are identical; logprobs agree to float rounding (a matmul over more rows may round differently,
    exactly as when other inference requests share the batch)."""
    write_task(tmp_path)
    make_peft_adapter(llama_dir, tmp_path / "other", 5, **ADAPTERS["qv-r4"])
    outputs = []
    for jobs in (0, 2):
        engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=1e6,
                             cost_model=CostModel(0.0, 1e-6, 0.0, 1e-6))
        engine.loras.load("other", tmp_path / "other")
        outputs.append(serve_all(engine, jobs))
        if jobs:
            assert sum(j.tokens for j in engine.finetune.jobs.values()) > 0
    for (tokens_a, lps_a), (tokens_b, lps_b) in zip(*outputs):
        assert tokens_a == tokens_b
        assert lps_a == pytest.approx(lps_b, abs=1e-5)


def test_inference_first_and_finetuning_fills_only_the_remaining_budget(llama_dir, tmp_path):
    write_task(tmp_path)
    cost = CostModel(fwd_fixed_s=0.001, fwd_per_token_s=0.0001, unit_fixed_s=0.0, unit_per_token_s=1e-9)
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=5.0, cost_model=cost,
                         max_batched_tokens=64)
    job = build_job(engine, spec("fill", chunk_tokens=64))
    engine.finetune.add(job)
    long_prompt = engine.tokenizer("word " * 45).input_ids
    engine.add_request("big", long_prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.add_request("small", [5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    saw_full, saw_shared = False, False
    while engine.requests:
        engine.step()
        s = engine.last_step
        inference = s.prefill_tokens + s.decode_tokens
        if s.finetune_tokens:
            assert cost.forward_s(inference + s.finetune_tokens) <= 0.005 + 1e-12
        if cost.forward_s(inference) >= 0.005:
            assert s.finetune_tokens == 0
            saw_full = True
        saw_shared |= bool(inference and s.finetune_tokens)
    assert saw_full and saw_shared
    assert job.tokens > 0 and job.step > 0, "finetuning progressed while inference ran"


def test_with_no_inference_waiting_an_iteration_plans_the_idle_budget_not_the_latency_target(llama_dir, tmp_path):
    """Finetuning alone takes whole sequences in fewer, larger iterations (up to idle_iteration_ms); once a
    request arrives, iterations shrink back to the latency target."""
    write_task(tmp_path)
    cost = CostModel(fwd_fixed_s=0.0, fwd_per_token_s=0.001, unit_fixed_s=0.0, unit_per_token_s=1e-9)
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=4.0, idle_iteration_ms=60.0,
                         cost_model=cost)
    job = build_job(engine, spec("idle", chunk_tokens=None))
    engine.finetune.add(job)
    lengths = [len(s.ids) for s in job.sequences]
    assert min(lengths) > 4, "the task's sequences must be longer than the latency target allows"
    alone = []
    for _ in range(3):
        engine.step()
        alone.append(engine.last_step.finetune_tokens)
    assert max(alone) > 4 and all(cost.forward_s(n) <= 0.06 for n in alone)
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    beside = []
    while engine.requests:
        engine.step()
        s = engine.last_step
        beside.append(s.finetune_tokens)
        assert cost.forward_s(s.prefill_tokens + s.decode_tokens + s.finetune_tokens) <= 0.004 + 1e-12
    assert any(beside), "finetuning still fills what the target leaves beside inference"


def test_finetuning_stands_aside_while_requests_wait_for_admission_but_never_starves(llama_dir, tmp_path):
    """With every batch slot taken and requests queued, iterations hold inference only (they end sooner, so the
    queue drains); after PATIENCE such iterations one trains as usual; without a queue finetuning fills again."""
    write_task(tmp_path)
    cost = CostModel(fwd_fixed_s=0.0, fwd_per_token_s=1e-6, unit_fixed_s=0.0, unit_per_token_s=1e-6)
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=50.0, cost_model=cost, max_num_seqs=1)
    for i in range(3):
        engine.add_request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=PATIENCE + 10, temperature=0,
                                                              ignore_eos=True))
    engine.step()
    assert len(engine.scheduler.waiting) == 2 and not engine.last_step.finetune_yielded, "no job: nothing stood aside"
    engine.finetune.add(build_job(engine, spec("aside", epochs=50)))
    held = []
    while len(engine.scheduler.waiting) == 2 or not held:
        engine.step()
        s = engine.last_step
        held.append((s.finetune_yielded, s.finetune_tokens + s.backward_units > 0))
    queued = held[:PATIENCE + 1]
    assert queued[:PATIENCE] == [(True, False)] * PATIENCE, "finetuning waits while requests are queued"
    assert queued[PATIENCE] == (False, True), "after PATIENCE iterations aside, one trains (no job starves)"
    while engine.requests:
        engine.step()
    trained = []
    for _ in range(4):
        engine.add_request("alone", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        engine.step()
        s = engine.last_step
        trained.append(not s.finetune_yielded and s.finetune_tokens + s.backward_units > 0)
        while engine.requests:
            engine.step()
    assert all(trained), "with nobody waiting, finetuning shares the iterations again"


def test_finetuning_never_delays_inference_past_a_tiny_target(llama_dir, tmp_path):
    write_task(tmp_path)
    cost = CostModel(fwd_fixed_s=0.01, fwd_per_token_s=0.001, unit_fixed_s=0.01, unit_per_token_s=0.001)
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=1.0, cost_model=cost)
    job = build_job(engine, spec("starved"))
    engine.finetune.add(job)
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    while engine.requests:
        engine.step()
        assert engine.last_step.finetune_tokens == 0 and engine.last_step.backward_units == 0
    steps_before = job.tokens
    for _ in range(200):   # once inference is idle, finetuning takes whole iterations
        if not engine.has_work():
            break
        engine.step()
    assert job.tokens > steps_before


def test_concurrent_jobs_each_train_their_own_adapter_and_queue_beyond_the_limit(llama_dir, tmp_path):
    write_task(tmp_path)
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=1e6, max_finetune_jobs=2,
                         cost_model=CostModel(0.0, 1e-6, 0.0, 1e-6))
    jobs = [build_job(engine, spec(f"j{i}", seed=i)) for i in range(3)]
    for job in jobs:
        engine.finetune.add(job)
    assert [j.state for j in jobs] == [JobState.RUNNING, JobState.RUNNING, JobState.QUEUED]
    while engine.has_work():
        engine.step()
    assert all(j.state is JobState.SUCCEEDED for j in jobs)
    assert len({json.dumps(j.losses) for j in jobs}) == 3
    assert engine.loras.free_slots() == engine.loras.max_loras
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_cancel_keeps_checkpoints_and_frees_everything(llama_dir, tmp_path):
    write_task(tmp_path)
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=1e6,
                         cost_model=CostModel(0.0, 1e-6, 0.0, 1e-6))
    job = build_job(engine, spec("c").model_copy(update={"checkpoint_every": 2}))
    engine.finetune.add(job)
    while job.step < 3:
        engine.step()
    engine.step()
    engine.finetune.cancel("c")
    assert job.state is JobState.CANCELLED
    assert [c.step for c in job.checkpoints] == [2] and (tmp_path / "c/checkpoint-2/adapter_model.safetensors").is_file()
    assert engine.blocks.num_free == engine.blocks.num_blocks and engine.loras.free_slots() == engine.loras.max_loras
    assert not engine.has_work()


@pytest.mark.parametrize("update, param", [
    ({"dataset": {"path": "../outside.jsonl"}}, "dataset.path"),
    ({"output": "/abs/out"}, "output"),
    ({"output": "x/../../out"}, "output"),
    ({"dataset": {"path": "missing.jsonl"}}, "dataset.path"),
    ({"init_from": "nope"}, "init_from"),
    ({"resume_from": "task.jsonl"}, "resume_from"),
    ({"training": {"max_seq_len": 100000}}, "training.max_seq_len"),
])
def test_bad_job_settings_are_refused_before_training(llama_dir, tmp_path, update, param):
    from coserve.engine.finetune.manager import JobError

    write_task(tmp_path)
    engine = make_engine(llama_dir, data_root=str(tmp_path), cost_model=CostModel(0.0, 1e-6, 0.0, 1e-6))
    body = spec("bad").model_dump()
    for key, value in update.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) else value
    with pytest.raises(JobError) as err:
        build_job(engine, JobSpec.model_validate(body))
    assert err.value.param == param


def test_a_job_queued_for_an_adapter_slot_starts_when_one_frees(llama_dir, tmp_path):
    write_task(tmp_path)
    make_peft_adapter(llama_dir, tmp_path / "other", 5, **ADAPTERS["qv-r4"])
    engine = make_engine(llama_dir, data_root=str(tmp_path), max_loras=1,
                         cost_model=CostModel(0.0, 1e-6, 0.0, 1e-6))
    engine.loras.load("other", tmp_path / "other")
    job = build_job(engine, spec("waits"))
    engine.finetune.add(job)
    assert job.state is JobState.QUEUED and not engine.has_work()
    engine.loras.unload("other")
    assert engine.has_work() and job.state is JobState.RUNNING
    while engine.has_work():
        engine.step()
    assert job.state is JobState.SUCCEEDED and job.sequences == [] and job.progress()["epoch"] == 2


def test_an_optimizer_step_priced_past_the_target_still_runs_under_constant_inference(llama_dir, tmp_path):
    """A unit that ends an optimizer step waits for room only so long: with a step priced over the whole target
    and inference in every iteration, the job still finishes (never starved)."""
    write_task(tmp_path)
    cost = CostModel(fwd_fixed_s=0.0, fwd_per_token_s=1e-6, unit_fixed_s=0.0, unit_per_token_s=1e-6, step_s=1.0)
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=50.0, cost_model=cost)
    job = build_job(engine, spec("patient", epochs=1, max_steps=2))
    engine.finetune.add(job)
    served = 0
    for _ in range(5000):
        if not job.active:
            break
        if not engine.requests:
            engine.add_request(f"r{served}", [5, 6, 7], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
            served += 1
        engine.step()
        assert engine.last_step.prefill_tokens or engine.last_step.decode_tokens, "inference runs in every iteration"
    assert job.state is JobState.SUCCEEDED, job.error


def test_unit_spans_fit_the_target_where_they_attend_to_most(llama_dir, tmp_path):
    """Spans are sized so the last one (which attends to every earlier position) fits half the target: with a
    price per attention pair, long sequences get shorter spans than the per-token price alone would give."""
    write_task(tmp_path)
    flat = CostModel(0.0, 1e-6, 0.001, 1e-6)
    quadratic = CostModel(0.0, 1e-6, 0.001, 1e-6, unit_per_pair_s=1e-9)
    spans = {}
    for name, cost in (("flat", flat), ("quadratic", quadratic)):
        engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=20.0, cost_model=cost)
        job = build_job(engine, spec(name))
        spans[name] = span = job.unit_span(8192)
        assert cost.unit_s(Unit(EAGER, span, 8192 - span)) <= UNIT_SHARE * 0.020 or span == 16
        assert span == 8192 or cost.unit_s(Unit(EAGER, 2 * span, 8192 - 2 * span)) > UNIT_SHARE * 0.020
    assert spans["quadratic"] < spans["flat"]


def test_unit_spans_stop_shrinking_where_the_fixed_cost_dominates(llama_dir, tmp_path):
    """A unit whose fixed cost alone exceeds its share of the target is not cut into minimal spans (which would
    fit no better, only run 512 times a layer): spans stop at the largest one whose fixed cost is half of it."""
    write_task(tmp_path)
    cost = CostModel(0.0, 1e-6, 0.015, 1e-6)       # 15 ms a unit, whatever its size, against a 5 ms share
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=20.0, cost_model=cost)
    job = build_job(engine, spec("fixed"))
    span = job.unit_span(8192)
    assert cost.unit_s(Unit(EAGER, 16)) > UNIT_SHARE * 0.020, "no span fits the share: shrinking alone would go to the minimum"
    assert span == 4096, span


def test_a_capture_is_priced_as_its_eager_unit_until_one_is_measured_plus_a_warm_up_still_due():
    graphs = UnitGraphs(set(), 1024)
    assert graphs.capture_cost((0, 64, 128), prior=0.01) == 0.01
    graphs.captures, graphs.capture_s, graphs.warmup_s = 1, 0.004, 0.2
    assert graphs.capture_cost((0, 64, 128), prior=0.01) == pytest.approx(0.204), "its shape was never warmed"
    graphs.warmed.add((64, 128))
    assert graphs.capture_cost((3, 64, 128), prior=0.01) == pytest.approx(0.004), "any layer shares the warm-up"


def test_a_jobs_unit_span_is_chosen_once_per_length_so_its_unit_shapes_recur(llama_dir, tmp_path):
    """Spans follow the cost model when a length is first seen; a model that learns afterwards does not move
    them (new spans would be new shapes: warm-ups and graph captures all over again)."""
    write_task(tmp_path)
    cost = CostModel(0.0, 1e-6, 0.001, 1e-6, learn=True)
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=20.0, cost_model=cost)
    job = build_job(engine, spec("once"))
    span = job.unit_span(8192)
    cost.margin = 2.0                           # what it learned since: units now priced twice as high
    assert job._choose_span(8192) < span, "a fresh choice would differ"
    assert job.unit_span(8192) == span



class _UncapturedBackward:
    """A sequence's backward whose next units can have CUDA graphs but have none yet (graphs need a GPU, so this
    stands in for `SequenceBackward` over `UnitGraphs`): each capture takes `capture_s` of host time."""

    def __init__(self, units: int, capture_s: float):
        self.left, self.capture_s = units, capture_s

    def next_graphed(self) -> bool:
        return False

    def next_unit(self, eager: bool = False) -> Unit:
        return Unit(EAGER if eager else "graph", 64)

    def next_capture_cost(self, prior: float) -> float:
        return self.capture_s

    def next_unit_tokens(self) -> int:
        return 64

    def next_unit_start(self) -> int:
        return 0


class _Job:
    def __init__(self, backward: _UncapturedBackward):
        self.backward, self.waits, self.active, self.state = backward, 0, True, JobState.RUNNING

    def unit_ends_step(self) -> bool:
        return False

    def run_backward_unit(self, capture: bool = False) -> None:
        self.backward.left -= 1
        if not self.backward.left:
            self.backward = None


def test_a_unit_due_for_capture_waits_for_room_then_is_captured_never_run_eagerly():
    """A capture that does not fit the iteration waits (CAPTURE_PATIENCE iterations at most) and then runs first in
    one; the unit never falls back to running eagerly (slower, and no graph would ever be made)."""
    from coserve.engine.finetune.manager import CAPTURE_PATIENCE, FinetuneManager

    manager = FinetuneManager(None, max_active=1, kv_reserve=0.0)   # the units need no engine: only the policy runs
    job = _Job(_UncapturedBackward(units=3, capture_s=0.02))
    manager.jobs = {"j": job}
    cost = CostModel(fwd_fixed_s=0.0, fwd_per_token_s=0.0, unit_fixed_s=0.001, unit_per_token_s=0.0)
    ran = [manager.run_backward(0.01, cost, must_progress=False) for _ in range(CAPTURE_PATIENCE + 1)]
    assert [w.units for w in ran] == [0] * CAPTURE_PATIENCE + [1], "waits for room, then overshoots once"
    last = manager.run_backward(0.05, cost, must_progress=False)
    assert last.units == 2 and last.captures == 2, "both fit: captured now"
    assert job.backward is None and all(w.captures == w.units and w.eager == 0 for w in ran + [last])


def test_each_timed_forward_says_whether_it_ran_the_lora_kernels(llama_dir, tmp_path):
    """The cost model prices adapter rows' LoRA kernels apart: a forward carrying a finetuning chunk is timed as
    one with adapters, a base-only inference forward as one without."""
    write_task(tmp_path)
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=1e6,
                         cost_model=CostModel(0.0, 1e-6, 0.0, 1e-6))
    timed = []
    engine.cost.observe_piece = lambda piece, seconds: timed.append(piece)
    engine.add_request("base", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while engine.requests:
        engine.step()
    engine.finetune.add(build_job(engine, spec("lora-timed")))
    engine.step()
    forwards = [p for p in timed if isinstance(p, Forward)]
    assert forwards and not any(f.lora for f in forwards[:-1]), "base-only inference forwards"
    assert forwards[-1].lora and engine.last_step.finetune_tokens > 0, "a forward with a finetuning chunk"


def test_a_steps_dataset_rows_are_drawn_once_per_step_not_every_iteration(llama_dir, tmp_path, monkeypatch):
    """A shuffled epoch's order is a permutation of the whole dataset: the scheduler asks for the step's rows in
    every iteration (and every unit), so the job draws them once a step."""
    from coserve.engine.finetune import job as job_mod

    write_task(tmp_path)
    draws = []
    real = job_mod.epoch_order
    monkeypatch.setattr(job_mod, "epoch_order", lambda *a: draws.append(a) or real(*a))
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=2.0,
                         cost_model=CostModel(0.001, 1e-4, 0.0005, 1e-6))
    job = build_job(engine, spec("rows", shuffle=True, max_steps=3))
    engine.finetune.add(job)
    iterations = 0
    while job.active:
        engine.step()
        iterations += 1
    assert job.state is JobState.SUCCEEDED, job.error
    assert iterations > 3 * job.total_steps and len(draws) == job.total_steps, (iterations, len(draws))
