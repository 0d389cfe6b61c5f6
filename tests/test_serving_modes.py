"""The serving modes (`coserve serve --mode`) do what they say on the engine and through the API: temporal sharing
runs whole finetuning steps, with no inference beside them, every N inference iterations; finetune-only refuses
inference; inference-only refuses jobs and never trains one added behind the API's back; co-serving mixes both."""
from __future__ import annotations

import itertools

import pytest

from api_app import AUTH, api_client, assert_openai_error
from coserve.engine.cli import build_parser
from coserve.engine.cost_model import CostModel
from coserve.engine.engine import RequestError
from coserve.engine.finetune.manager import build_job
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.sampling import SamplingParams
from coserve.engine.serving_mode import ServingPolicy
from coserve_testlib import make_engine, write_task

# Budgets as on a GPU: a 4-token chunk costs 5 ms of a 50 ms iteration, a backward unit about 9 ms, so a step
# spreads over several iterations.
COST = CostModel(fwd_fixed_s=0.001, fwd_per_token_s=0.001, unit_fixed_s=0.005, unit_per_token_s=0.001)
JOB = {"id": "job", "dataset": {"path": "task.jsonl", "format": "prompt_completion"}, "output": "job",
       "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
       "training": {"lr": 0.01, "epochs": 50, "chunk_tokens": 4, "sequences_per_step": 2}}


def engine_with_job(llama_dir, tmp_path, **config):
    write_task(tmp_path)
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=50.0, cost_model=COST, **config)
    engine.finetune.add(build_job(engine, JobSpec.model_validate(JOB)))
    return engine, engine.finetune.jobs["job"]


def keep_requests_in_flight(engine, counter, n: int = 2) -> None:
    while len(engine.requests) < n:
        i = next(counter)
        engine.add_request(f"r{i}", [5 + i % 7, 9, 11, 13], SamplingParams(max_tokens=6, ignore_eos=True))


def test_temporal_runs_whole_steps_every_n_inference_iterations(llama_dir, tmp_path):
    interval = 4
    engine, job = engine_with_job(llama_dir, tmp_path, mode="temporal", temporal_interval=interval)
    engine.step()            # nothing waits for inference: the first step starts at once
    assert engine.last_step.finetune_tokens > 0 and job.step == 0
    while job.step == 0:     # and no request may join it until it is done
        engine.step()
        assert engine.last_step.finetune_tokens or engine.last_step.backward_units
    counter = itertools.count()
    trace = []               # (inference ran, finetuning ran, job.step before, job.step after) per iteration
    while job.step < 4:
        keep_requests_in_flight(engine, counter)
        before = job.step
        engine.step()
        s = engine.last_step
        trace.append((s.prefill_tokens + s.decode_tokens > 0, s.finetune_tokens + s.backward_units > 0, before,
                      job.step))
    assert not any(inf and ft for inf, ft, _, _ in trace), "inference and finetuning shared an iteration"
    runs = [(kind, list(group)) for kind, group in itertools.groupby(trace, key=lambda t: t[1])]
    ft_runs = [group for is_ft, group in runs if is_ft]
    inference_runs = [group for is_ft, group in runs if not is_ft]
    assert len(ft_runs) == 3 and len(inference_runs) == 3
    assert all(len(group) == interval for group in inference_runs)
    for group in ft_runs:    # each finetuning run is exactly one whole optimizer step
        assert group[-1][3] == group[0][2] + 1
        assert all(after == before for _, _, before, after in group[:-1])
        assert len(group) > 1


def test_temporal_step_ends_when_it_cannot_move():
    """A step that can do no finetuning work (its job ended, or it waits for blocks) gives the GPU back."""
    policy = ServingPolicy("temporal", temporal_interval=2)

    class Manager:
        jobs: dict = {}

        def has_work(self) -> bool:
            return True

    turn = policy.turn(inference_ready=False, finetune=Manager())
    assert not turn.inference and turn.finetune
    policy.done(turn, Manager(), finetune_worked=False)
    assert policy.turn(inference_ready=True, finetune=Manager()).inference


def test_finetune_only_refuses_inference_and_trains(llama_dir, tmp_path):
    engine, job = engine_with_job(llama_dir, tmp_path, mode="finetune-only")
    with pytest.raises(RequestError) as err:
        engine.add_request("r0", [5, 9, 11], SamplingParams(max_tokens=4))
    assert err.value.code == 503 and err.value.param == "model" and not engine.requests
    while job.step < 1:
        engine.step()
    assert job.tokens > 0


def test_inference_only_never_trains(llama_dir, tmp_path):
    engine, job = engine_with_job(llama_dir, tmp_path, mode="inference-only")
    counter = itertools.count()
    for _ in range(30):
        keep_requests_in_flight(engine, counter)
        engine.step()
        assert engine.last_step.finetune_tokens == 0 and engine.last_step.backward_units == 0
    while engine.requests:
        engine.step()
    assert next(counter) > 4 and job.tokens == 0 and job.step == 0
    assert not engine.has_work()     # a job it will never train keeps the engine loop idle


def test_coserve_mixes_inference_and_finetuning_in_one_iteration(llama_dir, tmp_path):
    engine, job = engine_with_job(llama_dir, tmp_path)
    counter = itertools.count()
    mixed = 0
    for _ in range(20):
        keep_requests_in_flight(engine, counter)
        engine.step()
        s = engine.last_step
        mixed += s.decode_tokens > 0 and s.finetune_tokens + s.backward_units > 0
    assert mixed > 0


def test_api_refusals_are_503_in_openai_shape(llama_dir, tmp_path):
    write_task(tmp_path)
    with api_client(llama_dir, tmp_path, mode="finetune-only") as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
        assert "finetuning only" in assert_openai_error(r, 503, "model")["message"]
        assert client.get("/admin/capacity", headers=AUTH).json()["mode"] == "finetune-only"
        assert client.post("/admin/finetune/jobs", json=JOB, headers=AUTH).status_code == 201
    (tmp_path / "other").mkdir()
    with api_client(llama_dir, tmp_path / "other", mode="inference-only") as client:
        r = client.post("/admin/finetune/jobs", json=JOB, headers=AUTH)
        err = assert_openai_error(r, 503)
        assert err["type"] == "service_unavailable_error" and "inference only" in err["message"]
        capacity = client.get("/admin/capacity", headers=AUTH).json()
        assert capacity["finetune_slots_free"] == capacity["finetune_slots_total"] == 0
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("flag", ["--tpot-slo-ms", "--idle-iteration-ms"])
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_iteration_budgets_must_be_positive_milliseconds(flag, value, capsys):
    """A zero, negative or non-finite budget would plan nothing (or everything); the command line refuses it."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", flag, value])
    assert "expected a positive number of milliseconds" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--model", "m", flag, "75"])
    assert (args.tpot_slo_ms, args.idle_iteration_ms) == ((75.0, 200.0) if flag == "--tpot-slo-ms" else (50.0, 75.0))
