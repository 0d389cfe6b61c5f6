"""The engine's FastAPI app: one router per API (health/metrics, OpenAI, vLLM's extras, admin), errors in
OpenAI's shape, request bodies bounded before parsing, and the interactive docs only when asked for (--enable-docs)."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from coserve.engine.api.admin_routes import admin_router
from coserve.engine.api.chat import ChatEncoder
from coserve.engine.api.errors import install_error_handlers
from coserve.engine.api.health_routes import health_router
from coserve.engine.api.limits import BodyLimit
from coserve.engine.api.openai_routes import max_prompt_chars, openai_router
from coserve.engine.api.vllm_routes import server_version, vllm_adapter_router, vllm_tools_router
from coserve.engine.async_engine import AsyncEngine
from coserve.engine.finetune.spec import JobSpec
from coserve.engine.protocol import AdapterLoad, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

# admin bodies, parsed after the token check
SELF_PARSED_BODIES = (AdapterLoad, JobSpec, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest)


def create_app(engine: AsyncEngine) -> FastAPI:
    core = engine.engine
    docs = core.config.enable_docs

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # Shutting down (SIGTERM/SIGINT): running jobs are checkpointed and marked interrupted on the engine
        # thread; wait for that within the grace period. The CLI's signal handler may have asked already.
        await asyncio.to_thread(core.finetune.wait_stopped, core.config.shutdown_grace_s)

    app = FastAPI(title="coserve engine", version=server_version(), docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None,
                  lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app)
    app.include_router(health_router(engine))
    tokenizer = core.tokenizer
    chat_encoder = ChatEncoder(tokenizer) if tokenizer.chat_template is not None else None
    app.include_router(openai_router(engine, chat_encoder))
    app.include_router(vllm_adapter_router(engine))
    app.include_router(vllm_tools_router(engine, chat_encoder, max_prompt_chars(engine)))
    app.include_router(admin_router(engine))
    app.add_middleware(BodyLimit, max_bytes=engine.engine.config.max_body_bytes)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in SELF_PARSED_BODIES:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
