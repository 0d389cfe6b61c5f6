"""The fast path (merged weights through the Triton kernels: unified paged attention, multi-LoRA shrink/expand,
fused norm/rotary/SiLU, batched sampler) equals the reference path (the PyTorch twins) on the same batch. On a
CPU the kernels run in Triton's interpreter (tests/conftest.py); on a GPU the same test runs them for real."""
from __future__ import annotations

import pytest
import torch

from coserve_testlib import ADAPTERS, make_engine, make_peft_adapter, rel_err
from coserve.engine.runner import build_batch
from coserve.engine.sampling import SamplingParams
from coserve.engine.scheduler import Chunk
from coserve.engine.sequence import Sequence

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def engines(model_dir, adapters):
    """A reference engine and a fast one over the same weights and adapters (fp32, no CUDA graphs)."""
    out = []
    for fast in (False, True):
        engine = make_engine(model_dir, device=DEVICE, dtype="float32", fast_path=fast, cuda_graphs=False,
                             max_loras=4)
        for name, path in adapters.items():
            engine.loras.load(name, path)
        out.append(engine)
    return out


def test_fast_forward_equals_reference_on_a_mixed_batch(llama_dir, tmp_path):
    adapters = {name: make_peft_adapter(llama_dir, tmp_path / name, i, **ADAPTERS[name])
                for i, name in enumerate(("attn-r8", "all-r16-rslora"))}
    ref, fast = engines(llama_dir, adapters)
    logits = []
    for engine in (ref, fast):
        # a prefill chunk with a cached prefix (adapter 1), a whole prompt (base), a decode token (adapter 0)
        seqs = [Sequence("a", list(range(3, 30)), SamplingParams()), Sequence("b", list(range(40, 52)),
                                                                              SamplingParams()),
                Sequence("c", list(range(60, 70)), SamplingParams())]
        seqs[0].adapter_slot = engine.loras.adapters["all-r16-rslora"].slot
        seqs[2].adapter_slot = engine.loras.adapters["attn-r8"].slot
        for s in seqs:
            engine.blocks.allocate(s.request_id, s.num_tokens)
        first = [Chunk(seqs[0], 0, 20), Chunk(seqs[2], 0, 9)]
        engine.model(build_batch(first, engine.blocks, DEVICE, num_slots=4),
                     engine.kv_caches)
        chunks = [Chunk(seqs[0], 20, 7), Chunk(seqs[1], 0, 12), Chunk(seqs[2], 9, 1)]
        batch = build_batch(chunks, engine.blocks, DEVICE, all_logits=True, num_slots=4)
        with torch.no_grad():
            logits.append(engine.model(batch, engine.kv_caches))
    assert rel_err(logits[1], logits[0]) < 1e-4


def test_fast_generation_equals_reference_tokens(llama_dir, tmp_path):
    adapters = {"qv": make_peft_adapter(llama_dir, tmp_path / "qv", 3, **ADAPTERS["qv-r4"])}
    ref, fast = engines(llama_dir, adapters)
    prompts = [list(range(5, 17)), list(range(20, 25)), list(range(30, 50))]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    outs = [[s.output_ids for s in e.generate(prompts, params, ["qv", None, "qv"])] for e in (ref, fast)]
    assert outs[1] == outs[0]


def test_fast_batch_of_one_equals_reference(llama_dir, tmp_path, monkeypatch):
    """A lone request decodes through the one-row linear kernel (every projection and the head), with and
    without an adapter, and generates the reference's tokens."""
    from coserve.kernels import gemv

    calls = []
    one_row = gemv.linear_one_row
    monkeypatch.setattr(gemv, "linear_one_row", lambda *a: calls.append(1) or one_row(*a))
    adapters = {"qv": make_peft_adapter(llama_dir, tmp_path / "qv", 5, **ADAPTERS["all-r16-rslora"])}
    ref, fast = engines(llama_dir, adapters)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    for adapter in ("qv", None):
        outs = [e.generate([list(range(7, 19))], params, [adapter])[0].output_ids for e in (ref, fast)]
        assert outs[1] == outs[0]
    layers = fast.model_config.num_layers
    assert len(calls) >= 2 * 4 * (4 * layers + 1)     # 4 decode steps of 4 merged projections a layer, the head


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu_check.sh runs this)")
def test_cuda_graph_decode_equals_eager(llama_dir, tmp_path):
    """Decode iterations replayed from captured graphs (padded batch sizes, LoRA and base) give the eager tokens."""
    adapters = {"qv": make_peft_adapter(llama_dir, tmp_path / "qv", 3, **ADAPTERS["qv-r4"])}
    prompts = [list(range(5, 5 + n)) for n in (3, 9, 14, 30, 7)]
    params = SamplingParams(max_tokens=12, temperature=0.7, seed=5, ignore_eos=True)
    outs = []
    for graphs in (False, True):
        engine = make_engine(llama_dir, device="cuda", dtype="float32", cuda_graphs=graphs, max_loras=4,
                             max_num_seqs=8)
        engine.loras.load("qv", adapters["qv"])
        engine.runner.warmup()
        outs.append([s.output_ids for s in engine.generate(prompts, params, ["qv", None, None, "qv", None])])
        assert (engine.runner.graphs is not None) == graphs
    assert outs[1] == outs[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu_check.sh runs this)")
def test_cuda_graph_mixed_iterations_equal_eager(llama_dir, tmp_path):
    """Iterations mixing prefill chunks (arriving while others decode, split by the token budget), decode tokens
    and adapters, replayed from per-token-count graphs, give the eager tokens."""
    adapters = {"qv": make_peft_adapter(llama_dir, tmp_path / "qv", 3, **ADAPTERS["qv-r4"])}
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 14, 70, 7, 25)]
    params = SamplingParams(max_tokens=10, temperature=0.7, seed=5, ignore_eos=True)
    outs = []
    for graphs in (False, True):
        engine = make_engine(llama_dir, device="cuda", dtype="float32", cuda_graphs=graphs, max_loras=4,
                             max_num_seqs=8, max_batched_tokens=64)
        engine.loras.load("qv", adapters["qv"])
        engine.runner.warmup()
        seqs, step = [], 0
        while step < len(prompts) or engine.has_work():
            if step < len(prompts):
                engine.add_request(f"m{step}", prompts[step], params, "qv" if step % 2 else None)
                seqs.append(engine.requests[f"m{step}"])
            engine.step()
            step += 1
        outs.append([s.output_ids for s in seqs])
        if graphs:
            assert engine.runner.mixed.replays > 0, "mixed iterations replayed their graphs"
    assert outs[1] == outs[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu_check.sh runs this)")
def test_graphed_iterations_are_priced_at_their_padded_rows(llama_dir):
    """The planner prices a graphed forward at what its graph computes: a decode batch at its padded batch size, a
    mixed iteration at its token bucket; an eager one (here a chunk with LoRA dropout) at its tokens."""
    engine = make_engine(llama_dir, device="cuda", max_num_seqs=8, max_batched_tokens=64)
    runner = engine.runner
    assert engine.cost.pad == runner.padded_tokens
    decode = [Chunk(Sequence(f"d{i}", [5, 6, 7], SamplingParams()), 2, 1) for i in range(3)]
    assert runner.rows(decode) == 4
    prompt = Sequence("p", list(range(5, 25)), SamplingParams())
    assert runner.rows([Chunk(prompt, 0, 20)]) == 32 == runner.padded_tokens(20)
    assert runner.rows([Chunk(prompt, 0, 20, finetune=True, dropout=lambda name, x: x)]) == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu_check.sh runs this)")
def test_a_job_starting_after_a_large_mixed_iteration_captures_its_graphs_and_serving_goes_on(llama_dir, tmp_path):
    """A finetuning job's start captures the small buckets' graphs after a large prompt left row indices (logits,
    kept rows) past them in the static buffers: the captures must not read them, and serving continues exactly."""
    prompt = list(range(5, 5 + 50))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine = make_engine(llama_dir, device="cuda", dtype="float32", cuda_graphs=True, max_num_seqs=8,
                         max_batched_tokens=64)
    before = engine.generate([prompt], params)[0].output_ids
    engine.runner.prepare_finetuning()
    torch.cuda.synchronize()
    assert engine.runner.mixed.graphs.keys() >= {(b, True, True) for b in engine.runner.mixed.buckets}
    assert engine.generate([prompt], params)[0].output_ids == before


@pytest.mark.parametrize("fast", [False, True], ids=["twins", "triton"])
def test_mixed_graph_static_buffers_equal_the_plain_batch(llama_dir, tmp_path, fast):
    """What a mixed-iteration graph records, run eagerly here: the iteration padded to its token bucket (padding
    tokens, padding sequences, stale rows of earlier iterations) gives the plain batch's logits and kept layer
    inputs, and writes the same KV cache. With the Triton kernels, small buckets split the attention's keys
    (`mixed_kv_splits`) where the plain batch's prefill does not."""
    from coserve.engine.runner import MixedGraphs

    adapters = {"qv": make_peft_adapter(llama_dir, tmp_path / "qv", 3, **ADAPTERS["qv-r4"])}
    results = []
    for static in (False, True):
        engine = make_engine(llama_dir, dtype="float32", max_loras=4, max_num_seqs=8, fast_path=fast)
        engine.loras.load("qv", adapters["qv"])
        seqs = [Sequence("a", list(range(3, 30)), SamplingParams()), Sequence("b", list(range(40, 52)),
                                                                              SamplingParams()),
                Sequence("ft", list(range(60, 90)), SamplingParams())]
        seqs[0].adapter_slot = engine.loras.adapters["qv"].slot
        for s in seqs:
            engine.blocks.allocate(s.request_id, s.num_tokens)
        iterations = [[Chunk(seqs[0], 0, 20), Chunk(seqs[2], 0, 9, finetune=True)],             # 29 rows in 32
                      [Chunk(seqs[0], 20, 7), Chunk(seqs[1], 0, 12), Chunk(seqs[2], 9, 21, finetune=True)],
                      [Chunk(seqs[1], 11, 1)]]                    # one row in 16, over the rows left before
        mixed = MixedGraphs(engine.model, engine.kv_caches, engine.loras, 64, 9, 128, engine.blocks.block_size,
                            "cpu", None)
        outs = []
        for chunks in iterations:
            with torch.no_grad():
                if static:
                    p, key = mixed.prepare(chunks, engine.blocks)
                    mixed.forward(*key)
                    outs.append(tuple(t if t is None else t.clone() for t in mixed.outputs(p)))
                else:
                    batch = build_batch(chunks, engine.blocks, "cpu", num_slots=4)
                    outs.append((engine.model(batch, engine.kv_caches), batch.captured))
        results.append((outs, [k.clone() for k, _ in engine.kv_caches]))
    (plain, plain_kv), (static, static_kv) = results
    assert [len(o[0]) for o in static] == [0, 2, 1], "logits of the sampling rows only"
    for (logits_a, kept_a), (logits_b, kept_b) in zip(plain, static):
        torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)
        if kept_a is None:
            assert kept_b is None
        else:
            torch.testing.assert_close(kept_b, kept_a, rtol=1e-5, atol=1e-5)
    for a, b in zip(plain_kv, static_kv):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a pinned buffer racing its own copy needs a GPU")
def test_mixed_graph_inputs_reach_the_device_while_the_host_runs_ahead(llama_dir):
    """The host fills the next iteration's pinned buffers while the device is still busy (units queued behind a
    forward that samples nothing): the copy already queued must deliver its own iteration's rows, not the next's."""
    from coserve.engine.runner import MixedGraphs, pack

    engine = make_engine(llama_dir, device="cuda", dtype="float32", max_num_seqs=8)
    seqs = [Sequence("a", list(range(3, 30)), SamplingParams()), Sequence("b", list(range(40, 52)), SamplingParams())]
    for s in seqs:
        engine.blocks.allocate(s.request_id, s.num_tokens)
    mixed = MixedGraphs(engine.model, engine.kv_caches, engine.loras, 64, 9, 128, engine.blocks.block_size, "cuda",
                        None)
    first, second = (pack([Chunk(seqs[0], 0, 20)], engine.blocks), pack([Chunk(seqs[1], 0, 12)], engine.blocks))
    torch.cuda._sleep(200_000_000)   # about 0.1 s of device work ahead of the first copy
    mixed.fill(first)
    delivered = mixed.ids[:20].clone()     # read in stream order, right after the first copy
    mixed.fill(second)
    assert delivered.tolist() == list(range(3, 23))
