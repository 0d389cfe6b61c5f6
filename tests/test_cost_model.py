"""The online cost model learns each kind of work from its own timings: the forward's line from a wrong prior, each
unit shape from its recent timings, the optimizer step; a margin from whole iterations covers what the pieces
miss; it stays fixed when given as fixed, and reports its error in /metrics through the engine loop."""
from __future__ import annotations

import json
import random
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coserve_testlib import make_engine
from coserve.engine.async_engine import AsyncEngine
from coserve.engine.cost_model import (EAGER, GRAPH, HEAD, REFIT_EVERY, SHAPE_SAMPLES, START_MARGIN, STEP, CostModel,
                                       DeviceClock, Forward, Unit, Work, context)
from coserve.engine.finetune.manager import build_job
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.sampling import SamplingParams

# forward: eager fixed, graph-replayed fixed, per token, per attention pair, adapter rows' LoRA kernels
TRUE_FORWARD = (0.004, 0.001, 2e-5, 2e-9, 0.003)


def forward_seconds(f: Forward) -> float:
    return float(sum(a * b for a, b in zip(f.features(), TRUE_FORWARD)))


def random_forward(rng: random.Random) -> Forward:
    graphed = rng.random() < 0.5
    tokens = rng.randint(1, 64) if graphed else rng.randint(1, 2048)
    return Forward(tokens, context(rng.randint(0, 8192), tokens), graphed, rng.random() < 0.3)


def test_the_forward_line_is_learned_from_timed_forwards_alone():
    cost = CostModel(0.04, 2e-4, 0.015, 3e-5, learn=True, margin=1.0)   # ten times too slow; pairs free
    rng = random.Random(0)
    for _ in range(20 * REFIT_EVERY):
        f = random_forward(rng)
        cost.observe_piece(f, forward_seconds(f))
        cost.observe_piece(Unit(GRAPH, 256, 1024), 0.002)   # other kinds of work teach the forward nothing
    assert cost.forward_s(512) == pytest.approx(TRUE_FORWARD[0] + 512 * TRUE_FORWARD[2], rel=0.05)
    assert cost.forward_s(64, graphed=True) == pytest.approx(TRUE_FORWARD[1] + 64 * TRUE_FORWARD[2], rel=0.05)
    assert cost.forward_s(64, graphed=True, lora=True) == pytest.approx(
        TRUE_FORWARD[1] + TRUE_FORWARD[4] + 64 * TRUE_FORWARD[2], rel=0.05), "the LoRA kernels' cost is learned"
    n = cost.forward_tokens_within(0.02, fixed_paid=False, graphed=True, lora=True)
    assert forward_seconds(Forward(n, context(0, n), True, True)) <= 0.02 * 1.01
    assert forward_seconds(Forward(n + 8, context(0, n + 8), True, True)) > 0.02
    late = forward_seconds(Forward(512, context(7680, 512)))
    assert cost.forward_s(512, pairs=context(7680, 512)) == pytest.approx(late, rel=0.05)
    tokens = cost.forward_tokens_within(0.05, fixed_paid=False, start=6000)
    assert forward_seconds(Forward(tokens, context(6000, tokens))) <= 0.05 * 1.01
    assert forward_seconds(Forward(tokens + 8, context(6000, tokens + 8))) > 0.05


def test_a_graphed_chunk_is_priced_at_its_graphs_padded_rows_and_fills_its_bucket():
    """A graph computes its padded token bucket: a chunk is sized so the bucket (not its tokens) fits the time,
    and it takes the whole bucket rather than leave padding; eager forwards pay no padding."""
    per_token = 1e-5
    cost = CostModel(0.0, per_token, 0.0, 0.0, graph_fwd_fixed_s=0.0)
    cost.pad = lambda n: -(-n // 256) * 256
    n = cost.forward_tokens_within(700 * per_token, fixed_paid=False, graphed=True, tokens=64)
    assert n == 512 - 64          # 64 + n rows pad to 512; 513 would run the 768 graph, past 700 rows' time
    assert cost.forward_tokens_within(700 * per_token, fixed_paid=False, graphed=False, tokens=64) == 700 - 64
    assert cost.forward_tokens_within(200 * per_token, fixed_paid=False, graphed=True, tokens=64) == 0


def test_each_unit_shape_is_priced_by_its_own_recent_timings():
    cost = CostModel(0.0, 1e-5, 0.004, 2e-5, eager_unit_s=0.003, learn=True, margin=1.0)
    rng = random.Random(1)
    seen, head = Unit(GRAPH, 256, 1024), Unit(HEAD, 256)
    for _ in range(3 * SHAPE_SAMPLES):
        cost.observe_piece(seen, 0.002 * rng.uniform(0.95, 1.05))
        cost.observe_piece(head, 0.0045 * rng.uniform(0.95, 1.05))
    assert cost.unit_s(seen) == pytest.approx(0.002, rel=0.05)
    assert cost.unit_s(head) == pytest.approx(0.0045, rel=0.05)
    # a graphed shape not timed yet: its prior, scaled by what graphed units measured against theirs
    unseen = Unit(GRAPH, 512, 2048)
    prior_ratio = 0.002 / (0.004 + 256 * 2e-5)
    assert cost.unit_s(unseen) == pytest.approx((0.004 + 512 * 2e-5) * prior_ratio, rel=0.05)
    assert cost.unit_s(Unit(EAGER, 512, 2048)) == pytest.approx(0.004 + 0.003 + 512 * 2e-5), "no eager unit timed"
    for _ in range(SHAPE_SAMPLES):   # the shape got slower (e.g. beside more inference): recent timings decide
        cost.observe_piece(seen, 0.003)
    assert cost.unit_s(seen) == pytest.approx(0.003)


def test_the_optimizer_step_keeps_its_prior_until_timed():
    cost = CostModel(0.0, 1e-5, 0.0, 1e-5, step_s=0.02, learn=True, margin=1.0)
    assert cost.optimizer_step_s() == 0.02
    for seconds in (0.0004, 0.0005, 0.05, 0.0006, 0.0005):   # one outlier does not set the price
        cost.observe_piece(STEP, seconds)
    assert cost.optimizer_step_s() == pytest.approx(0.0005)


def random_work(rng: random.Random) -> Work:
    units = tuple(Unit(rng.choice([GRAPH, HEAD]), 256, rng.choice([0, 256, 512])) for _ in range(rng.randint(0, 6)))
    return Work(random_forward(rng), units, int(bool(units) and rng.random() < 0.2), finetune=True, inference=True)


def test_the_margin_covers_what_the_pieces_miss_so_plans_stay_within_the_target():
    cost = CostModel(*TRUE_FORWARD[:1], TRUE_FORWARD[2], 0.002, 0.0, 0.001, TRUE_FORWARD[1],
                     fwd_per_pair_s=TRUE_FORWARD[3], learn=True)
    rng = random.Random(2)
    for _ in range(16 * REFIT_EVERY):
        w = random_work(rng)
        cost.observe(w, cost.predict(w) * rng.uniform(1.05, 1.2))   # host gaps between the pieces
    assert 1.15 < cost.margin <= 1.2
    assert cost.error == pytest.approx(0.125, abs=0.03)
    overrun = []
    for _ in range(2000):
        budget = rng.uniform(0.01, 0.05)
        tokens = cost.forward_tokens_within(budget, fixed_paid=False)
        assert tokens > 0
        overrun.append(forward_seconds(Forward(tokens)) * rng.uniform(1.05, 1.2) / budget)
    overrun.sort()
    assert overrun[int(0.99 * len(overrun))] <= 1.01, "p99 of iteration time within the target"


def test_the_margin_is_set_by_iterations_that_carried_finetuning_beside_inference_only():
    """Not by inference tails, and not by finetuning alone, which runs past the target on purpose: a job that
    trained alone before inference arrived leaves no margin behind that would starve it once inference is back."""
    cost = CostModel(0.004, 2e-5, 0.002, 1e-5, learn=True)
    rng = random.Random(3)
    for _ in range(2 * REFIT_EVERY):   # the job alone first
        w = random_work(rng)
        cost.observe(Work(w.forward, w.units, w.optimizer_steps, finetune=True), cost.predict(w) * 1.8)
    assert cost.margin == START_MARGIN
    for i in range(16 * REFIT_EVERY):
        w = random_work(rng)
        cost.observe(w, cost.predict(w) * 1.1)
        inference = Work(random_forward(rng), inference=True)
        cost.observe(inference, cost.predict(inference) * (3.0 if i % 20 == 0 else 1.0))   # a host pause, 5%
    assert cost.margin == pytest.approx(1.1)


def test_iterations_that_wrote_a_checkpoint_are_not_learned():
    cost = CostModel(0.004, 2e-5, 0.002, 1e-5, learn=True)
    for _ in range(4 * REFIT_EVERY):
        cost.observe(Work(Forward(100), (Unit(GRAPH, 100),), 1, saved=True, finetune=True, inference=True), 5.0)
    assert cost.margin == START_MARGIN and cost.error is None


def test_a_given_model_stays_fixed():
    cost = CostModel(0.004, 2e-5, 0.002, 1e-5)
    before = cost.to_dict()
    for _ in range(4 * REFIT_EVERY):
        cost.observe_piece(Forward(100), 1.0)
        cost.observe_piece(Unit(GRAPH, 100), 1.0)
        cost.observe_piece(STEP, 1.0)
        cost.observe(Work(Forward(100), (Unit(GRAPH, 100),), finetune=True, inference=True), 3.0)
    assert cost.to_dict() == before and cost.margin == 1.0 and cost.error is None


def test_the_clock_hands_back_each_timed_piece_and_drops_those_of_a_capturing_iteration():
    clock = DeviceClock("cpu")
    clock.start()
    with clock.timing(Forward(8)):
        time.sleep(0.01)
    with clock.timing(None):
        time.sleep(0.01)
    with clock.timing(STEP):
        pass
    done = clock.stop(Work(Forward(8)))
    assert [type(w).__name__ if not isinstance(w, str) else w for w, _ in done] == ["Forward", STEP, "Work"]
    assert done[0][1] >= 0.01 and done[2][1] >= 0.02
    clock.start()
    with clock.timing(Unit(GRAPH, 16)):
        pass
    clock.discard()
    assert [w for w, _ in clock.stop(Work(saved=True))] == [Work(saved=True)]


def test_the_engine_learns_its_own_iteration_times_and_exports_the_error(llama_dir, tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 8})
                                         + "\n")
    prior = CostModel(1.0, 1e-2, 1.0, 1e-2, learn=True)    # seconds per iteration: far too slow for this CPU
    engine = make_engine(llama_dir, data_root=str(tmp_path), tpot_slo_ms=1e5, cost_model=prior)
    spec = JobSpec.model_validate({"id": "learn", "dataset": {"path": "data.jsonl", "format": "text"},
                                   "output": "out", "training": {"epochs": 40, "chunk_tokens": 16}})
    engine.finetune.add(build_job(engine, spec))
    for i in range(6):
        engine.add_request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True))   # beside the job
    async_engine = AsyncEngine(engine)   # the server's engine loop, which exports the metrics
    async_engine.start()
    try:
        deadline = time.time() + 60
        while engine.cost.error is None or len(engine.cost._iterations) < 3 * REFIT_EVERY:
            assert time.time() < deadline, "the engine did not refit its cost model"
            time.sleep(0.05)
        text = async_engine.metrics.render().decode()
    finally:
        async_engine.shutdown()
    assert engine.cost.fwd_fixed_s < 0.1 and engine.cost.fwd_per_token_s < 1e-3
    shapes = engine.cost.to_dict()["unit_shapes_s"]
    assert any(k.startswith(HEAD) for k in shapes) and any(k.startswith(EAGER) for k in shapes)
    assert all(0 < s < 1.0 for s in shapes.values()), "units priced by their own timings, not the slow prior"
    assert 0 < engine.cost.optimizer_step_s() < 1.0, "the optimizer step priced by its own timings"
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert 0 <= samples["coserve_cost_model_relative_error"] < 10
    assert samples["coserve_cost_model_margin"] >= 1.0
    held = {s.labels["holds"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "coserve_iteration_seconds_count"}
    assert held.get("both", 0) > 0, "co-served iterations are timed by what they held"
    assert samples["coserve_finetune_aside_iterations_total"] == 0, "six requests never queue for 256 slots"
    assert samples["coserve_finetune_unit_captures_total"] == 0, "a CPU has no CUDA graphs: units run eagerly"
