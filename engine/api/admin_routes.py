"""The admin API (bearer token): capacity, adapters, finetuning jobs. The token is checked by a router-level
dependency before any body is read; bodies are parsed after it, so a caller without the token learns nothing
of the schema. Answers name paths relative to the data root only."""
from __future__ import annotations

import asyncio
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ValidationError

from coserve.engine.api.adapters import AdapterOps
from coserve.engine.api.auth import admin_auth
from coserve.engine.api.errors import APIError, from_validation
from coserve.engine.api.limits import require_json
from coserve.engine.async_engine import AsyncEngine
from coserve.engine.finetune.manager import JobError, build_job
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.protocol import AdapterLoad

M = TypeVar("M", bound=BaseModel)


def body_schema(model: type[BaseModel]) -> dict:
    """OpenAPI for a body the handler parses itself (after auth); app.py puts the model into components."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


async def parse_body(request: Request, model: type[M]) -> M:
    await require_json(request)
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise from_validation(exc.errors()) from exc


def admin_router(engine: AsyncEngine) -> APIRouter:
    core = engine.engine
    cfg = core.config
    adapters = AdapterOps(engine)
    relative = adapters.relative

    def refuse(status: int, message: str, param: str | None) -> APIError:
        return APIError(status, relative(message), param)

    router = APIRouter(prefix="/admin", dependencies=[Depends(admin_auth(cfg.admin_token))])

    @router.get("/capacity")
    async def capacity() -> dict:
        return {"model": core.model_name, "kv_blocks_total": core.blocks.num_blocks,
                "kv_blocks_free": core.blocks.num_free, "kv_block_size": core.blocks.block_size,
                "kv_usage": round(core.blocks.usage(), 4), "adapter_slots_total": core.loras.max_loras,
                "adapter_slots_free": core.loras.free_slots(), "max_lora_rank": core.loras.max_rank,
                "running": len(core.scheduler.running), "waiting": len(core.scheduler.waiting),
                "max_model_len": core.max_model_len, "mode": core.mode.mode.value,
                "finetune_slots_total": core.finetune.max_active if core.mode.trains else 0,
                "finetune_slots_free": core.finetune.slots_free() if core.mode.trains else 0,
                "finetune_jobs": {s: sum(j.state.value == s for j in list(core.finetune.jobs.values()))
                                  for s in ("queued", "running")},
                "load": round(core.last_step.duration_s / (cfg.tpot_slo_ms / 1000), 3),
                "tpot_slo_ms": cfg.tpot_slo_ms}

    @router.get("/adapters")
    async def list_adapters() -> dict:
        return {"adapters": [info.to_dict() for _, info in sorted(core.loras.adapters.items())]}

    @router.get("/adapters/{name}")
    async def get_adapter(name: str) -> dict:
        return adapters.loaded(name, "name").to_dict()

    @router.put("/adapters/{name}", openapi_extra=body_schema(AdapterLoad))
    async def put_adapter(name: str, request: Request) -> dict:
        body = await parse_body(request, AdapterLoad)
        return (await adapters.load(name, body.path, "name", "path")).to_dict()

    @router.delete("/adapters/{name}")
    async def delete_adapter(name: str) -> dict:
        return (await adapters.unload(name, "name")).to_dict()

    def job_or_404(job_id: str):
        job = core.finetune.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"finetuning job {job_id!r} does not exist", "id")
        return job

    async def submit(spec: JobSpec, replace: bool) -> dict:
        if not core.mode.trains:
            raise APIError(503, f"this engine serves inference only (--mode {core.mode.mode.value}); submit the "
                                "job to another engine")
        try:
            core.finetune.check_new(spec, replace)
            job = await asyncio.to_thread(build_job, core, spec)
            await engine.call(lambda: core.finetune.add(job, replace))
        except JobError as exc:
            raise refuse(exc.status, str(exc), exc.param) from exc
        return relative(job.progress())

    @router.post("/finetune/jobs", status_code=201, openapi_extra=body_schema(JobSpec))
    async def create_job(request: Request) -> dict:
        spec = await parse_body(request, JobSpec)
        return await submit(spec, bool(spec.resume_from))

    @router.post("/finetune/jobs/{job_id}/resume")
    async def resume_job(job_id: str) -> dict:
        """Continue a stopped (interrupted, cancelled or failed) job from its newest verified checkpoint."""
        job_or_404(job_id)
        try:
            spec = await asyncio.to_thread(core.finetune.resume_spec, job_id)
        except JobError as exc:
            raise refuse(exc.status, str(exc), exc.param) from exc
        return await submit(spec, True)

    @router.get("/finetune/jobs")
    async def list_jobs() -> dict:
        return {"jobs": [relative(j.progress()) for j in list(core.finetune.jobs.values())]}

    @router.get("/finetune/jobs/{job_id}")
    async def get_job(job_id: str) -> dict:
        return relative(job_or_404(job_id).progress())

    @router.delete("/finetune/jobs/{job_id}")
    async def cancel_job(job_id: str, checkpoint: bool = False) -> dict:
        """Cancel; `?checkpoint=true` first saves the last finished step, so the job can resume from it."""
        job_or_404(job_id)
        return relative((await engine.call(lambda: core.finetune.cancel(job_id, checkpoint))).progress())

    return router
