"""Finetuning speed and memory against a Hugging Face PEFT training loop, and finetuning co-served with 64 decode
streams inside a TPOT target, in one run on one GPU (issue 11).

    python bench/finetune_bench.py              # Llama-3.1-8B shape, random bf16 weights, 1024-token sequences
    python bench/finetune_bench.py --small      # a CPU smoke run of the script itself (measures nothing)

Prints one JSON object: device, date, versions, settings; ours alone (tokens/s, extra GPU memory, activation
bytes kept per token); the PEFT peer (transformers + peft LoRA, torch AdamW, same data and step size) without and
with gradient checkpointing; co-serving (decode streams kept in flight + one job at the TPOT target); the ratios
and the "summary" object issue 11 names. Jobs go in through the engine's job API (build_job + add), as the
server's admin API puts them.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ALL_PROJECTIONS, SHAPES, emit, import_coserve, job_spec, kv_bytes_per_token,  # noqa: E402
                    run_header, sync, write_model)


@dataclass
class FinetuneBenchConfig:
    """Everything one run measures with; `--small` swaps in the CPU smoke sizes."""

    shape: str = "8b"
    seq_len: int = 1024
    sequences_per_step: int = 1
    warmup_steps: int = 2
    steps: int = 8
    lr: float = 1e-4
    chunk_tokens: int | None = None      # None: the engine's default (as large as the iteration has room for)
    max_batched_tokens: int = 2048
    kv_gib: float = 6.0
    tpot_ms: float = 45.0                # the co-serving target (FlexLLM's SLO for 8B)
    solo_tpot_ms: float | None = None    # the target while finetuning alone; None: the same as tpot_ms
    streams: int = 64
    prompt_len: int = 256
    gen_min: int = 64
    gen_max: int = 192
    inference_seconds: float = 5.0       # inference alone, for the streams' own TPOT
    coserve_seconds: float = 20.0        # co-served window, ended at the next optimizer step after this
    coserve_rows: int = 256              # sequences the co-served job has to train on

    @classmethod
    def small(cls) -> "FinetuneBenchConfig":
        return cls(shape="small", seq_len=64, warmup_steps=1, steps=2, max_batched_tokens=256, kv_gib=0.02,
                   tpot_ms=1000.0, streams=4, prompt_len=16, gen_min=4, gen_max=12, inference_seconds=0.3,
                   coserve_seconds=0.5, coserve_rows=16)


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def free_memory() -> None:
    """Return what a dropped model held, so the next one measures from a clean device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def ratio(a: float, b: float) -> float:
    """a / b, or 0 where the denominator was not measurable (memory on a CPU)."""
    return a / b if b else 0.0


def make_engine(model_dir: Path, data_root: Path, cfg: FinetuneBenchConfig, device: str):
    from coserve.engine.config import EngineConfig
    from coserve.engine.engine import LLMEngine

    dtype_bytes = 2 if device == "cuda" else 4
    block = 16
    blocks = int(cfg.kv_gib * 2**30 // (kv_bytes_per_token(SHAPES[cfg.shape], dtype_bytes) * block))
    return LLMEngine(EngineConfig(model=str(model_dir), data_root=str(data_root), device=device, block_size=block,
                                  num_kv_blocks=blocks, max_num_seqs=cfg.streams,
                                  max_batched_tokens=cfg.max_batched_tokens,
                                  max_model_len=max(cfg.seq_len, cfg.prompt_len + cfg.gen_max) + block,
                                  max_loras=2, max_lora_rank=16, tpot_slo_ms=cfg.solo_tpot_ms or cfg.tpot_ms))


def ours_alone(engine, data_root: Path, cfg: FinetuneBenchConfig) -> tuple[dict, list[list[int]]]:
    """Our job with no inference: tokens/s after the warm-up steps, extra memory over what the engine held
    before the job, and the token ids of every step (for the peer)."""
    from coserve.engine.finetune.manager import build_job

    sps = cfg.sequences_per_step
    measured_steps = cfg.warmup_steps + cfg.steps
    spec = job_spec(data_root, cfg.seq_len, (measured_steps + 1) * sps, "solo", ALL_PROJECTIONS, cfg.chunk_tokens,
                    sps)
    job = build_job(engine, spec)
    data = [list(s.ids) for s in job.sequences]
    sync()
    before = allocated()
    reset_peak()
    engine.finetune.add(job)
    t0 = None
    while job.step < measured_steps:
        if not engine.has_work():
            raise RuntimeError(f"the job stopped at step {job.step}: {job.state.value} {job.error}")
        engine.step()
        if t0 is None and job.step >= cfg.warmup_steps:
            sync()
            t0 = time.perf_counter()
    sync()
    elapsed = time.perf_counter() - t0
    extra = peak() - before
    progress = job.progress()
    engine.finetune.cancel(spec.id)   # the extra step only keeps the final checkpoint's write out of the timing
    tokens = sum(len(ids) for ids in data[cfg.warmup_steps * sps:measured_steps * sps])
    return {"tokens_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens, "steps": cfg.steps,
            "extra_memory_bytes": extra, "extra_bytes_per_token": extra / (cfg.seq_len * sps),
            "activation_bytes_per_token": progress["activation_bytes_per_token"],
            "losses": job.losses}, data[:measured_steps * sps]


def peft_peer(model_dir: Path, data: list[list[int]], cfg: FinetuneBenchConfig, device: str) -> dict:
    """The trainer a user would otherwise run: transformers (SDPA) + peft LoRA (same r, alpha, projections), torch
    AdamW, the same token ids and step size; without and then with gradient checkpointing (non-reentrant)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa").to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ALL_PROJECTIONS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, fused=device == "cuda")
    sps = cfg.sequences_per_step
    batches = [torch.tensor(data[i:i + sps], device=device) for i in range(0, len(data), sps)]
    sync()
    weights = allocated()

    def forward_backward(ids: torch.Tensor) -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    def step(ids: torch.Tensor) -> None:
        forward_backward(ids)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {"adapter_dtype": str(params[0].dtype), "weights_bytes": weights}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reset_peak()
        for ids in batches[:cfg.warmup_steps]:
            step(ids)
        sync()
        t0 = time.perf_counter()
        for ids in batches[cfg.warmup_steps:]:
            step(ids)
        sync()
        elapsed = time.perf_counter() - t0
        extra = peak() - weights
        before = allocated()
        reset_peak()
        forward_backward(batches[-1])   # activation memory: the peak of one forward + backward over its start
        sync()
        activation = peak() - before
        opt.zero_grad(set_to_none=True)
        tokens = sum(b.numel() for b in batches[cfg.warmup_steps:])
        out["checkpointing" if checkpointing else "plain"] = {
            "tokens_per_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens, "extra_memory_bytes": extra,
            "activation_bytes_per_token": activation / batches[-1].numel()}
    del model, opt, params, batches
    free_memory()
    return out


class Streams:
    """Decode streams kept in flight: each finished request is replaced by a new one, lengths staggered so
    they do not all finish (and prefill) in the same iteration."""

    def __init__(self, engine, cfg: FinetuneBenchConfig):
        from coserve.engine.sampling import SamplingParams

        self.engine, self.cfg, self.params = engine, cfg, SamplingParams
        self.gen = torch.Generator().manual_seed(2)
        self.count = 0
        self.live: set[str] = set()
        self.last_token: dict[str, float] = {}
        self.first_tokens = 0

    def add(self) -> None:
        cfg = self.cfg
        ids = torch.randint(10, self.engine.model_config.vocab_size, (cfg.prompt_len,), generator=self.gen).tolist()
        span = cfg.gen_max - cfg.gen_min + 1
        rid = f"stream-{self.count}"
        self.engine.add_request(rid, ids, self.params(max_tokens=cfg.gen_min + (self.count * 37) % span,
                                                      temperature=0, ignore_eos=True))
        self.live.add(rid)
        self.count += 1

    def step(self) -> tuple[float, list[float]]:
        """One engine iteration: its duration and the gaps since each stream's previous token."""
        sync()
        t0 = time.perf_counter()
        outputs = self.engine.step()
        sync()
        now = time.perf_counter()
        gaps = []
        for o in outputs:
            if o.token_ids and o.request_id in self.last_token:
                gaps.append(now - self.last_token[o.request_id])
            elif o.token_ids:
                self.first_tokens += 1
            self.last_token[o.request_id] = now
            if o.finished:
                self.live.discard(o.request_id)
                self.last_token.pop(o.request_id, None)
                self.add()
        return now - t0, gaps

    def all_started(self) -> bool:
        """Every stream of the first wave has its first token (their prefills are behind us)."""
        return self.first_tokens >= self.cfg.streams

    def stop(self) -> None:
        for rid in list(self.live):
            self.engine.abort(rid)
        self.live.clear()


def window(streams: Streams, seconds: float, job=None) -> dict:
    """Iterate for at least `seconds`, then (with a job) on to the iteration that ends one of its optimizer steps:
    times of the iterations that decoded, the streams' token gaps and decode tokens/s."""
    engine = streams.engine
    iters, gaps, decoded = [], [], 0
    units = {"units": 0, "eager_units": 0, "unit_captures": 0, "finetune_forward_iterations": 0,
             "finetune_aside_iterations": 0}
    t0 = time.perf_counter()
    while True:
        step_before = job.step if job is not None else None
        dt, g = streams.step()
        gaps += g
        last = engine.last_step
        if last.decode_tokens:
            iters.append(dt)
            decoded += last.decode_tokens
        units["units"] += last.backward_units
        units["eager_units"] += last.eager_units
        units["unit_captures"] += last.unit_captures
        units["finetune_forward_iterations"] += bool(last.finetune_tokens)
        units["finetune_aside_iterations"] += last.finetune_yielded
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and (job is None or job.step != step_before or not job.active
                                   or elapsed >= 3 * seconds):
            break
    return {"seconds": elapsed, "iterations": len(iters), "decode_tokens_per_s": decoded / elapsed,
            "iteration_ms_p50": 1000 * percentile(iters, 0.5), "iteration_ms_p99": 1000 * percentile(iters, 0.99),
            "iteration_ms_max": 1000 * max(iters, default=0.0), "token_gap_ms_p50": 1000 * percentile(gaps, 0.5),
            "token_gap_ms_p99": 1000 * percentile(gaps, 0.99), **units}


def coserving(engine, data_root: Path, cfg: FinetuneBenchConfig) -> dict:
    """`streams` decode streams alone, then with one job at the TPOT target: iteration times (= the streams' time
    between tokens) and the job's tokens/s, over whole optimizer steps."""
    from coserve.engine.finetune.manager import build_job

    engine.config.tpot_slo_ms = cfg.tpot_ms
    streams = Streams(engine, cfg)
    for _ in range(cfg.streams):
        streams.add()
    while not streams.all_started():   # the initial prefills are inference's own cost: not measured
        streams.step()
    alone = window(streams, cfg.inference_seconds)
    spec = job_spec(data_root, cfg.seq_len, cfg.coserve_rows, "cojob", ALL_PROJECTIONS, cfg.chunk_tokens,
                    cfg.sequences_per_step)
    job = build_job(engine, spec)
    lengths = [len(s.ids) for s in job.sequences]   # rows in file order: step k trains rows [k * sps, (k + 1) * sps)
    engine.finetune.add(job)
    warm_until = time.perf_counter() + 3 * cfg.coserve_seconds
    while job.step < 1 and job.active and time.perf_counter() < warm_until:   # starts the window at a step's end
        streams.step()
    step0, sps = job.step, cfg.sequences_per_step
    co = window(streams, cfg.coserve_seconds, job)
    trained = sum(lengths[step0 * sps:job.step * sps])   # whole optimizer steps, forward and backward
    co.update(finetune_tokens_per_s=trained / co["seconds"], finetune_steps=job.step - step0,
              job_state=job.state.value, cost_model=engine.cost.to_dict())
    engine.finetune.cancel(spec.id)
    streams.stop()
    while engine.has_work():
        engine.step()
    return {"tpot_target_ms": cfg.tpot_ms, "streams": cfg.streams, "prompt_len": cfg.prompt_len,
            "inference_alone": alone, "with_finetuning": co,
            "inference_kept": ratio(co["decode_tokens_per_s"], alone["decode_tokens_per_s"])}


def run(cfg: FinetuneBenchConfig, device: str) -> dict:
    result = {**run_header("finetune", device), "settings": dataclasses.asdict(cfg)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = write_model(work / "model", SHAPES[cfg.shape], device)
        engine = make_engine(model_dir, work, cfg, device)
        result["cost_model"] = engine.cost.to_dict() if hasattr(engine.cost, "to_dict") else None
        ours, data = ours_alone(engine, work, cfg)
        print(json.dumps({"ours": ours}), file=sys.stderr, flush=True)
        co = coserving(engine, work, cfg)
        print(json.dumps({"coserving": co}), file=sys.stderr, flush=True)
        del engine
        free_memory()
        peft = peft_peer(model_dir, data, cfg, device)
        print(json.dumps({"peft": peft}), file=sys.stderr, flush=True)
    plain, ckpt = peft["plain"], peft["checkpointing"]
    co_ft = co["with_finetuning"]
    ratios = {
        "ours_over_peft_tokens_per_s": ours["tokens_per_s"] / plain["tokens_per_s"],
        "ours_over_peft_ckpt_tokens_per_s": ours["tokens_per_s"] / ckpt["tokens_per_s"],
        "ours_over_peft_extra_memory": ratio(ours["extra_memory_bytes"], plain["extra_memory_bytes"]),
        "ours_over_peft_ckpt_extra_memory": ratio(ours["extra_memory_bytes"], ckpt["extra_memory_bytes"]),
        "peft_over_ours_activation_per_token": ratio(plain["activation_bytes_per_token"],
                                                      ours["activation_bytes_per_token"]),
        "peft_ckpt_over_ours_activation_per_token": ratio(ckpt["activation_bytes_per_token"],
                                                           ours["activation_bytes_per_token"]),
        "coserve_iteration_p99_over_target": co_ft["iteration_ms_p99"] / cfg.tpot_ms,
        "coserve_token_gap_p99_over_target": co_ft["token_gap_ms_p99"] / cfg.tpot_ms,
        "coserve_finetune_kept": co_ft["finetune_tokens_per_s"] / ours["tokens_per_s"],
    }
    result.update(ours=ours, hf_peft=peft, coserving=co, ratios=ratios, summary={
        "ft_8b_x_peft": ratios["ours_over_peft_tokens_per_s"],
        "ft_8b_x_peft_ckpt": ratios["ours_over_peft_ckpt_tokens_per_s"],
        "ft_8b_mem_over_peft": ratios["ours_over_peft_extra_memory"],
        "coserve_8b_tpot_p99_over_target": ratios["coserve_iteration_p99_over_target"],
        "coserve_8b_ft_kept": ratios["coserve_finetune_kept"],
        "ft_activation_x_less_than_peft": ratios["peft_over_ours_activation_per_token"]})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU: checks the script only")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    defaults = FinetuneBenchConfig()
    for f in dataclasses.fields(FinetuneBenchConfig):
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" |")[0], float)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(defaults, f.name))
    args = parser.parse_args()
    import_coserve()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneBenchConfig)}
    if args.small:
        base = FinetuneBenchConfig.small()
        given = {k: v for k, v in given.items() if v != getattr(defaults, k)}
        cfg = dataclasses.replace(base, **given)
    else:
        cfg = FinetuneBenchConfig(**given)
    device = "cpu" if args.small else "cuda"
    result = run(cfg, device)
    emit(result, args.out)


if __name__ == "__main__":
    main()
