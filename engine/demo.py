"""The main job on the embedded default: build the tiny model, serve it with a LoRA adapter beside the base
model, and drive it over HTTP with concurrent requests (one of them streamed)."""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
from pathlib import Path

import httpx
import torch

from coserve.engine.config import EngineConfig
from coserve.engine.demo_model import write_tiny_model
from coserve.engine.lora import write_adapter
from coserve.engine.model.config import ModelConfig

PROMPTS = ["The scheduler admits", "Hello, world! How are", "A GPU spends most of", "Adapters are small"]


def demo_adapter(model_dir: Path, out_dir: Path, rank: int = 8, seed: int = 1) -> Path:
    """A seeded random LoRA on q/v/down projections, written in PEFT format."""
    cfg = ModelConfig.from_dir(model_dir)
    g = torch.Generator().manual_seed(seed)
    sizes = {"self_attn.q_proj": (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
             "self_attn.v_proj": (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim),
             "mlp.down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    weights = {}
    for layer in range(cfg.num_layers):
        for name, (fan_in, fan_out) in sizes.items():
            weights[f"model.layers.{layer}.{name}"] = (torch.randn(rank, fan_in, generator=g) * 0.3,
                                                       torch.randn(fan_out, rank, generator=g) * 0.3)
    return write_adapter(out_dir, weights, rank, 2.0 * rank, str(model_dir))


def _serve_in_thread(config: EngineConfig) -> tuple[str, "object", threading.Thread, object]:
    import uvicorn

    from coserve.engine.async_engine import AsyncEngine
    from coserve.engine.engine import LLMEngine
    from coserve.engine.server import create_app

    engine = AsyncEngine(LLMEngine(config))
    engine.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return url, server, thread, engine


async def _drive(url: str, token: str, n: int) -> None:
    admin = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        r = await client.put("/admin/adapters/demo-lora", json={"path": "adapters/demo-lora"}, headers=admin)
        r.raise_for_status()
        print(f"loaded adapter demo-lora (rank {r.json()['rank']}) through the admin API")
        models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        print(f"served models: {models}")

        print("\nstreaming from the base model:")
        async with client.stream("POST", "/v1/completions", json={
                "model": models[0], "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0.8, "seed": 7,
                "stream": True}) as resp:
            print(f"  {PROMPTS[0]!r} ->", end=" ", flush=True)
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    print(json.loads(line[6:])["choices"][0]["text"], end="", flush=True)
        print()

        print(f"\n{n} concurrent requests, base and adapter mixed in one batch:")
        start = time.perf_counter()
        jobs = []
        for i in range(n):
            model = models[0] if i % 2 == 0 else "demo-lora"
            jobs.append(client.post("/v1/completions", json={
                "model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 32, "temperature": 0}))
        answers = await asyncio.gather(*jobs)
        elapsed = time.perf_counter() - start
        tokens = 0
        for i, r in enumerate(answers):
            body = r.json()
            tokens += body["usage"]["completion_tokens"]
            print(f"  [{body['model']:>12}] {PROMPTS[i % len(PROMPTS)]!r} -> {body['choices'][0]['text']!r}")
        print(f"\n{tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.0f} tokens/s on this machine)")
        metrics = (await client.get("/metrics")).text
        ttft = [ln for ln in metrics.splitlines() if ln.startswith("coserve_time_to_first_token_seconds_count")]
        print(f"metrics: {ttft[0] if ttft else 'no TTFT samples'}")


def run_demo(workdir: Path, requests: int = 8) -> int:
    """Build what is missing under `workdir`, serve, drive, and stop."""
    model_dir, data_root = workdir / "model", workdir / "data"
    if not (model_dir / "config.json").is_file():
        print(f"building the tiny default model in {model_dir} ...")
        write_tiny_model(model_dir)
    adapter_dir = data_root / "adapters" / "demo-lora"
    if not (adapter_dir / "adapter_config.json").is_file():
        demo_adapter(model_dir, adapter_dir)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    token = secrets.token_urlsafe(16)
    config = EngineConfig(model=str(model_dir), data_root=str(data_root), admin_token=token, num_kv_blocks=256,
                          served_model_name="tiny-llama")
    url, server, thread, engine = _serve_in_thread(config)
    print(f"engine serving tiny-llama at {url}")
    try:
        asyncio.run(_drive(url, token, requests))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()
    return 0
