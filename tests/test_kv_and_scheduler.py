"""Block manager bookkeeping and scheduler invariants: token budget, decode first, preemption that
recomputes rather than corrupts, every block returned."""
from __future__ import annotations

import random

import pytest

from coserve_testlib import make_engine
from coserve.engine.kv_cache import BlockManager
from coserve.engine.sampling import SamplingParams
from coserve.engine.scheduler import Scheduler
from coserve.engine.sequence import Sequence, Status


def test_block_manager_allocates_grows_and_releases():
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.allocate("a", 5) == bm.tables["a"] and len(bm.tables["a"]) == 2
    assert bm.blocks_needed("a", 8) == 0 and bm.blocks_needed("a", 9) == 1
    bm.allocate("a", 9)
    bm.allocate("b", 12)
    assert bm.num_free == 0 and not bm.can_allocate("c", 1)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate("c", 1)
    assert len(set(bm.tables["a"]) | set(bm.tables["b"])) == 6, "no block handed out twice"
    assert bm.slot("a", 5) == bm.tables["a"][1] * 4 + 1
    bm.release("a")
    bm.release("b")
    assert bm.num_free == 6 and bm.usage() == 0.0


def seq(rid: str, n_prompt: int, max_tokens: int = 4) -> Sequence:
    return Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens))


def test_schedule_respects_budget_and_puts_decodes_first():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_batched_tokens=10)
    a, b, c = seq("a", 3), seq("b", 25), seq("c", 4)
    for s in (a, b, c):
        sched.add(s)
    chunks = sched.schedule()
    assert [(ch.seq.request_id, ch.start, ch.length) for ch in chunks] == [("a", 0, 3), ("b", 0, 7)]
    for ch in chunks:
        ch.seq.num_computed += ch.length
    a.output_ids.append(9)   # a sampled: it now decodes
    chunks = sched.schedule()
    assert [(ch.seq.request_id, ch.length) for ch in chunks] == [("a", 1), ("b", 9)]
    assert sum(ch.length for ch in chunks) <= 10
    assert chunks[0].samples and not chunks[1].samples


def test_max_num_seqs_bounds_the_batch():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_batched_tokens=100)
    for i in range(4):
        sched.add(seq(f"s{i}", 3))
    assert len(sched.schedule()) == 2 and len(sched.waiting) == 2


def test_preemption_recomputes_and_outputs_match_an_unconstrained_run(llama_dir):
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 500) for _ in range(rng.randrange(3, 20))] for _ in range(10)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    roomy = make_engine(llama_dir, num_kv_blocks=256)
    expected = [s.output_ids for s in roomy.generate(prompts, params)]
    tight = make_engine(llama_dir, num_kv_blocks=24, block_size=4, max_batched_tokens=16)
    seqs = [s for s in tight.generate(prompts, params)]
    assert sum(s.num_preemptions for s in seqs) > 0, "the cache was meant to run out"
    assert [s.output_ids for s in seqs] == expected
    assert all(s.status is Status.FINISHED and s.finish_reason == "length" for s in seqs)
    assert tight.blocks.num_free == tight.blocks.num_blocks


def test_abort_frees_blocks_and_other_requests_continue(llama_dir):
    engine = make_engine(llama_dir)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request("keep", [5, 6, 7], params)
    engine.add_request("drop", [8, 9, 10, 11, 12], params)
    keep = engine.requests["keep"]
    engine.step()
    engine.abort("drop")
    assert "drop" not in engine.blocks.tables
    while engine.has_work():
        engine.step()
    alone = make_engine(llama_dir).generate([[5, 6, 7]], params)[0]
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert keep.output_ids == alone.output_ids and len(keep.output_ids) == 8
