"""Host cost of handing one iteration's outputs from the engine thread to the server's event loop: the engine's
`AsyncEngine._deliver` (one wake-up of the loop per iteration) against one `call_soon_threadsafe` per output
(what it did before), in the same run. Engine-thread CPU time per iteration, so other processes do not blur it.

    python bench/delivery_bench.py [--outputs 64,256] [--iterations 300] [--out results/x.json]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, import_coserve, run_header  # noqa: E402


def per_output(streams: dict, items: list) -> None:
    """The peer: one wake-up of the loop per output."""
    for request_id, item in items:
        loop, q = streams[request_id]
        loop.call_soon_threadsafe(q.put_nowait, item)


async def measure(outputs: int, iterations: int) -> dict:
    from coserve.engine.async_engine import AsyncEngine

    loop = asyncio.get_running_loop()
    server = AsyncEngine(None)          # only its hand-over is used: no engine runs
    server._streams = {f"r{i}": (loop, asyncio.Queue()) for i in range(outputs)}
    readers = [asyncio.create_task(reader(q)) for _, q in server._streams.values()]
    items = [(rid, object()) for rid in server._streams]
    result: dict = {}

    def engine_thread() -> None:
        for name, deliver in (("per_output", lambda: per_output(server._streams, items)),
                              ("one_wake_up", lambda: server._deliver(items))):
            spent = 0.0
            for _ in range(iterations):
                t0 = time.thread_time()
                deliver()
                spent += time.thread_time() - t0
                time.sleep(0.002)       # an iteration's device time, during which the loop drains its queues
            result[name] = 1e6 * spent / iterations

    thread = threading.Thread(target=engine_thread)
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(0.005)
    for task in readers:
        task.cancel()
    return {"outputs": outputs, "engine_thread_us_per_iteration": {k: round(v, 1) for k, v in result.items()},
            "per_output_over_one_wake_up": round(result["per_output"] / result["one_wake_up"], 2)}


async def reader(q: asyncio.Queue) -> None:
    while True:
        await q.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outputs", default="64,256", help="outputs per iteration (comma-separated)")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    import_coserve()
    result = run_header("delivery", "cpu")
    result["runs"] = [asyncio.run(measure(int(n), a.iterations)) for n in a.outputs.split(",")]
    emit(result, a.out)


if __name__ == "__main__":
    main()
