"""The scheduler's steady-decode path: every running request decodes, nobody waits. It plans what the general
path plans (arrival order, a block only when a request crosses into one, full blocks offered to the cache) and
hands over to the general path when blocks or the token budget run short."""
from __future__ import annotations

from coserve.engine.kv_cache import BlockManager
from coserve.engine.sampling import SamplingParams
from coserve.engine.scheduler import Scheduler
from coserve.engine.sequence import Sequence


def seq(rid: str, prompt: list[int]) -> Sequence:
    return Sequence(rid, prompt, SamplingParams(max_tokens=100))


def run(chunks, token: int = 7) -> None:
    """What the engine does after an iteration: the KV is written and each sampling chunk's token appended."""
    for c in chunks:
        c.seq.num_computed += c.length
        if c.samples:
            c.seq.output_ids.append(token)


def test_steady_decode_grows_blocks_at_crossings_and_caches_full_blocks():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_batched_tokens=64)
    seqs = [seq(f"s{i}", list(range(10 * i + 1, 10 * i + 4 + i))) for i in range(3)]   # 3, 4 and 5 tokens
    for s in seqs:
        sched.add(s)
    run(sched.schedule())
    for step in range(9):
        free, tables = bm.num_free, {s.request_id: list(bm.tables[s.request_id]) for s in seqs}
        chunks = sched.schedule()
        assert [(c.seq, c.start, c.length) for c in chunks] == [(s, s.num_computed, 1) for s in seqs]
        for s in seqs:   # a new block exactly when the token to compute starts one
            new = bm.tables[s.request_id][len(tables[s.request_id]):]
            assert len(new) == (1 if s.num_computed % 4 == 0 else 0), (step, s.request_id)
            assert bm.tables[s.request_id][:len(tables[s.request_id])] == tables[s.request_id]
        assert bm.num_free == free - sum(s.num_computed % 4 == 0 for s in seqs)
        run(chunks)
    # every block whose KV is written is in the cache by the time another request with that prefix arrives
    for s in seqs:
        full = s.num_computed // 4
        hit = bm.lookup("probe-" + s.request_id, s.token_ids + [0], None)
        assert hit.num_tokens >= 4 * (full - 1) and hit.blocks == tuple(bm.tables[s.request_id][:len(hit.blocks)])


def test_short_blocks_hand_over_to_preemption_and_the_readmitted_request_decodes_in_order():
    bm = BlockManager(6, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_batched_tokens=64)
    a, b, c = seq("a", [1, 2, 3]), seq("b", [4, 5, 6]), seq("c", [7, 8, 9])
    for s in (a, b, c):
        sched.add(s)
    run(sched.schedule())                      # 3 blocks taken, 3 free
    for _ in range(4):                         # each crosses into its second block: 3 more, none left
        run(sched.schedule())
    assert bm.num_free == 0 and all(s.num_computed == 7 for s in (a, b, c))
    run(sched.schedule())                      # position 7: still in the second block
    chunks = sched.schedule()                  # position 8 needs a third block each: the latest is preempted
    assert [ch.seq for ch in chunks] == [a, b] and c.num_preemptions == 1 and not a.num_preemptions
    run(chunks)
    sched.finish(a, "stop")
    readmitted = sched.schedule()              # c recomputes (a and b took its cached blocks) after b's decode
    assert [(ch.seq, ch.start, ch.length) for ch in readmitted] == [(b, 9, 1), (c, 0, 9)]
    run(readmitted)
    assert [ch.seq for ch in sched.schedule()] == [b, c], "decoding again, by arrival"


def test_the_token_budget_hands_over_to_the_general_path():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_batched_tokens=2)
    seqs = [seq(f"s{i}", [i + 1]) for i in range(3)]
    for s in seqs:
        sched.add(s)
    run(sched.schedule())                      # s0 and s1 admitted, s2 waits
    chunks = sched.schedule()                  # s2 still cannot join: the budget is spent on the decodes
    assert [ch.seq for ch in chunks] == seqs[:2] and list(sched.waiting) == [seqs[2]]
    sched.finish(seqs[0], "stop")
    run(chunks[1:])
    assert [(ch.seq, ch.length) for ch in sched.schedule()] == [(seqs[1], 1), (seqs[2], 1)]
    sched.max_batched_tokens = 1               # more decodes than tokens allowed: the oldest goes first
    assert [ch.seq for ch in sched.schedule()] == [seqs[1]]
