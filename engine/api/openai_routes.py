"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions (streamed or not). Prompts are
bounded in characters before tokenizing, and tokenized on worker threads so the event loop keeps answering."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from coserve.engine.api.chat import ChatEncoder, ChatTemplateError
from coserve.engine.api.errors import APIError, error_body
from coserve.engine.api.limits import require_json
from coserve.engine.async_engine import AsyncEngine, EngineFailure
from coserve.engine.engine import RequestError
from coserve.engine.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from coserve.engine.sampling import SamplingParams
from coserve.engine.sequence import RequestOutput

log = logging.getLogger("coserve.api")
PROMPT_CHARS_PER_TOKEN = 8   # the default prompt limit in characters: this many per token of the context


def max_prompt_chars(engine: AsyncEngine) -> int:
    """The longest prompt taken, in characters, checked before tokenizing (--max-prompt-chars)."""
    core = engine.engine
    return core.config.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * core.max_model_len


def openai_router(engine: AsyncEngine, chat_encoder: ChatEncoder | None) -> APIRouter:
    core = engine.engine
    tokenizer = core.tokenizer
    vocab = core.model_config.vocab_size
    max_chars = max_prompt_chars(engine)
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_json)])

    @router.get("/models")
    async def models() -> dict:
        """Served names only: `root` is the served name, as vLLM answers, never a server path."""
        created = int(time.time())
        data = [{"id": core.model_name, "object": "model", "created": created, "owned_by": "coserve",
                 "root": core.model_name, "parent": None, "max_model_len": core.max_model_len}]
        for name in sorted(core.loras.adapters):
            data.append({"id": name, "object": "model", "created": created, "owned_by": "coserve",
                         "root": name, "parent": core.model_name, "max_model_len": core.max_model_len})
        return {"object": "list", "data": data}

    def resolve_model(name: str) -> str | None:
        if name == core.model_name:
            return None
        if name in core.loras.adapters:
            return name
        raise APIError(404, f"the model {name!r} does not exist; GET /v1/models lists the served models", "model")

    def check_chars(chars: int, param: str) -> None:
        if chars > max_chars:
            raise APIError(400, f"the prompt has {chars} characters; this server takes at most {max_chars} "
                                "(--max-prompt-chars)", param)

    def sampling_params(req: SamplingFields, max_tokens: int | None, prompt_len: int, logprobs: bool,
                        prompt_param: str) -> SamplingParams:
        room = core.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context is {core.max_model_len} tokens "
                                "including the completion", prompt_param)
        bad = [t for t in req.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"stop_token_ids {bad[:8]} are outside the vocabulary [0, {vocab})",
                           "stop_token_ids")
        return SamplingParams(max_tokens=min(max_tokens or room, room), temperature=req.effective_temperature(),
                              top_k=req.effective_top_k(), top_p=req.top_p, seed=req.seed, stop=req.stop_list(),
                              stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs)

    async def prompt_ids(req: CompletionRequest) -> tuple[list[int], str | list[int]]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            check_chars(len(prompt), "prompt")
            ids = await asyncio.to_thread(lambda: list(tokenizer(prompt, add_special_tokens=False).input_ids))
        else:
            ids = list(prompt)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        return ids, prompt

    async def run(rid: str, ids: list[int], params: SamplingParams,
                  adapter: str | None) -> AsyncIterator[RequestOutput]:
        """Engine deltas for one request, with TTFT/TPOT observed and engine errors mapped to API errors."""
        start = time.monotonic()
        first: float | None = None
        count = 0
        try:
            async for out in engine.generate(rid, ids, params, adapter):
                if out.error:   # this request alone failed (e.g. its logits were not finite); the batch went on
                    raise APIError(500, out.error, kind="server_error")
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
            raise APIError(exc.code, str(exc), exc.param) from exc
        except EngineFailure as exc:
            raise APIError(500, str(exc), kind="server_error") from exc

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

    async def first_output(gen: AsyncIterator[RequestOutput]) -> RequestOutput | None:
        """Pull the first delta before answering, so refusals become a plain 4xx rather than a broken stream."""
        try:
            return await gen.__anext__()
        except StopAsyncIteration:
            return None

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        adapter = resolve_model(req.model)
        ids, prompt = await prompt_ids(req)
        params = sampling_params(req, req.max_tokens, len(ids), req.logprobs is not None, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = ""
        if req.echo:
            echo = prompt if isinstance(prompt, str) else await asyncio.to_thread(tokenizer.decode, ids)

        def choice(text: str, out: RequestOutput) -> dict:
            lp = None
            if req.logprobs is not None:
                lp = {"tokens": [tokenizer.decode([t]) for t in out.token_ids], "token_logprobs": out.logprobs,
                      "top_logprobs": None, "text_offset": None}
            return {"index": 0, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}

        gen = run(rid, ids, params, adapter)
        head = await first_output(gen)
        if req.stream:
            async def chunks() -> AsyncIterator[dict]:
                first = True
                async for out in _chain([head] if head else [], gen):
                    text = (echo if first else "") + out.text
                    first = False
                    yield {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                           "choices": [choice(text, out)]}
                    if out.finished and req.include_usage():
                        yield {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                               "choices": [], "usage": usage(out.prompt_tokens, out.completion_tokens)}
            return sse(chunks())
        outs = ([head] if head else []) + await collect(request, gen, rid)
        merged = RequestOutput.join(outs)
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [choice(echo + merged.text, merged)],
                "usage": usage(merged.prompt_tokens, merged.completion_tokens)}

    @router.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        adapter = resolve_model(req.model)
        if chat_encoder is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        check_chars(sum(len(m["content"]) for m in messages), "messages")
        try:
            ids = await asyncio.to_thread(chat_encoder.encode, messages)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), "messages") from exc
        params = sampling_params(req, req.max_completion_tokens or req.max_tokens, len(ids), req.logprobs,
                                 "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(out: RequestOutput) -> dict | None:
            if not req.logprobs:
                return None
            return {"content": [{"token": tokenizer.decode([t]), "logprob": lp, "bytes": None, "top_logprobs": []}
                                for t, lp in zip(out.token_ids, out.logprobs)]}

        gen = run(rid, ids, params, adapter)
        head = await first_output(gen)
        if req.stream:
            async def chunks() -> AsyncIterator[dict]:
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
                async for out in _chain([head] if head else [], gen):
                    yield {**base, "choices": [{"index": 0, "delta": {"content": out.text},
                                                "logprobs": logprobs(out), "finish_reason": out.finish_reason}]}
                    if out.finished and req.include_usage():
                        yield {**base, "choices": [], "usage": usage(out.prompt_tokens, out.completion_tokens)}
            return sse(chunks())
        outs = ([head] if head else []) + await collect(request, gen, rid)
        merged = RequestOutput.join(outs)
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": merged.text},
                             "logprobs": logprobs(merged), "finish_reason": merged.finish_reason}],
                "usage": usage(merged.prompt_tokens, merged.completion_tokens)}

    return router


def sse(payloads: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events; a stream cut by an error still ends with an error event and `[DONE]`."""
    async def body() -> AsyncIterator[str]:
        try:
            async for p in payloads:
                yield f"data: {json.dumps(p)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(error_body(exc.message, exc.kind, exc.param, exc.status))}\n\n"
        except Exception:
            log.exception("stream failed")
            yield f"data: {json.dumps(error_body('internal server error', 'server_error', None, 500))}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _chain(head: list[RequestOutput], rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    try:
        for out in head:
            yield out
        async for out in rest:
            yield out
    finally:
        await rest.aclose()
