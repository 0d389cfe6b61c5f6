"""Liveness, readiness and Prometheus metrics (gauges read from the engine at scrape time)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from coserve.engine.async_engine import AsyncEngine

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
        m.running.set(len(core.scheduler.running))
        m.waiting.set(len(core.scheduler.waiting))
        m.kv_usage.set(core.blocks.usage())
        m.adapters.set(len(core.loras.adapters))
        jobs = list(core.finetune.jobs.values())
        m.set_jobs({s: sum(j.state.value == s for j in jobs) for s in JOB_STATES},
                   {j.spec.id: (j.step, j.loss) for j in jobs})
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    return router
