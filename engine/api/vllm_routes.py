"""vLLM's own routes beside the OpenAI API, for clients and controllers written for vLLM (inference-gateway
LoRA syncers, AIBrix, benchmark scripts): runtime adapter loading behind the admin token, tokenize/detokenize
and the server version."""
from __future__ import annotations

import asyncio
import importlib.metadata

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from coserve.engine.api.adapters import AdapterOps
from coserve.engine.api.admin_routes import body_schema, parse_body
from coserve.engine.api.auth import admin_auth
from coserve.engine.api.chat import ChatEncoder, ChatTemplateError
from coserve.engine.api.errors import APIError
from coserve.engine.api.limits import require_json
from coserve.engine.async_engine import AsyncEngine
from coserve.engine.protocol import DetokenizeRequest, LoadLoRAAdapterRequest, TokenizeRequest, UnloadLoRAAdapterRequest


def server_version() -> str:
    try:
        return importlib.metadata.version("coserve")
    except importlib.metadata.PackageNotFoundError:   # run from a source tree that was never installed
        return "0.0.0+unknown"


def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. BOS), learnt from a probe, so that
    `add_special_tokens` can wrap an already tokenized chat prompt as the tokenizer would wrap its text."""
    bare = list(tokenizer("a", add_special_tokens=False).input_ids)
    full = list(tokenizer("a", add_special_tokens=True).input_ids)
    for at in range(len(full) - len(bare) + 1):
        if full[at:at + len(bare)] == bare:
            return full[:at], full[at + len(bare):]
    return [], []


def vllm_adapter_router(engine: AsyncEngine) -> APIRouter:
    """`/v1/load_lora_adapter` and `/v1/unload_lora_adapter`: the admin API's adapter loads under vLLM's names
    and bodies. Success answers plain text with 200, as vLLM does; refusals are OpenAI-shaped errors."""
    adapters = AdapterOps(engine)
    router = APIRouter(prefix="/v1", dependencies=[Depends(admin_auth(engine.engine.config.admin_token))])

    @router.post("/load_lora_adapter", response_class=PlainTextResponse,
                 openapi_extra=body_schema(LoadLoRAAdapterRequest))
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        body = await parse_body(request, LoadLoRAAdapterRequest)
        if body.lora_name in engine.engine.loras.adapters and not body.load_inplace:
            raise APIError(400, f"the adapter {body.lora_name!r} is already loaded; send load_inplace: true to "
                                "replace it", "lora_name")
        await adapters.load(body.lora_name, body.lora_path, "lora_name", "lora_path", absolute_ok=True)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' loaded.")

    @router.post("/unload_lora_adapter", response_class=PlainTextResponse,
                 openapi_extra=body_schema(UnloadLoRAAdapterRequest))
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        body = await parse_body(request, UnloadLoRAAdapterRequest)
        await adapters.unload(body.lora_name, "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' unloaded.")

    return router


def vllm_tools_router(engine: AsyncEngine, chat_encoder: ChatEncoder | None, max_chars: int) -> APIRouter:
    """`/tokenize`, `/detokenize` and `/version`, open like the OpenAI API. Tokenizing runs on a worker thread
    and prompts are bounded in characters first, as for completions."""
    core = engine.engine
    tokenizer = core.tokenizer
    vocab = core.model_config.vocab_size
    wrap = special_wrap(tokenizer)
    router = APIRouter(dependencies=[Depends(require_json)])

    def check_model(name: str | None) -> None:
        if name is not None and name != core.model_name and name not in core.loras.adapters:
            raise APIError(404, f"the model {name!r} does not exist; GET /v1/models lists the served models",
                           "model")

    def check_chars(chars: int, param: str) -> None:
        if chars > max_chars:
            raise APIError(400, f"the prompt has {chars} characters; this server takes at most {max_chars} "
                                "(--max-prompt-chars)", param)

    @router.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        """Token ids of a prompt or of chat messages, as generation would see them by default."""
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", "prompt")
        special = req.add_special_tokens
        if req.prompt is not None:
            check_chars(len(req.prompt), "prompt")
            ids = await asyncio.to_thread(
                lambda: list(tokenizer(req.prompt, add_special_tokens=special).input_ids))
        else:
            if chat_encoder is None:
                raise APIError(400, "this model's tokenizer has no chat template; send a prompt", "messages")
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            check_chars(sum(len(m["content"]) for m in messages), "messages")
            try:
                ids = await asyncio.to_thread(chat_encoder.encode, messages, req.add_generation_prompt)
            except ChatTemplateError as exc:
                raise APIError(400, str(exc), "messages") from exc
            if special:
                ids = wrap[0] + ids + wrap[1]
        answer = {"count": len(ids), "max_model_len": core.max_model_len, "tokens": ids}
        if req.return_token_strs:
            answer["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return answer

    @router.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        check_model(req.model)
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"tokens must be ids in [0, {vocab})", "tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, req.tokens)}

    @router.get("/version")
    async def version() -> dict:
        return {"version": server_version()}

    return router
