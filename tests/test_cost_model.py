"""The online cost model learns iteration time from measured iterations: it recovers the true costs from a wrong
prior, keeps a margin that covers noisy measurements, stays fixed when given as fixed, and reports its error in
/metrics through the engine loop."""
from __future__ import annotations

import json
import random
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coserve_testlib import make_engine
from coserve.engine.async_engine import AsyncEngine
from coserve.engine.cost_model import REFIT_EVERY, CostModel, Work, context
from coserve.engine.finetune.manager import build_job
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.sampling import SamplingParams

# eager forward, per forward token, replayed unit, per unit token, optimizer step, replayed graph forward, eager unit,
# per attention pair of a forward, per attention pair of a unit
TRUE = (0.004, 2e-5, 0.0015, 3e-6, 0.002, 0.001, 0.005, 2e-9, 1e-9)


def true_seconds(w: Work) -> float:
    forward = w.forward_tokens > 0
    return (TRUE[0] * (forward and not w.graphed_forward) + TRUE[1] * w.forward_tokens + TRUE[2] * w.units
            + TRUE[3] * w.unit_tokens + TRUE[4] * w.optimizer_steps + TRUE[5] * (forward and w.graphed_forward)
            + TRUE[6] * w.eager_units + TRUE[7] * w.forward_context + TRUE[8] * w.unit_context)


def random_work(rng: random.Random) -> Work:
    units = rng.randint(0, 6)
    graphed = rng.random() < 0.3
    tokens = rng.randint(1, 64) if graphed else rng.choice([0, rng.randint(1, 2048)])
    unit_tokens = units * rng.randint(16, 1024)
    return Work(tokens, units, unit_tokens, int(units > 0 and rng.random() < 0.2), graphed_forward=graphed,
                eager_units=rng.randint(0, units), forward_context=context(rng.randint(0, 8192), tokens),
                unit_context=context(rng.randint(0, 8192), unit_tokens))


def test_a_wrong_prior_is_corrected_by_measured_iterations():
    cost = CostModel(0.04, 2e-4, 0.015, 3e-5, 0.0, 0.01, 0.0, 0.0, 0.0, learn=True)   # too slow; steps, pairs free
    rng = random.Random(0)
    for _ in range(20 * REFIT_EVERY):
        w = random_work(rng)
        cost.observe(w, true_seconds(w))
    assert cost.params() == pytest.approx(TRUE, rel=0.05)
    assert 1.0 <= cost.margin < 1.05
    assert cost.error < 0.05
    w = Work(512, 3, 1536)
    assert cost.forward_s(512) == pytest.approx(TRUE[0] + 512 * TRUE[1], rel=0.06)
    assert cost.forward_s(64, graphed=True) == pytest.approx(TRUE[5] + 64 * TRUE[1], rel=0.06)
    assert cost.unit_s(256, eager=True) == pytest.approx(TRUE[2] + TRUE[6] + 256 * TRUE[3], rel=0.06)
    late = TRUE[2] + 512 * TRUE[3] + context(7680, 512) * TRUE[8]
    assert cost.unit_s(512, start=7680) == pytest.approx(late, rel=0.06), "a unit late in a long sequence costs more"
    tokens = cost.forward_tokens_within(0.05, fixed_paid=False, start=6000)
    assert true_seconds(Work(tokens, forward_context=context(6000, tokens))) <= 0.05 * 1.001
    assert true_seconds(Work(tokens + 2, forward_context=context(6000, tokens + 2))) > 0.05
    assert cost.predict(w) == pytest.approx(true_seconds(w), rel=0.05)


def test_the_margin_covers_the_noise_so_plans_stay_within_the_target():
    cost = CostModel(*TRUE, learn=True)
    rng = random.Random(1)
    for _ in range(16 * REFIT_EVERY):
        w = random_work(rng)
        cost.observe(w, true_seconds(w) * rng.uniform(0.9, 1.2))
    assert 1.1 < cost.margin <= 1.25
    overrun = []
    for _ in range(2000):
        budget = rng.uniform(0.01, 0.05)
        tokens = cost.forward_tokens_within(budget, fixed_paid=False)
        assert tokens > 0
        overrun.append(true_seconds(Work(tokens)) * rng.uniform(0.9, 1.2) / budget)
    overrun.sort()
    assert overrun[int(0.99 * len(overrun))] <= 1.05, "p99 of iteration time within 1.05x of the target"


def test_coefficients_never_go_negative_and_unexercised_ones_keep_the_prior():
    cost = CostModel(0.001, 1e-5, 0.001, 1e-5, 0.003, learn=True)
    rng = random.Random(2)
    for _ in range(4 * REFIT_EVERY):
        w = random_work(rng)
        w = Work(w.forward_tokens, w.units, w.unit_tokens, graphed_forward=False)
        cost.observe(w, 1e-5 * w.forward_tokens + 1e-3)   # units cost nothing; no optimizer step ran
    assert all(p >= 0 for p in cost.params())
    assert cost.step_s == 0.003


def test_iterations_that_wrote_a_checkpoint_are_not_learned():
    cost = CostModel(*TRUE, learn=True)
    for _ in range(4 * REFIT_EVERY):
        cost.observe(Work(100, 1, 100, 1, saved=True), 5.0)
    assert cost.params() == TRUE and cost.error is None


def test_a_given_model_stays_fixed():
    cost = CostModel(*TRUE)
    for _ in range(4 * REFIT_EVERY):
        cost.observe(Work(100, 1, 100), 1.0)
    assert cost.params() == TRUE and cost.margin == 1.0 and cost.error is None


def test_the_engine_learns_its_own_iteration_times_and_exports_the_error(llama_dir, tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 8})
                                         + "\n")
    prior = CostModel(1.0, 1e-2, 1.0, 1e-2, learn=True)    # seconds per iteration: far too slow for this CPU
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=1e5, cost_model=prior)
    spec = JobSpec.model_validate({"id": "learn", "dataset": {"path": "data.jsonl", "format": "text"},
                                   "output": "out", "training": {"epochs": 40, "chunk_tokens": 16}})
    engine.finetune.add(build_job(engine, spec))
    for i in range(6):
        engine.add_request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=20))
    async_engine = AsyncEngine(engine)   # the server's engine loop, which exports the metrics
    async_engine.start()
    try:
        deadline = time.time() + 60
        while engine.cost.error is None or len(engine.cost._seen) < 3 * REFIT_EVERY:
            assert time.time() < deadline, "the engine did not refit its cost model"
            time.sleep(0.05)
        text = async_engine.metrics.render().decode()
    finally:
        async_engine.shutdown()
    assert engine.cost.fwd_fixed_s < 0.1 and engine.cost.fwd_per_token_s < 1e-3
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert 0 <= samples["coserve_cost_model_relative_error"] < 10
    assert samples["coserve_cost_model_margin"] >= 1.0
