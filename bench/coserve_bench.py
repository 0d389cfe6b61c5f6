"""Co-serving benchmark: inference alone, finetuning alone, and both in the same engine, against Hugging Face
transformers (generate) and PEFT (training loop) on the same GPU, model and shapes. Prints one JSON object.

    python bench/coserve_bench.py            # a ~1.1B Llama-shaped model with random weights, bf16, on cuda
    python bench/coserve_bench.py --small    # seconds on a CPU: checks the script, measures nothing useful
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import import_coserve, job_spec, sync  # noqa: E402


def build_model(out: Path, small: bool) -> Path:
    from coserve.engine.demo_model import TinyModelSpec, write_tiny_model
    if small:
        spec = TinyModelSpec()
    else:   # TinyLlama-1.1B's shape
        spec = TinyModelSpec(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                             num_heads=32, num_kv_heads=4, max_position_embeddings=4096)
    return write_tiny_model(out, spec)


def serve_until_idle(engine) -> tuple[float, list[float]]:
    """Step until the inference requests are done: (seconds, time of each decode-only iteration)."""
    step_times: list[float] = []
    sync()
    t0 = time.perf_counter()
    while engine.scheduler.has_work():
        s0 = time.perf_counter()
        engine.step()
        sync()
        if engine.last_step.decode_tokens and not engine.last_step.prefill_tokens:
            step_times.append(time.perf_counter() - s0)
    return time.perf_counter() - t0, step_times


def bench_ours_inference(engine, prompts: list[list[int]], max_tokens: int) -> dict:
    from coserve.engine.sampling import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.generate([p[:8] for p in prompts[:2]], SamplingParams(max_tokens=4, temperature=0))   # warm-up
    for i, p in enumerate(prompts):
        engine.add_request(f"inf{i}", p, params)
    elapsed, step_times = serve_until_idle(engine)
    total = len(prompts) * max_tokens
    return {"tokens_per_s": total / elapsed, "seconds": elapsed,
            "decode_step_ms_p50": 1000 * statistics.median(step_times)}


def bench_hf_inference(model_dir: Path, prompts: list[list[int]], max_tokens: int, dtype, device) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    model.generate(ids[:2, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    sync()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    sync()
    elapsed = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"tokens_per_s": len(prompts) * max_tokens / elapsed, "seconds": elapsed}


def bench_ours_finetune(engine, data_root: Path, seq_len: int, steps: int, job_id: str,
                        chunk_tokens: int) -> tuple[dict, list[list[int]]]:
    """Our finetuning alone, and the token ids it trained on (for the peer: a finished job drops them)."""
    from coserve.engine.finetune.manager import build_job
    job = build_job(engine, job_spec(data_root, seq_len, steps, job_id, chunk_tokens=chunk_tokens))
    trained = [list(s.ids) for s in job.sequences]
    engine.finetune.add(job)
    sync()
    t0 = time.perf_counter()
    while engine.finetune.has_work():
        engine.step()
    sync()
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": job.tokens / elapsed, "seconds": elapsed, "state": job.state.value,
            "activation_bytes_per_token": job.activation_bytes_per_token()}, trained


def bench_peft_finetune(model_dir: Path, sequences: list[list[int]], dtype, device) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    seqs = [torch.tensor([ids], device=device) for ids in sequences]
    tokens = 0

    def train_step(ids: torch.Tensor) -> None:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    train_step(seqs[0])
    sync()
    if torch.cuda.is_available():
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for ids in seqs:
        train_step(ids)
        tokens += ids.shape[1]
    sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if torch.cuda.is_available() else 0
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed,
            "activation_bytes_per_token": peak / seqs[0].shape[1]}


def bench_coserve(engine, data_root: Path, prompts, max_tokens: int, seq_len: int, steps: int,
                  chunk_tokens: int) -> dict:
    from coserve.engine.finetune.manager import build_job
    from coserve.engine.sampling import SamplingParams
    job = build_job(engine, job_spec(data_root, seq_len, steps * 100, "cojob", chunk_tokens=chunk_tokens))
    engine.finetune.add(job)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"co{i}", p, params)
    elapsed, step_times = serve_until_idle(engine)
    ft_tokens = job.tokens
    engine.finetune.cancel("cojob")
    return {"inference_tokens_per_s": len(prompts) * max_tokens / elapsed, "finetune_tokens_per_s":
            ft_tokens / elapsed, "tpot_ms_p50": 1000 * statistics.median(step_times),
            "tpot_ms_p99": 1000 * sorted(step_times)[int(0.99 * (len(step_times) - 1))], "seconds": elapsed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--chunk-tokens", type=int, default=128, help="finetuning forward chunk / backward unit size")
    ap.add_argument("--slo-factor", type=float, default=1.5, help="TPOT target = factor x inference-only TPOT")
    args = ap.parse_args()
    import_coserve()
    from coserve.engine.config import EngineConfig
    from coserve.engine.engine import LLMEngine

    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    dtype_name = "bfloat16" if device == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    if args.small:
        args.batch, args.prompt_len, args.max_tokens, args.seq_len, args.steps = 4, 16, 8, 64, 2
    work = Path(tempfile.mkdtemp())
    model_dir = build_model(work / "model", args.small)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, 500, (args.batch, args.prompt_len), generator=g).tolist()

    def engine(slo_ms: float) -> LLMEngine:
        return LLMEngine(EngineConfig(model=str(model_dir), data_root=str(work), device=device, dtype=dtype_name,
                                      kv_cache_memory=0.3 if device == "cuda" else 0.25, tpot_slo_ms=slo_ms,
                                      max_batched_tokens=1024, max_num_seqs=args.batch))

    eng = engine(1e6)
    ours_inf = bench_ours_inference(eng, prompts, args.max_tokens)
    ours_ft, trained = bench_ours_finetune(eng, work, args.seq_len, args.steps, "ftonly", args.chunk_tokens)
    slo = args.slo_factor * ours_inf["decode_step_ms_p50"]
    eng.config.tpot_slo_ms = slo
    co = bench_coserve(eng, work, prompts, args.max_tokens, args.seq_len, args.steps, args.chunk_tokens)
    cost = eng.cost.to_dict()
    del eng
    hf_inf = bench_hf_inference(model_dir, prompts, args.max_tokens, dtype, device)
    peft_ft = bench_peft_finetune(model_dir, trained, dtype, device)
    result = {
        "benchmark": "coserve_bench", "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "shapes": {"model": "TinyLlama-1.1B shape, random weights" if not args.small else "tiny", "dtype": dtype_name,
                   "batch": args.batch, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                   "finetune_seq_len": args.seq_len, "chunk_tokens": args.chunk_tokens,
                   "lora": "r=16 q_proj,v_proj"},
        "cost_model": cost,
        "inference": {"ours": ours_inf, "hf_transformers": hf_inf,
                      "ratio_ours_over_hf": ours_inf["tokens_per_s"] / hf_inf["tokens_per_s"]},
        "finetune": {"ours": ours_ft, "hf_peft": peft_ft,
                     "ratio_ours_over_peft": ours_ft["tokens_per_s"] / peft_ft["tokens_per_s"],
                     "activation_memory_ratio_peft_over_ours":
                         peft_ft["activation_bytes_per_token"] / ours_ft["activation_bytes_per_token"]},
        "coserve": {**co, "tpot_slo_ms": slo,
                    "finetune_retained_vs_alone": co["finetune_tokens_per_s"] / ours_ft["tokens_per_s"],
                    "inference_retained_vs_alone": co["inference_tokens_per_s"] / ours_inf["tokens_per_s"]},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
