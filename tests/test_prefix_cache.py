"""Automatic prefix caching: chain hashes with the adapter's salt, reference counts and LRU eviction of free
cached blocks, admission after the longest cached prefix, and the same greedy tokens through the real engine."""
from __future__ import annotations

import pytest

from coserve_testlib import ADAPTERS, make_engine, make_peft_adapter
from coserve.engine.kv_cache import ROOT_HASH, BlockManager, hash_block
from coserve.engine.sampling import SamplingParams
from coserve.engine.scheduler import Chunk, Scheduler
from coserve.engine.sequence import Sequence


def seq(rid: str, ids: list[int], **fields) -> Sequence:
    return Sequence(rid, list(ids), SamplingParams(max_tokens=4), **fields)


def run(chunks: list[Chunk]) -> None:
    """What the engine does after the forward: the chunks' KV is written."""
    for c in chunks:
        c.seq.num_computed += c.length


def cached_manager(bm: BlockManager, rid: str, ids: list[int], salt: str | None = None) -> list[int]:
    """Allocate `ids` for `rid`, as if computed, and register its full blocks."""
    table = list(bm.allocate(rid, len(ids)))
    bm.commit(rid, ids, len(ids), salt)
    return table


def test_block_hash_chains_over_the_prefix_and_the_salt():
    a = hash_block(ROOT_HASH, [1, 2, 3, 4], None)
    assert a == hash_block(ROOT_HASH, [1, 2, 3, 4], None)
    assert a != hash_block(ROOT_HASH, [1, 2, 3, 4], "adapter@1")
    assert hash_block(ROOT_HASH, [1, 2, 3, 4], "x") != hash_block(ROOT_HASH, [1, 2, 3, 4], "y")
    assert hash_block(a, [5, 6, 7, 8], None) != hash_block(hash_block(ROOT_HASH, [9, 2, 3, 4], None),
                                                            [5, 6, 7, 8], None)
    assert hash_block(ROOT_HASH, [], "") != hash_block(ROOT_HASH, [], None)

    bm = BlockManager(32, 4)
    ids = list(range(1, 14))                      # 3 full blocks and one token
    first = cached_manager(bm, "a", ids)
    assert bm.lookup("b", ids, None).blocks == tuple(first[:3])
    assert bm.lookup("c", ids, "adapter@1").blocks == (), "another adapter shares nothing"
    changed = [99] + ids[1:]                      # one earlier token differs: no later block matches either
    assert bm.lookup("d", changed, None).blocks == ()
    diverged = ids[:8] + [77, 78, 79, 80, 81]     # shares exactly the first two blocks
    assert bm.lookup("e", diverged, None).blocks == tuple(first[:2])


def test_refcounts_lru_order_and_never_cached_blocks_go_first():
    bm = BlockManager(6, 4)
    a = cached_manager(bm, "a", list(range(1, 9)))        # 2 cached blocks
    b = cached_manager(bm, "b", list(range(11, 19)))      # 2 cached blocks
    shared = bm.lookup("c", list(range(1, 10)), None)
    bm.allocate("c", 9, shared)
    assert [bm.refs[x] for x in a] == [2, 2] and bm.tables["c"][:2] == a
    bm.release("a")
    assert [bm.refs[x] for x in a] == [1, 1] and bm.num_free == 1, "still held by c"
    bm.release("c")
    bm.release("b")
    assert bm.num_free == 6 and bm.usage() == 0.0
    # LRU: c freed first (tail before head), then b; the never-cached block is handed out before any eviction
    assert list(bm.evictable) == [a[1], a[0], b[1], b[0]]
    fresh = bm.allocate("x", 8)                            # both never-cached blocks (one was c's third)
    assert not set(fresh) & set(a + b) and len(bm.cached) == 4
    assert bm.allocate("y", 4) == [a[1]], "the least recently freed cached block is evicted first"
    assert a[1] not in bm.block_hashes and len(bm.cached) == 3
    assert bm.lookup("z", list(range(1, 10)), None).blocks == (a[0],)
    assert bm.lookup("w", list(range(11, 20)), None).blocks == tuple(b)


def test_allocation_under_pressure_evicts_only_unreferenced_cached_blocks():
    bm = BlockManager(4, 4)
    held = cached_manager(bm, "held", list(range(1, 9)))
    cached_manager(bm, "gone", list(range(21, 29)))
    bm.release("gone")
    assert bm.num_free == 2 and not bm.can_allocate("new", 12)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate("new", 12)
    got = bm.allocate("new", 8)
    assert not set(got) & set(held)
    assert bm.lookup("again", list(range(1, 10)), None).blocks == tuple(held)
    assert bm.lookup("again2", list(range(21, 30)), None).blocks == ()
    # taking an evictable cached prefix uses up free blocks: the check counts it
    bm.release("new")
    bm.release("held")
    hit = bm.lookup("p", list(range(1, 10)), None)
    assert bm.num_free == 4 and bm.can_allocate("p", 16, hit) and not bm.can_allocate("p", 20, hit)


def test_shared_prefix_of_three_blocks_is_not_recomputed():
    bm = BlockManager(64, 16)
    sched = Scheduler(bm, max_num_seqs=8, max_batched_tokens=512)
    prefix = list(range(100, 148))                          # 3 blocks of 16
    a = seq("a", prefix + list(range(1, 13)))
    sched.add(a)
    run(sched.schedule())
    b = seq("b", prefix + list(range(200, 210)))
    sched.add(b)
    chunks = sched.schedule()                              # registers a's blocks, then admits b after them
    assert [(c.seq.request_id, c.start, c.length) for c in chunks] == [("b", 48, 10)]
    assert b.num_computed == 48 and bm.tables["b"][:3] == bm.tables["a"][:3]
    assert bm.tables["b"][3] not in bm.tables["a"]
    assert bm.prefix_hits == 48 and bm.prefix_queries == 60 + 58
    run(chunks)
    assert all(bm.refs[x] == 2 for x in bm.tables["a"][:3])
    sched.finish(a, "stop")
    sched.finish(b, "stop")
    assert bm.num_free == 64


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(64, 16)
    sched = Scheduler(bm, max_num_seqs=8, max_batched_tokens=512)
    prompt = list(range(100, 148))                          # exactly 3 full blocks
    a = seq("a", prompt)
    sched.add(a)
    run(sched.schedule())
    sched.finish(a, "stop")
    b = seq("b", prompt)
    sched.add(b)
    (chunk,) = sched.schedule()
    assert (chunk.start, chunk.length) == (32, 16) and chunk.samples
    assert bm.tables["b"][2] not in bm.block_hashes, "the block holding the last token is recomputed privately"


def test_preempted_request_hits_its_own_cached_blocks_when_readmitted():
    bm = BlockManager(5, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_batched_tokens=512)
    a, b = seq("a", list(range(1, 9))), seq("b", list(range(11, 20)))
    sched.add(a)
    sched.add(b)
    run(sched.schedule())                                  # a: 2 blocks, b: 3 blocks, none free
    b_blocks = list(bm.tables["b"])
    a.output_ids.append(50)                                # a decodes into a third block: b is preempted
    chunks = sched.schedule()
    assert b.num_preemptions == 1 and b.num_computed == 0 and [c.seq for c in chunks] == [a]
    assert list(bm.evictable) == [b_blocks[1], b_blocks[0]], "b's full blocks stay cached"
    run(chunks)
    sched.finish(a, "stop")
    (chunk,) = sched.schedule()
    assert chunk.seq is b and (chunk.start, chunk.length) == (8, 1) and b.num_computed == 8
    assert bm.tables["b"][:2] == b_blocks[:2]


def test_finetuning_sequences_never_register_or_match():
    bm = BlockManager(16, 4)
    ids = list(range(1, 14))
    cached_manager(bm, "ft:job:0:0", ids)
    assert not bm.cached and bm.lookup("inference", ids, None).blocks == ()
    inference = cached_manager(bm, "inference", ids)
    assert bm.lookup("ft:job:0:1", ids, None).blocks == ()
    ft = bm.allocate("ft:job:0:1", len(ids))
    assert not set(ft) & set(inference) and not set(ft) & set(bm.tables["ft:job:0:0"])


def test_adapter_requests_share_only_under_the_same_salt():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_batched_tokens=512)
    ids = list(range(1, 14))
    first = seq("base", ids)
    sched.add(first)
    run(sched.schedule())
    sched.finish(first, "stop")
    unsalted = seq("lora-unsalted", ids, adapter_slot=0)   # an adapter the engine gave no salt: no sharing
    other = seq("lora-a", ids, adapter_slot=0, cache_salt="a@1")
    for s in (unsalted, other):
        sched.add(s)
    chunks = sched.schedule()
    assert [c.start for c in chunks] == [0, 0]
    run(chunks)
    for s in (unsalted, other):
        sched.finish(s, "stop")
    assert len(bm.cached) == 6, "the base request's 3 blocks and a@1's; nothing from the unsalted one"
    same = seq("lora-a-again", ids, adapter_slot=0, cache_salt="a@1")
    newer = seq("lora-a-reloaded", ids, adapter_slot=0, cache_salt="a@2")
    for s in (same, newer):
        sched.add(s)
    assert [c.start for c in sched.schedule()] == [12, 0]


def test_switched_off_nothing_is_cached():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_batched_tokens=512)
    a = seq("a", list(range(1, 14)))
    sched.add(a)
    run(sched.schedule())
    sched.finish(a, "stop")
    b = seq("b", list(range(1, 14)))
    sched.add(b)
    assert [c.start for c in sched.schedule()] == [0]
    assert not bm.cached and bm.prefix_queries == 0


def serve_one_by_one(engine, prompts: list[list[int]], adapters: list[str | None],
                     salts: list[str | None]) -> tuple[list[list[int]], list[int]]:
    """Run each request to completion before the next; returns tokens and prompt tokens computed per request."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tokens, prefilled = [], []
    for i, (ids, adapter, salt) in enumerate(zip(prompts, adapters, salts)):
        engine.add_request(f"r{i}", ids, params, adapter)
        s = engine.requests[f"r{i}"]
        s.cache_salt = salt        # what the engine fills from the adapter's identity
        computed = 0
        while s.finish_reason is None:
            engine.step()
            computed += engine.last_step.prefill_tokens
        tokens.append(s.output_ids)
        prefilled.append(computed)
    return tokens, prefilled


def test_engine_greedy_tokens_equal_with_and_without_caching(llama_dir, tmp_path):
    make_peft_adapter(llama_dir, tmp_path / "qv", 3, **ADAPTERS["qv-r4"])
    shared = [(7 * i) % 400 + 5 for i in range(41)]
    prompts = [shared + [11, 12, 13], shared + [21, 22], shared + [11, 12, 13], shared + [31], shared + [41, 42]]
    adapters = [None, None, "qv", "qv", "qv"]
    salts = [None, None, "qv@1", "qv@1", None]
    results = []
    for caching in (False, True):
        engine = make_engine(llama_dir, data_root=str(tmp_path), block_size=4)
        engine.blocks.enable_prefix_caching = caching
        engine.loras.load("qv", tmp_path / "qv")
        results.append(serve_one_by_one(engine, prompts, adapters, salts))
        assert engine.blocks.num_free == engine.blocks.num_blocks
    (off_tokens, off_prefilled), (on_tokens, on_prefilled) = results
    assert on_tokens == off_tokens
    assert off_prefilled == [len(p) for p in prompts]
    assert on_prefilled == [44, 43 - 40, 44, 42 - 40, 43], \
        "base requests share 10 blocks; the adapter's first request shares nothing with base, its second does"
