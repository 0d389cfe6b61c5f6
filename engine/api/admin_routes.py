"""The admin API (bearer token): capacity, adapters, finetuning jobs. The token is checked by a router-level
dependency before any body is read; bodies are parsed after it, so a caller without the token learns nothing
of the schema. Answers name paths relative to the data root only."""
from __future__ import annotations

import asyncio
import hmac
import re
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ValidationError

from coserve.engine.api.errors import APIError, from_validation
from coserve.engine.api.limits import require_json
from coserve.engine.async_engine import AsyncEngine
from coserve.engine.finetune.manager import JobError, build_job
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.lora import AdapterError
from coserve.engine.paths import PathError, resolve_under
from coserve.engine.protocol import AdapterLoad

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
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
    root = str(Path(cfg.data_root).resolve())

    def require_admin(request: Request) -> None:
        if not cfg.admin_token:
            raise APIError(403, "the admin API is disabled: start the server with --admin-token-file "
                                "or COSERVE_ADMIN_TOKEN")
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), cfg.admin_token.encode()):
            raise APIError(401, "missing or wrong admin bearer token")

    def relative(value: Any) -> Any:
        """Server paths in messages (an OS error names the file) are cut to paths under the data root."""
        if isinstance(value, str):
            return value.replace(root + "/", "").replace(root, ".")
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        if isinstance(value, list):
            return [relative(v) for v in value]
        return value

    def refuse(status: int, message: str, param: str | None) -> APIError:
        return APIError(status, relative(message), param)

    router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

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

    def adapter_or_404(name: str) -> dict:
        info = core.loras.adapters.get(name)
        if info is None:
            raise APIError(404, f"adapter {name!r} is not loaded", "name")
        return info.to_dict()

    @router.get("/adapters/{name}")
    async def get_adapter(name: str) -> dict:
        return adapter_or_404(name)

    @router.put("/adapters/{name}", openapi_extra=body_schema(AdapterLoad))
    async def put_adapter(name: str, request: Request) -> dict:
        body = await parse_body(request, AdapterLoad)
        if not ADAPTER_NAME.match(name) or name == core.model_name:
            raise APIError(400, "adapter name must be 1-63 letters, digits, '.', '_' or '-', start with a letter "
                                "or digit, and differ from the base model's name", "name")
        try:
            path = resolve_under(cfg.data_root, body.path)
        except PathError as exc:
            raise refuse(400, str(exc), "path") from exc
        if not path.is_dir():
            raise APIError(404, f"adapter folder {body.path!r} does not exist under the data root", "path")
        try:
            info = await engine.call(lambda: core.loras.load(name, path, body.path, Path(root)))
        except AdapterError as exc:
            status = 409 if "slots" in str(exc) else 400
            raise refuse(status, str(exc), "path" if status == 400 else None) from exc
        return info.to_dict()

    @router.delete("/adapters/{name}")
    async def delete_adapter(name: str) -> dict:
        adapter_or_404(name)
        info = await engine.call(lambda: core.loras.unload(name))
        return info.to_dict()

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
