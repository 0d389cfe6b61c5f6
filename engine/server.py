"""FastAPI app: OpenAI-compatible API, admin API (bearer token), health, readiness and Prometheus metrics."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from coserve.engine.async_engine import AsyncEngine
from coserve.engine.engine import RequestError
from coserve.engine.finetune.manager import JobError, build_job
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.lora import AdapterError
from coserve.engine.paths import PathError, resolve_under
from coserve.engine.protocol import AdapterLoad, ChatCompletionRequest, CompletionRequest, SamplingFields
from coserve.engine.sampling import SamplingParams
from coserve.engine.sequence import RequestOutput

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str, param: str | None, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(engine: AsyncEngine) -> FastAPI:
    core = engine.engine
    cfg = core.config
    tokenizer = core.tokenizer
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # Shutting down (SIGTERM/SIGINT): running jobs are checkpointed and marked interrupted on the engine
        # thread; wait for that within the grace period. The CLI's signal handler may have asked already.
        await asyncio.to_thread(core.finetune.wait_stopped, cfg.shutdown_grace_s)

    app = FastAPI(title="coserve engine", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.status), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"malformed JSON body: {err.get('msg')}", "invalid_request_error",
                                          None, 400), status_code=400)
        param = ".".join(loc) or None
        return JSONResponse(error_body(f"{param or 'body'}: {err.get('msg')}", "invalid_request_error", param, 400),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, exc.status_code), status_code=exc.status_code,
                            headers=exc.headers)

    def require_admin(request: Request) -> None:
        if not cfg.admin_token:
            raise APIError(403, "the admin API is disabled: start the server with --admin-token-file "
                                "or COSERVE_ADMIN_TOKEN", kind="permission_error")
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), cfg.admin_token.encode()):
            raise APIError(401, "missing or wrong admin bearer token", kind="authentication_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready", "model": core.model_name}

    @app.get("/metrics")
    async def metrics() -> Response:
        m = engine.metrics
        m.running.set(len(core.scheduler.running))
        m.waiting.set(len(core.scheduler.waiting))
        m.kv_usage.set(core.blocks.usage())
        m.adapters.set(len(core.loras.adapters))
        jobs = list(core.finetune.jobs.values())
        for state in ("queued", "running", "succeeded", "failed", "cancelled", "interrupted"):
            m.jobs.labels(state).set(sum(j.state.value == state for j in jobs))
        for j in jobs:
            m.job_step.labels(j.spec.id).set(j.step)
            if j.loss is not None:
                m.job_loss.labels(j.spec.id).set(j.loss)
        return Response(m.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        data = [{"id": core.model_name, "object": "model", "created": created, "owned_by": "coserve",
                 "root": cfg.model, "parent": None, "max_model_len": core.max_model_len}]
        for name, info in sorted(core.loras.adapters.items()):
            data.append({"id": name, "object": "model", "created": created, "owned_by": "coserve",
                         "root": info.path, "parent": core.model_name})
        return {"object": "list", "data": data}

    def resolve_model(name: str) -> str | None:
        if name == core.model_name:
            return None
        if name in core.loras.adapters:
            return name
        raise APIError(404, f"the model {name!r} does not exist; GET /v1/models lists the served models", "model",
                       kind="not_found_error")

    def sampling_params(req: SamplingFields, max_tokens: int | None, prompt_len: int, logprobs: bool) -> SamplingParams:
        room = core.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context is {core.max_model_len} tokens "
                                "including the completion", "prompt" if isinstance(req, CompletionRequest)
                           else "messages")
        bad = [t for t in req.stop_token_ids if not 0 <= t < core.model_config.vocab_size]
        if bad:
            raise APIError(400, f"stop_token_ids {bad} are outside the vocabulary", "stop_token_ids")
        return SamplingParams(max_tokens=min(max_tokens or room, room), temperature=req.temperature,
                              top_k=req.top_k, top_p=req.top_p, seed=req.seed, stop=req.stop_list(),
                              stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs)

    async def run(request: Request, rid: str, ids: list[int], params: SamplingParams,
                  adapter: str | None) -> AsyncIterator[RequestOutput]:
        """Engine deltas for one request, with TTFT/TPOT observed and engine errors mapped to API errors."""
        start = time.monotonic()
        first: float | None = None
        count = 0
        try:
            async for out in engine.generate(rid, ids, params, adapter):
                now = time.monotonic()
                if out.token_ids and first is None:
                    first = now
                    engine.metrics.ttft.observe(now - start)
                count += len(out.token_ids)
                if out.finished:
                    engine.metrics.e2e.observe(now - start)
                    if first is not None and count > 1:
                        engine.metrics.tpot.observe((now - first) / (count - 1))
                yield out
        except RequestError as exc:
            raise APIError(exc.code, str(exc), exc.param,
                           kind="not_found_error" if exc.code == 404 else "invalid_request_error") from exc

    async def collect(request: Request, gen: AsyncIterator[RequestOutput], rid: str) -> list[RequestOutput]:
        """Gather a whole non-streamed answer, aborting it if the client goes away meanwhile."""
        async def watch() -> None:
            while True:
                await asyncio.sleep(0.2)
                if await request.is_disconnected():
                    engine.abort(rid)
                    return
        watcher = asyncio.create_task(watch())
        try:
            return [out async for out in gen]
        finally:
            watcher.cancel()

    def sse(payloads: AsyncIterator[dict]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for p in payloads:
                    yield f"data: {json.dumps(p)}\n\n"
            except APIError as exc:
                yield f"data: {json.dumps(error_body(exc.message, exc.kind, exc.param, exc.status))}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def first_output(gen: AsyncIterator[RequestOutput]) -> tuple[RequestOutput | None, AsyncIterator]:
        """Pull the first delta before answering, so refusals become a plain 4xx rather than a broken stream."""
        try:
            return await gen.__anext__(), gen
        except StopAsyncIteration:
            return None, gen

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        adapter = resolve_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        ids = tokenizer(prompt, add_special_tokens=False).input_ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        params = sampling_params(req, req.max_tokens, len(ids), req.logprobs is not None)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = tokenizer.decode(ids) if req.echo and isinstance(prompt, list) else (prompt if req.echo else "")

        def choice(text: str, out: RequestOutput) -> dict:
            lp = None
            if req.logprobs is not None:
                lp = {"tokens": [tokenizer.decode([t]) for t in out.token_ids], "token_logprobs": out.logprobs,
                      "top_logprobs": None, "text_offset": None}
            return {"index": 0, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}

        gen = run(request, rid, ids, params, adapter)
        head, gen = await first_output(gen)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            async def chunks() -> AsyncIterator[dict]:
                outs = [head] if head else []
                first = True
                async for out in _chain(outs, gen):
                    text = (echo if first else "") + out.text
                    first = False
                    yield {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                           "choices": [choice(text, out)]}
                    if out.finished and include_usage:
                        yield {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                               "choices": [], "usage": usage(out.prompt_tokens, out.completion_tokens)}
            return sse(chunks())
        outs = ([head] if head else []) + await collect(request, gen, rid)
        merged = _merge(rid, outs)
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [choice(echo + merged.text, merged)],
                "usage": usage(merged.prompt_tokens, merged.completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        adapter = resolve_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if tokenizer.chat_template is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:
            raise APIError(400, f"the chat template rejected the messages: {exc}", "messages") from exc
        if not isinstance(ids, list):
            ids = list(ids["input_ids"])
        params = sampling_params(req, req.max_completion_tokens or req.max_tokens, len(ids), req.logprobs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(out: RequestOutput) -> dict | None:
            if not req.logprobs:
                return None
            return {"content": [{"token": tokenizer.decode([t]), "logprob": lp, "bytes": None, "top_logprobs": []}
                                for t, lp in zip(out.token_ids, out.logprobs)]}

        gen = run(request, rid, ids, params, adapter)
        head, gen = await first_output(gen)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            async def chunks() -> AsyncIterator[dict]:
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
                async for out in _chain([head] if head else [], gen):
                    yield {**base, "choices": [{"index": 0, "delta": {"content": out.text},
                                                "logprobs": logprobs(out), "finish_reason": out.finish_reason}]}
                    if out.finished and include_usage:
                        yield {**base, "choices": [], "usage": usage(out.prompt_tokens, out.completion_tokens)}
            return sse(chunks())
        outs = ([head] if head else []) + await collect(request, gen, rid)
        merged = _merge(rid, outs)
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": merged.text},
                             "logprobs": logprobs(merged), "finish_reason": merged.finish_reason}],
                "usage": usage(merged.prompt_tokens, merged.completion_tokens)}

    @app.get("/admin/capacity")
    async def capacity(request: Request) -> dict:
        require_admin(request)
        return {"model": core.model_name, "kv_blocks_total": core.blocks.num_blocks,
                "kv_blocks_free": core.blocks.num_free, "kv_block_size": core.blocks.block_size,
                "kv_usage": round(core.blocks.usage(), 4), "adapter_slots_total": core.loras.max_loras,
                "adapter_slots_free": core.loras.free_slots(), "max_lora_rank": core.loras.max_rank,
                "running": len(core.scheduler.running), "waiting": len(core.scheduler.waiting),
                "max_model_len": core.max_model_len, "finetune_slots_total": core.finetune.max_active,
                "finetune_slots_free": core.finetune.slots_free(),
                "finetune_jobs": {s: sum(j.state.value == s for j in core.finetune.jobs.values())
                                  for s in ("queued", "running")},
                "load": round(core.last_step.duration_s / (cfg.tpot_slo_ms / 1000), 3),
                "tpot_slo_ms": cfg.tpot_slo_ms}

    @app.get("/admin/adapters")
    async def list_adapters(request: Request) -> dict:
        require_admin(request)
        return {"adapters": [info.to_dict() for _, info in sorted(core.loras.adapters.items())]}

    def adapter_or_404(name: str) -> dict:
        info = core.loras.adapters.get(name)
        if info is None:
            raise APIError(404, f"adapter {name!r} is not loaded", "name", kind="not_found_error")
        return info.to_dict()

    @app.get("/admin/adapters/{name}")
    async def get_adapter(name: str, request: Request) -> dict:
        require_admin(request)
        return adapter_or_404(name)

    @app.put("/admin/adapters/{name}")
    async def put_adapter(name: str, body: AdapterLoad, request: Request) -> dict:
        require_admin(request)
        if not ADAPTER_NAME.match(name) or name == core.model_name:
            raise APIError(400, "adapter name must be 1-63 letters, digits, '.', '_' or '-', start with a letter "
                                "or digit, and differ from the base model's name", "name")
        try:
            path = resolve_under(cfg.data_root, body.path)
        except PathError as exc:
            raise APIError(400, str(exc), "path") from exc
        if not path.is_dir():
            raise APIError(404, f"adapter folder {body.path!r} does not exist under the data root", "path",
                           kind="not_found_error")
        try:
            info = await engine.call(lambda: core.loras.load(name, path, body.path))
        except AdapterError as exc:
            status = 409 if "slots" in str(exc) else 400
            raise APIError(status, str(exc), "path" if status == 400 else None) from exc
        return info.to_dict()

    @app.delete("/admin/adapters/{name}")
    async def delete_adapter(name: str, request: Request) -> dict:
        require_admin(request)
        adapter_or_404(name)
        info = await engine.call(lambda: core.loras.unload(name))
        return info.to_dict()

    def job_or_404(job_id: str):
        job = core.finetune.jobs.get(job_id)
        if job is None:
            raise APIError(404, f"finetuning job {job_id!r} does not exist", "id", kind="not_found_error")
        return job

    async def submit(spec: JobSpec, replace: bool) -> dict:
        try:
            core.finetune.check_new(spec, replace)
            job = await asyncio.to_thread(build_job, core, spec)
            await engine.call(lambda: core.finetune.add(job, replace))
        except JobError as exc:
            raise APIError(exc.status, str(exc), exc.param,
                           kind="service_unavailable_error" if exc.status == 503 else "invalid_request_error") from exc
        return job.progress()

    @app.post("/admin/finetune/jobs", status_code=201)
    async def create_job(spec: JobSpec, request: Request) -> dict:
        require_admin(request)
        return await submit(spec, bool(spec.resume_from))

    @app.post("/admin/finetune/jobs/{job_id}/resume")
    async def resume_job(job_id: str, request: Request) -> dict:
        """Continue a stopped (interrupted, cancelled or failed) job from its newest verified checkpoint."""
        require_admin(request)
        job_or_404(job_id)
        try:
            spec = await asyncio.to_thread(core.finetune.resume_spec, job_id)
        except JobError as exc:
            raise APIError(exc.status, str(exc), exc.param) from exc
        return await submit(spec, True)

    @app.get("/admin/finetune/jobs")
    async def list_jobs(request: Request) -> dict:
        require_admin(request)
        return {"jobs": [j.progress() for j in list(core.finetune.jobs.values())]}

    @app.get("/admin/finetune/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> dict:
        require_admin(request)
        return job_or_404(job_id).progress()

    @app.delete("/admin/finetune/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request, checkpoint: bool = False) -> dict:
        """Cancel; `?checkpoint=true` first saves the last finished step, so the job can resume from it."""
        require_admin(request)
        job_or_404(job_id)
        return (await engine.call(lambda: core.finetune.cancel(job_id, checkpoint))).progress()

    return app


async def _chain(head: list[RequestOutput], rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        for out in head:
            yield out
        async for out in rest:
            yield out
    finally:
        await rest.aclose()


def _merge(rid: str, outs: list[RequestOutput]) -> RequestOutput:
    """Join a request's deltas into one answer."""
    last = outs[-1]
    return RequestOutput(rid, "".join(o.text for o in outs), [t for o in outs for t in o.token_ids],
                         [lp for o in outs for lp in o.logprobs], True, last.finish_reason,
                         last.prompt_tokens, last.completion_tokens)


def load_token(token_file: str | None, env_value: str | None) -> str | None:
    """The admin token from a file (stripped) or the environment; None disables the admin API."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"admin token file {token_file} is empty")
        return token
    return env_value or None
