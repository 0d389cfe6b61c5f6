"""Where a decode step's host time goes: cProfile of engine.step() at batch 64 on the 1.5B shape (random
weights), beside the step's wall time and its CUDA-graph replay time. Prints the top functions by own time.

    python bench/host_profile.py [--batch 64] [--steps 60]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    import_coserve()
    from coserve.engine.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(write_model(Path(tmp) / "m", SHAPES["1p5b"], "cuda"), "cuda")
        params = SamplingParams(max_tokens=args.steps + 20, temperature=0, ignore_eos=True)
        for i in range(args.batch):
            engine.add_request(f"r{i}", list(range(10, 266)), params)
        while engine.last_step.decode_tokens != args.batch:
            engine.step()
        for _ in range(5):
            engine.step()
        sync()
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        for _ in range(args.steps):
            engine.step()
        profiler.disable()
        sync()
        wall = (time.perf_counter() - t0) / args.steps * 1000
        print(f"step wall {wall:.2f} ms (under cProfile), graph replay {graph_replay_ms(engine, args.batch):.2f} ms")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
