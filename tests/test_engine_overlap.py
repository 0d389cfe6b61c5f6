"""Output processing overlapped with the next iteration (`overlap_outputs`), and decode queued one iteration ahead
of reading its tokens (`async_scheduling`), change when outputs come out, never what comes out: every request's
tokens, text deltas, logprobs and finish reason equal the plain engine's, with greedy and seeded sampling, stop
strings that begin inside a token, stop ids, eos, max_tokens, the context limit, aborts mid-stream, finetuning
iterations mixed in, and streams through the async engine."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
import torch

from coserve_testlib import make_engine, write_task
from coserve.engine.async_engine import AsyncEngine, EngineFailure
from coserve.engine.cost_model import CostModel
from coserve.engine.finetune.manager import build_job
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.sampling import SamplingParams

COST = CostModel(0.0, 1e-6, 0.0, 1e-6)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # on a GPU: pinned copies, events and CUDA graphs
PROMPTS = ["Hello, world! How are", "One, two, three", "The quick brown fox", "Monday, Tuesday", "Question: what"]


def engine_for(model_dir, overlap: bool, ahead: bool = False, **kw):
    return make_engine(model_dir, overlap_outputs=overlap, async_scheduling=ahead, cost_model=COST,
                       max_model_len=96, device=DEVICE, dtype="float32", **kw)


class CountAhead:
    """Counts the decode iterations an engine queued ahead (the feature must actually run in the test)."""

    def __init__(self, engine):
        self.count = 0
        launch = engine._launch_ahead

        def counted(chunks, flight):
            launch(chunks, flight)
            self.count += engine._ahead is not None
        engine._launch_ahead = counted


@dataclass
class Stream:
    """Everything one request emitted, in order."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    outputs: int = 0
    seq: object = None      # the engine's sequence, when the test added the request itself

    def add(self, out) -> None:
        assert self.finish_reason is None, "nothing follows a request's last output"
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.finish_reason = out.finish_reason if out.finished else None
        self.outputs += 1


def run_script(engine, arrivals: dict[int, list[tuple]], aborts: dict[int, list[str]] | None = None,
               check_lag: bool = False) -> dict[str, Stream]:
    """Step the engine, adding requests (id, prompt ids, params) and aborting ids at the given step numbers."""
    aborts = aborts or {}
    streams: dict[str, Stream] = {}
    last = max([*arrivals, *aborts])
    step = 0
    while step <= last or engine.has_work():
        for rid, ids, params in arrivals.get(step, []):
            engine.add_request(rid, ids, params)
            streams[rid] = Stream(seq=engine.requests[rid])
        for rid in aborts.get(step, []):
            engine.abort(rid)
        for out in engine.step():
            streams[out.request_id].add(out)
        if check_lag:   # no open request's sampled token waits more than one iteration for its output
            assert all(len(s.output_ids) - s.emitted_tokens <= 1 for s in engine.requests.values())
            if not engine.scheduler.has_work():
                assert not engine.requests, "with no further iteration, every output is out"
        step += 1
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return streams


def plain_outputs(model_dir, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    engine = engine_for(model_dir, overlap=False)
    return [s.output_ids for s in engine.generate(prompts, params)]


def mid_token_stop(engine, ids: list[int], at: int) -> str:
    """A 3-character stop string of the text `ids` decode to that begins inside a token, near token `at`."""
    bounds = {len(engine.tokenizer.decode(ids[:i])) for i in range(len(ids) + 1)}
    text = engine.tokenizer.decode(ids)
    start = len(engine.tokenizer.decode(ids[:at]))
    k = next(k for k in range(start + 1, len(text) - 3) if k not in bounds and text[k:k + 3].strip())
    return text[k:k + 3]


def assert_same(overlapped: dict[str, Stream], plain: dict[str, Stream], aborted: tuple[str, ...] = ()) -> None:
    assert overlapped.keys() == plain.keys()
    for rid, want in plain.items():
        got = overlapped[rid]
        if rid in aborted:   # its last delta may still have been pending when the client left
            assert want.text.startswith(got.text) and want.token_ids[:len(got.token_ids)] == got.token_ids
            continue
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason), rid
        assert got.seq.output_ids == got.token_ids and got.seq.text == got.text, rid
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)


def test_overlapped_outputs_equal_the_plain_engine(llama_dir):
    probe = engine_for(llama_dir, overlap=False)
    tok = probe.tokenizer
    ids = [tok(p).input_ids for p in PROMPTS]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=True)
    free = plain_outputs(llama_dir, ids, greedy)
    seeded = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    seeded_free = probe.generate([ids[1]], seeded)[0].output_ids
    eos_token = free[4][6]
    arrivals = {
        0: [("greedy", ids[0], greedy),
            ("seeded", ids[1], seeded),
            ("stop-str", ids[2], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                stop=[mid_token_stop(probe, free[2], 5)])),
            ("stop-str-seeded", ids[1], SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7,
                                                       ignore_eos=True, stop=[mid_token_stop(probe, seeded_free, 9)])),
            ("stop-id", ids[3], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                               stop_token_ids=[free[3][4]])),
            ("one-token", ids[0], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))],
        3: [("eos", ids[4], SamplingParams(max_tokens=24, temperature=0)),
            ("context", list(range(5, 90)), greedy),
            ("aborted", ids[2], greedy)],
        5: [("late", ids[3], SamplingParams(max_tokens=5, temperature=0.7, seed=3, ignore_eos=True,
                                            stop=["zzzz"]))],
    }
    results = []
    for overlap, ahead in ((True, True), (True, False), (False, False)):
        engine = engine_for(llama_dir, overlap, ahead)
        engine.eos_ids = {eos_token}    # this model's own eos never comes up in a few random-weight tokens
        counter = CountAhead(engine)
        results.append(run_script(engine, arrivals, {9: ["aborted"]}, check_lag=overlap))
        assert (counter.count > 10) == ahead
    queued_ahead, overlapped, plain = results
    assert_same(overlapped, plain, aborted=("aborted",))
    assert_same(queued_ahead, plain, aborted=("aborted",))
    reasons = {rid: s.finish_reason for rid, s in plain.items()}
    assert reasons == {"greedy": "length", "seeded": "length", "stop-str": "stop", "stop-str-seeded": "stop",
                       "stop-id": "stop", "one-token": "length", "eos": "stop", "context": "length",
                       "aborted": None, "late": "length"}
    assert plain["stop-id"].token_ids == free[3][:free[3].index(free[3][4]) + 1]
    assert plain["eos"].token_ids == free[4][:free[4].index(eos_token) + 1]
    assert len(plain["context"].token_ids) == 96 - 85
    assert overlapped["aborted"].finish_reason is None and overlapped["aborted"].token_ids


def test_a_stop_string_found_one_iteration_late_drops_the_extra_token(llama_dir):
    """The request keeps running one more iteration before its stop string is seen: that token never appears,
    and its blocks are given back with the rest."""
    probe = engine_for(llama_dir, overlap=False)
    ids = probe.tokenizer(PROMPTS[0]).input_ids
    free = probe.generate([ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    stop = mid_token_stop(probe, free.output_ids, 3)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop])
    engine = engine_for(llama_dir, overlap=True)
    streams = run_script(engine, {0: [("r", ids, params), ("other", ids, SamplingParams(
        max_tokens=16, temperature=0, ignore_eos=True))]})
    assert streams["r"].finish_reason == "stop" and streams["r"].text == free.text[:free.text.index(stop)]
    # the stopping token is the last one kept: the one sampled while its text was processed is gone
    kept = streams["r"].token_ids
    assert stop not in probe.tokenizer.decode(kept[:-1]) and kept == free.output_ids[:len(kept)]
    assert streams["r"].seq.output_ids == kept
    assert streams["other"].token_ids == free.output_ids


def test_overlapped_outputs_equal_the_plain_engine_beside_finetuning(llama_dir, tmp_path):
    spec = JobSpec.model_validate({"id": "ft", "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
                                   "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                                   "output": "ft", "training": {"lr": 0.01, "epochs": 1, "chunk_tokens": 4}})
    probe = engine_for(llama_dir, overlap=False)
    ids = [probe.tokenizer(p).input_ids for p in PROMPTS[:3]]
    free = plain_outputs(llama_dir, ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    arrivals = {0: [("a", ids[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
                    ("b", ids[1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                 stop=[mid_token_stop(probe, free[1], 4)]))],
                4: [("c", ids[2], SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True))]}
    results = []
    for overlap in (True, False):
        root = tmp_path / str(overlap)
        root.mkdir()
        write_task(root)
        engine = engine_for(llama_dir, overlap, data_root=str(root), tpot_slo_ms=1e6)
        job = build_job(engine, spec)
        engine.finetune.add(job)
        results.append(run_script(engine, arrivals))
        assert job.tokens > 0
    assert_same(*results)
    assert results[0]["b"].finish_reason == "stop"


@pytest.mark.parametrize("ahead", [False, True])
def test_streams_through_the_async_engine_equal_the_plain_engine(llama_dir, ahead):
    """Deltas streamed while requests come and go equal the plain engine's; a lone request's last token comes
    out without waiting for another request."""
    ids = [engine_for(llama_dir, overlap=False).tokenizer(p).input_ids for p in PROMPTS[:3]]
    params = [SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, stop=["e,"]),
              SamplingParams(max_tokens=10, temperature=0.8, seed=11, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)]
    plain = engine_for(llama_dir, overlap=False)
    want = run_script(plain, {0: [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(ids, params))]})

    async def collect(engine: AsyncEngine, i: int, delay: float) -> Stream:
        await asyncio.sleep(delay)
        stream = Stream()
        async for out in engine.generate(f"r{i}", ids[i], params[i]):
            stream.add(out)
        return stream

    async def main() -> tuple[list[Stream], Stream]:
        engine = AsyncEngine(engine_for(llama_dir, overlap=True, ahead=ahead))
        engine.start()
        try:
            together = await asyncio.wait_for(asyncio.gather(*(collect(engine, i, 0.01 * i) for i in range(3))), 60)
            alone = await asyncio.wait_for(collect(engine, 2, 0), 60)
        finally:
            engine.shutdown()
        return together, alone

    together, alone = asyncio.run(main())
    for i, got in enumerate(together):
        w = want[f"r{i}"]
        assert (got.text, got.token_ids, got.finish_reason) == (w.text, w.token_ids, w.finish_reason)
    assert (alone.text, alone.finish_reason) == (want["r2"].text, "length")


def test_decode_queued_ahead_leaves_a_prefix_cache_that_serves_the_same_tokens(llama_dir):
    """Blocks filled by decode iterations queued ahead (their KV written behind the iteration that sampled the
    token) are offered to the prefix cache; a request that reuses them gets the tokens a fresh engine computes."""
    engine = engine_for(llama_dir, overlap=True, ahead=True)
    counter = CountAhead(engine)
    ids = engine.tokenizer(PROMPTS[0]).input_ids
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    first = engine.generate([ids], params)[0]
    assert counter.count > 20
    follow = ids + first.output_ids[:24]
    hit_before = engine.blocks.lookup("probe", follow, None)
    assert hit_before is not None and hit_before.num_tokens >= len(ids) + 16   # decode-filled blocks were cached
    engine.blocks.release("probe")
    again = engine.generate([follow], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    fresh = engine_for(llama_dir, overlap=False).generate([follow], SamplingParams(max_tokens=8, temperature=0,
                                                                                  ignore_eos=True))[0]
    assert again.output_ids == fresh.output_ids == first.output_ids[24:32]


def test_a_failed_iteration_ends_each_request_it_held_with_an_error_and_the_loop_serves_on(llama_dir):
    """An iteration that raises (a device fault, injected here: none can be produced on a CPU) aborts the requests
    in flight, each stream ends with EngineFailure, and the next request is served in full."""
    engine = engine_for(llama_dir, overlap=True, ahead=False)
    ids = engine.tokenizer(PROMPTS[0]).input_ids
    real_step, failures = engine.step, []

    def step():
        if len(engine.requests) == 3 and not failures:
            failures.append(True)
            raise RuntimeError("injected device fault")
        return real_step()

    engine.step = step

    async def collect(i: int) -> str | list[int]:
        got = []
        try:
            async for out in server.generate(f"r{i}", ids, SamplingParams(max_tokens=8, temperature=0,
                                                                          ignore_eos=True)):
                got += out.token_ids
        except EngineFailure as exc:
            return str(exc)
        return got

    async def main() -> tuple[list, list]:
        server.start()
        try:
            failed = await asyncio.wait_for(asyncio.gather(*(collect(i) for i in range(3))), 60)
            after = await asyncio.wait_for(collect(3), 60)
        finally:
            server.shutdown()
        return failed, after

    server = AsyncEngine(engine)
    failed, after = asyncio.run(main())
    assert failures and all(isinstance(f, str) and "aborted" in f for f in failed), failed
    assert len(after) == 8 and not engine.requests


def test_deltas_queued_while_the_consumer_is_busy_come_as_one_and_lose_nothing(llama_dir):
    """A stream read late gets the deltas that piled up joined into one (fewer turns of a server's loop that fell
    behind the engine), with every token, logprob and the text in order."""
    ids = engine_for(llama_dir, overlap=False).tokenizer(PROMPTS[1]).input_ids
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=True)
    want = run_script(engine_for(llama_dir, overlap=False), {0: [("r", ids, params)]})["r"]

    async def main() -> list:
        server = AsyncEngine(engine_for(llama_dir, overlap=True, ahead=False))
        server.start()
        try:
            outs, gen = [], server.generate("r", ids, params)
            outs.append(await asyncio.wait_for(gen.__anext__(), 60))
            while server.engine.requests:       # the engine finishes the request while nobody reads
                await asyncio.sleep(0.01)
            outs += [out async for out in gen]
        finally:
            server.shutdown()
        return outs

    outs = asyncio.run(main())
    assert len(outs) == 2 and outs[-1].finished and outs[-1].finish_reason == "length"
    assert ("".join(o.text for o in outs), [t for o in outs for t in o.token_ids]) == (want.text, want.token_ids)
    assert len([lp for o in outs for lp in o.logprobs]) == 12
