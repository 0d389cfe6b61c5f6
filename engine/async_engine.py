"""Runs the engine loop on its own thread; the server talks to it through a queue of calls and gets
outputs back on asyncio queues. Every change of engine state happens on the engine thread."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from coserve.engine.engine import LLMEngine
from coserve.engine.metrics import Metrics
from coserve.engine.sampling import SamplingParams
from coserve.engine.sequence import RequestOutput

log = logging.getLogger("coserve.engine")
T = TypeVar("T")


class EngineFailure(RuntimeError):
    """The iteration holding a request failed; the request was aborted (the API answers it with an error)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: Metrics | None = None):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="coserve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_work())
            if not self.engine.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # the last resort: a failed iteration fails its requests, never the process
                log.exception("engine step failed; aborting the %d requests in flight", len(self.engine.requests))
                failed = list(self.engine.requests)
                for rid in failed:
                    self.engine.abort(rid)
                    self.metrics.requests.labels("error").inc()
                self._deliver([(rid, EngineFailure("the engine iteration serving this request failed, so the "
                                                   "request was aborted; the server goes on")) for rid in failed])
                continue
            self.metrics.observe_step(self.engine.last_step)
            cost = self.engine.cost
            if cost.error is not None:
                self.metrics.cost_error.set(cost.error)
                self.metrics.cost_margin.set(cost.margin)
            for out in outputs:
                if out.finished:
                    self.metrics.requests.labels(out.finish_reason).inc()
            self._deliver([(out.request_id, out) for out in outputs])

    def _drain(self, block: bool) -> None:
        try:
            fn = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn()
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, items: list[tuple[str, RequestOutput | Exception]]) -> None:
        """Hand an iteration's outputs to their streams with one wake-up of each event loop, not one per output
        (each is a write to the loop's self-pipe on this thread, and a turn of the loop on the server's)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput | Exception]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between iterations and return (or raise) its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result: Any = fn()
            except Exception as exc:
                loop.call_soon_threadsafe(lambda e=exc: fut.done() or fut.set_exception(e))
            else:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

        self._inbox.put(run)
        return await fut

    def abort(self, request_id: str) -> None:
        def run() -> None:
            if request_id in self.engine.requests:
                self.engine.abort(request_id)
                self.metrics.requests.labels("abort").inc()
                self._deliver([(request_id, RequestOutput(request_id, "", [], [], True, "abort", 0, 0))])
        self._inbox.put(run)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas; leaving early (client gone) aborts it and frees its KV blocks. Deltas that
        queued up while the consumer was busy come as one, so a server behind the engine catches up instead of
        spending a turn of its loop on every token."""
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        finished, held = False, None
        try:
            await self.call(lambda: self.engine.add_request(request_id, prompt_ids, params, adapter))
            while not finished:
                item = held or await q.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                ready, held = [item], None
                while not ready[-1].finished and not q.empty():
                    nxt = q.get_nowait()
                    if isinstance(nxt, Exception):
                        held = nxt      # raised after the deltas before it are out
                        break
                    ready.append(nxt)
                item = RequestOutput.join(ready)
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)


def _put_all(puts: list[tuple[asyncio.Queue, RequestOutput | Exception]]) -> None:
    for q, item in puts:
        q.put_nowait(item)
