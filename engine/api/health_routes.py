"""Liveness, readiness and Prometheus metrics (gauges read from the engine at scrape time)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from coserve.engine.async_engine import AsyncEngine
from coserve.engine.metrics import GatewayState

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")


def health_router(engine: AsyncEngine) -> APIRouter:
    core = engine.engine
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @router.get("/ready")
    async def ready() -> dict:
        return {"status": "ready", "model": core.model_name}

    @router.get("/metrics")
    async def metrics() -> Response:
        m = engine.metrics
        running, waiting = list(core.scheduler.running), list(core.scheduler.waiting)
        kv_usage = core.blocks.usage()
        loras = core.loras
        m.running.set(len(running))
        m.waiting.set(len(waiting))
        m.kv_usage.set(kv_usage)
        m.adapters.set(len(loras.adapters))
        m.set_gateway(GatewayState(
            core.model_name, len(running), len(waiting), kv_usage, loras.max_loras - len(loras.training),
            sorted(loras.adapters), sorted({s.adapter_name for s in waiting if s.adapter_name}),
            core.blocks.block_size, core.blocks.num_blocks))
        jobs = list(core.finetune.jobs.values())
        m.set_jobs({s: sum(j.state.value == s for j in jobs) for s in JOB_STATES},
                   {j.spec.id: (j.step, j.loss) for j in jobs})
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    return router
