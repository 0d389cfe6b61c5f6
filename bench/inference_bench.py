"""Inference speed against the hardware and against Hugging Face `generate`, in one run on one GPU (issue 10).

    python bench/inference_bench.py                 # Llama-3.1-8B and Qwen2.5-1.5B shapes, random bf16 weights
    python bench/inference_bench.py --small         # a CPU smoke run of the script itself (measures nothing)

Prints one JSON object: device, date, versions, the two ceilings measured here (copy bandwidth, bf16 matmul
rate), per shape our decode ms/step, the floor (weight bytes, plus KV bytes at batch 64, over the copy
bandwidth), HF generate's ms/step, prefill's share of the matmul rate, multi-LoRA over base-only decode, prefix
caching's TTFT speedup, and the "summary" object issue 10 names.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, emit, import_coserve, kv_bytes_per_token, run_header, sync, write_model  # noqa: E402


def ceilings(device: str) -> dict:
    """Copy bandwidth (bytes read + written per second) and the bf16 matmul rate, measured here."""
    if device != "cuda":
        return {"copy_bytes_per_s": 1e10, "matmul_flops_per_s": 1e11}
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    copy = timed(lambda: dst.copy_(src), 20)
    mm = timed(lambda: a @ b, 20)
    del src, dst
    return {"copy_bytes_per_s": 2 * (2 << 30) / copy, "matmul_flops_per_s": 2 * 8192 ** 3 / mm}


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn` by CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def weight_bytes(shape: dict) -> int:
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"]
    hd = h // shape["num_heads"]
    per_layer = h * (shape["num_heads"] * hd) * 2 + h * shape["num_kv_heads"] * hd * 2 + 3 * h * i + 2 * h
    head = shape["vocab_size"] * h     # the lm_head is read every step; the embedding only at the rows used
    return 2 * (layers * per_layer + head + h)


def make_engine(model_dir: Path, device: str, **kw):
    from coserve.engine.config import EngineConfig
    from coserve.engine.cost_model import CostModel
    from coserve.engine.engine import LLMEngine

    settings = dict(model=str(model_dir), device=device, max_num_seqs=64, max_batched_tokens=2048,
                    max_model_len=4096, kv_cache_memory=0.5 if device == "cuda" else 0.25, max_lora_rank=16)
    settings.update(kw)
    return LLMEngine(EngineConfig(**settings), CostModel(1e-3, 1e-5, 1e-3, 1e-5))


def decode_ms(engine, batch: int, prompt: int, gen: int, adapters: list[str | None] | None = None) -> float:
    """Median time between the ends of consecutive decode-only steps with `batch` requests in flight, as a server
    runs them (no sync between steps: host work shows where the device waits for it, not where it overlaps)."""
    from coserve.engine.sampling import SamplingParams

    g = torch.Generator().manual_seed(batch)
    vocab = engine.model_config.vocab_size
    prompts = [torch.randint(10, vocab, (prompt,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    adapters = adapters or [None] * batch
    for i, (ids, a) in enumerate(zip(prompts, adapters)):
        engine.add_request(f"d{batch}-{i}-{time.monotonic_ns()}", ids, params, a)
    times = []
    sync()
    t0 = time.perf_counter()
    while engine.scheduler.has_work():
        engine.step()
        t1 = time.perf_counter()
        if engine.last_step.decode_tokens == batch and not engine.last_step.prefill_tokens:
            times.append(t1 - t0)
        t0 = t1
    return 1000 * statistics.median(times[2:] or times)


def graph_replay_ms(engine, batch: int) -> float | None:
    """GPU time of one decode graph replay at this batch (no host work): what the step would cost with the host
    fully hidden. Slots are set to -1 first so the replay writes no KV."""
    graphs = engine.runner.graphs
    if graphs is None:
        return None
    bs = graphs.padded(batch)
    if (bs, False) not in graphs.graphs:
        return None
    graphs.inputs.slots.fill_(-1)
    return 1000 * timed(graphs.graphs[(bs, False)][0].replay, 20)


def prefill_s(engine, prompts: int, length: int) -> float:
    """Seconds of one iteration that prefills `prompts` prompts of `length` tokens (one token generated)."""
    from coserve.engine.sampling import SamplingParams

    g = torch.Generator().manual_seed(length)
    vocab = engine.model_config.vocab_size
    best = float("inf")
    for rep in range(3):
        for i in range(prompts):
            engine.add_request(f"p{rep}-{i}", torch.randint(10, vocab, (length,), generator=g).tolist(),
                               SamplingParams(max_tokens=1, temperature=0))
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        best = min(best, time.perf_counter() - t0)
        while engine.scheduler.has_work():
            engine.step()
    return best


def ttft_s(engine, ids: list[int]) -> float:
    from coserve.engine.sampling import SamplingParams

    engine.add_request(f"t{time.monotonic_ns()}", ids, SamplingParams(max_tokens=1, temperature=0))
    sync()
    t0 = time.perf_counter()
    while engine.scheduler.has_work():
        engine.step()
    sync()
    return time.perf_counter() - t0


def prefix_cache_speedup(engine, prefix_len: int) -> dict:
    """TTFT of a request whose 2000-token prefix another request just left in the cache, against a cold one."""
    g = torch.Generator().manual_seed(7)
    vocab = engine.model_config.vocab_size

    def rand(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=g).tolist()
    ttft_s(engine, rand(prefix_len + 16))              # warm-up of the shapes
    shared = rand(prefix_len)
    cold = ttft_s(engine, shared + rand(16))
    warm = ttft_s(engine, shared + rand(16))
    return {"cold_ttft_ms": 1000 * cold, "warm_ttft_ms": 1000 * warm, "speedup": cold / warm}


def write_adapter_dir(out: Path, engine, rank: int) -> Path:
    from coserve.engine.lora import write_adapter

    g = torch.Generator().manual_seed(0)
    weights = {name: (torch.randn(rank, i, generator=g) * 0.01, torch.randn(o, rank, generator=g) * 0.01)
               for name, (i, o) in engine.model.lora_targets().items()}
    return write_adapter(out, weights, rank, 2.0 * rank, "bench")


def hf_generate_ms(model_dir: Path, shape: dict, batch: int, prompt: int, gen: int, device: str) -> float:
    """HF transformers generate (greedy, bf16, sdpa) on the same shape: ms per generated token step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(10, shape["vocab_size"], (batch, prompt), device=device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        sync()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
        sync()
    del model
    torch.cuda.empty_cache() if device == "cuda" else None
    return 1000 * (time.perf_counter() - t0) / gen


def bench_shape(name: str, shape: dict, work: Path, device: str, ceil: dict, full: bool, small: bool) -> dict:
    model_dir = write_model(work / name, shape, device)
    bw, res = ceil["copy_bytes_per_s"], {"shape": name, **shape}
    weights = weight_bytes(shape)
    res["weight_bytes"] = weights
    b1 = (4, 4) if small else (128, 64)
    b64 = (8, 4) if small else (256, 128)
    nb64 = 4 if small else 64
    engine = make_engine(model_dir, device, max_loras=33 if full else 1)
    res["decode_b1_ms"] = decode_ms(engine, 1, *b1)
    res["decode_b64_ms"] = decode_ms(engine, nb64, *b64)
    ahead, engine.async_scheduling = engine.async_scheduling, False   # what queuing decode ahead buys
    res["decode_b1_read_each_ms"] = decode_ms(engine, 1, *b1)
    res["decode_b64_read_each_ms"] = decode_ms(engine, nb64, *b64)
    engine.async_scheduling = ahead
    if device == "cuda":
        res["graph_b1_ms"], res["graph_b64_ms"] = graph_replay_ms(engine, 1), graph_replay_ms(engine, nb64)
    res["floor_b1_ms"] = 1000 * weights / bw
    kv = nb64 * (b64[0] + b64[1] / 2) * kv_bytes_per_token(shape)
    res["floor_b64_ms"] = 1000 * (weights + kv) / bw
    res["decode_b1_x_floor"] = res["decode_b1_ms"] / res["floor_b1_ms"]
    res["decode_b64_x_floor"] = res["decode_b64_ms"] / res["floor_b64_ms"]
    if full:
        n_prompts, length = (2, 16) if small else (16, 1024)
        engine.config.max_batched_tokens = engine.scheduler.max_batched_tokens = n_prompts * length
        seconds = prefill_s(engine, n_prompts, length)
        flops = 2 * (weights / 2) * n_prompts * length
        res["prefill_s"] = seconds
        res["prefill_matmul_fraction"] = flops / seconds / ceil["matmul_flops_per_s"]
        adapter = write_adapter_dir(work / "adapter", engine, 4 if small else 16)
        n_adapters = 2 if small else 32
        for i in range(n_adapters):
            engine.loras.load(f"a{i}", adapter)
        base = decode_ms(engine, nb64, *b64)
        lora = decode_ms(engine, nb64, *b64, adapters=[f"a{i % n_adapters}" for i in range(nb64)])
        res["multi_lora"] = {"adapters": n_adapters, "rank": 4 if small else 16, "base_ms": base, "lora_ms": lora,
                             "over_base_throughput": base / lora}
        res["prefix_cache"] = prefix_cache_speedup(engine, 32 if small else 2000)
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    res["hf_b1_ms"] = hf_generate_ms(model_dir, shape, 1, *b1, device)
    res["hf_b64_ms"] = hf_generate_ms(model_dir, shape, nb64, *b64, device)
    res["b64_x_hf_tokens_per_s"] = res["hf_b64_ms"] / res["decode_b64_ms"]
    res["b1_x_hf_tokens_per_s"] = res["hf_b1_ms"] / res["decode_b1_ms"]
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU: checks the script only")
    parser.add_argument("--shapes", default="8b,1p5b")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    import_coserve()

    device = "cpu" if args.small else "cuda"
    ceil = ceilings(device)
    shapes = ["small"] if args.small else args.shapes.split(",")
    result = {**run_header("inference", device), "ceilings": ceil, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            full = name in ("8b", "small")
            result["shapes"][name] = bench_shape(name, SHAPES[name], Path(tmp), device, ceil, full, args.small)
            print(json.dumps({name: result["shapes"][name]}), file=sys.stderr, flush=True)
    big = result["shapes"].get("8b", result["shapes"].get("small", {}))
    small = result["shapes"].get("1p5b", big)
    result["summary"] = {
        "decode_8b_b1_x_floor": big.get("decode_b1_x_floor"), "decode_8b_b64_x_floor": big.get("decode_b64_x_floor"),
        "decode_8b_b64_x_hf": big.get("b64_x_hf_tokens_per_s"), "decode_1p5b_b1_ms": small.get("decode_b1_ms"),
        "decode_1p5b_b64_ms": small.get("decode_b64_ms"),
        "prefill_8b_matmul_fraction": big.get("prefill_matmul_fraction"),
        "multi_lora_32_over_base": big.get("multi_lora", {}).get("over_base_throughput"),
        "prefix_cache_ttft_speedup": big.get("prefix_cache", {}).get("speedup")}
    emit(result, args.out)


if __name__ == "__main__":
    main()
