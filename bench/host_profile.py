"""Where a decode step's host time goes: cProfile of engine.step() at batch 64, beside the step's wall time and
(on a GPU) its CUDA-graph replay time. Prints the top functions by own time, and the step split into device work
(the model's forward and the batched sampler: what the GPU runs) and host work (everything else).

    python bench/host_profile.py [--batch 64] [--steps 60] [--device cuda|cpu] [--shape 1p5b|small]

On a CPU (`--device cpu --shape small`, the tiny model) nothing runs asynchronously, so the split shows the host
work per step directly, and of it the part the engine overlaps with the next iteration's GPU work.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, import_coserve, sync, write_model  # noqa: E402
from inference_bench import graph_replay_ms, make_engine  # noqa: E402


def code_key(fn) -> tuple[str, int, str]:
    """A function's key in cProfile's statistics."""
    code = fn.__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def cumulative_ms(stats: pstats.Stats, functions: list, steps: int) -> float:
    """Cumulative time per step spent in the given functions (none of them calls another)."""
    return 1000 * sum(stats.stats[k][3] for k in map(code_key, functions) if k in stats.stats) / steps


class Stopwatch:
    """Wraps a bound method and adds up the CPU seconds this thread spent in it (CPU only: the wrapper waits for
    nothing). CPU time, not wall time, so that other processes on a shared machine do not blur the split."""

    def __init__(self, obj, name: str):
        self.seconds, inner = 0.0, getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - t0
        setattr(obj, name, timed)


def host_split_cpu(engine, steps: int) -> str:
    """A profiler-free split of `steps` CPU steps (thread CPU time; torch on this one thread): device work (the
    forward and the sampler), the outputs the engine makes while the next forward runs (`_emit`), the rest."""
    device = [Stopwatch(engine.model, "forward"), Stopwatch(engine.runner.sampler, "sample")]
    emit = Stopwatch(engine, "_emit") if hasattr(engine, "_emit") else None
    t0 = time.thread_time()
    for _ in range(steps):
        engine.step()
    wall = (time.thread_time() - t0) / steps * 1000
    dev = sum(d.seconds for d in device) / steps * 1000
    overlapped = emit.seconds / steps * 1000 if emit else 0.0
    return (f"no profiler, {steps} steps, CPU time: step {wall:.2f} ms, device work {dev:.2f} ms, host {wall - dev:.2f} ms "
            f"per step: overlapped with the next forward {overlapped:.2f} ms, serial {wall - dev - overlapped:.2f} ms")


def print_engine_functions(stats: pstats.Stats, steps: int, top: int = 25) -> None:
    """The engine's own functions (not the model's), per step: cumulative and own ms, calls."""
    rows = [(cum, own, calls, f"{Path(path).parent.name}/{Path(path).name}:{line}({func})")
            for (path, line, func), (_, calls, own, cum, _) in stats.stats.items()
            if Path(path).parent.name in ("engine", "layers") and Path(path).name not in ("llama.py",)]
    print(f"{'cum ms/step':>12} {'own ms/step':>12} {'calls/step':>11}  engine function")
    for cum, own, calls, name in sorted(rows, reverse=True)[:top]:
        print(f"{1000 * cum / steps:12.3f} {1000 * own / steps:12.3f} {calls / steps:11.1f}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 1p5b on cuda, small on cpu")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens of each request")
    args = parser.parse_args()
    shape = args.shape or ("1p5b" if args.device == "cuda" else "small")
    if args.device == "cpu":
        torch.set_num_threads(1)     # all the work on this thread, so its CPU time is the step's
    import_coserve()
    from coserve.engine.sampling import SamplingParams
    from coserve.kernels.sampling import sample_batch, sample_batch_fused

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(write_model(Path(tmp) / "m", SHAPES[shape], args.device), args.device)
        params = SamplingParams(max_tokens=2 * args.steps + 20, temperature=0, ignore_eos=True)
        for i in range(args.batch):
            engine.add_request(f"r{i}", list(range(10, 10 + args.prompt)), params)
        while engine.last_step.decode_tokens != args.batch:
            engine.step()
        for _ in range(5):
            engine.step()
        sync()
        split = host_split_cpu(engine, args.steps) if args.device == "cpu" else None
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        for _ in range(args.steps):
            engine.step()
        profiler.disable()
        sync()
        wall = (time.perf_counter() - t0) / args.steps * 1000
        stats = pstats.Stats(profiler)
        replay = graph_replay_ms(engine, args.batch)
        # the device work: the model's forward and the batched sampler's tensor ops (what the GPU runs)
        device = cumulative_ms(stats, [type(engine.model).forward, sample_batch, sample_batch_fused], args.steps)
        # what the engine overlaps with the next iteration's forward (the previous iteration's outputs)
        overlapped = cumulative_ms(stats, [type(engine)._emit], args.steps) if hasattr(engine, "_emit") else 0.0
        print(f"{shape} on {args.device}, batch {args.batch}: step wall {wall:.2f} ms (under cProfile)"
              + (f", graph replay {replay:.2f} ms" if replay is not None else ""))
        if split is not None:
            print(split)
            print(f"under cProfile: device work {device:.2f} ms, host {wall - device:.2f} ms per step: overlapped "
                  f"{overlapped:.2f} ms, serial {wall - device - overlapped:.2f} ms")
        stats.sort_stats("tottime").print_stats(25)
        print_engine_functions(stats, args.steps)


if __name__ == "__main__":
    main()
