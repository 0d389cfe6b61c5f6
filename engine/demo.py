"""The main job on the embedded default: one engine serves inference requests while a LoRA finetuning job
trains in the same iterations; progress bars show both, and at the end the freshly trained adapter answers
the taught prompts where the base model does not."""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import socket
import threading
import time
from importlib import resources
from pathlib import Path

import httpx
from tqdm import tqdm

from coserve.engine.config import EngineConfig
from coserve.engine.demo_model import write_tiny_model

MODEL_NAME = "tiny-llama"
BACKGROUND_PROMPTS = ["The scheduler admits", "Hello, world! How are", "A GPU spends most of", "Adapters are small"]


def _serve_in_thread(config: EngineConfig):
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
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread, engine


async def _complete(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0})
    r.raise_for_status()
    return r.json()


async def _inference_load(client: httpx.AsyncClient, stop: asyncio.Event, counter: dict) -> None:
    """Keep a few requests in flight against the base model while the job trains."""
    i = 0
    while not stop.is_set():
        body = await _complete(client, MODEL_NAME, BACKGROUND_PROMPTS[i % len(BACKGROUND_PROMPTS)], 16)
        counter["tokens"] += body["usage"]["completion_tokens"]
        i += 1


async def _drive(url: str, token: str, task: list[dict]) -> None:
    admin = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        print("\nstreaming from the base model:")
        print(f"  {BACKGROUND_PROMPTS[0]!r} ->", end=" ", flush=True)
        async with client.stream("POST", "/v1/completions", json={
                "model": MODEL_NAME, "prompt": BACKGROUND_PROMPTS[0], "max_tokens": 16, "temperature": 0.8,
                "seed": 7, "stream": True}) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    print(json.loads(line[6:])["choices"][0]["text"], end="", flush=True)
        print()

        job = {"id": "demo-job", "dataset": {"path": "demo_task.jsonl", "format": "prompt_completion"},
               "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
               "training": {"lr": 0.01, "epochs": 12, "seed": 3, "chunk_tokens": 8},
               "output": "adapters/demo-job", "checkpoint_every": 20}
        r = await client.post("/admin/finetune/jobs", json=job, headers=admin)
        r.raise_for_status()
        total = r.json()["total_steps"]
        print(f"\nfinetuning job demo-job: LoRA r=8 on {len(task)} taught answers, {total} steps, while the "
              "base model keeps serving requests in the same engine iterations")
        stop, counter = asyncio.Event(), {"tokens": 0}
        load = [asyncio.create_task(_inference_load(client, stop, counter)) for _ in range(3)]
        start = time.monotonic()
        seen: set[int] = set()
        with tqdm(total=total, desc="finetune", unit="step", dynamic_ncols=True) as bar:
            while True:
                state = (await client.get("/admin/finetune/jobs/demo-job", headers=admin)).json()
                bar.update(state["step"] - bar.n)
                elapsed = max(1e-6, time.monotonic() - start)
                bar.set_postfix(loss=f"{state['loss'] or 0:.3f}", ft_tok_s=f"{state['tokens_per_s']:.0f}",
                                inf_tok_s=f"{counter['tokens'] / elapsed:.0f}")
                for c in state["checkpoints"]:
                    if c["step"] not in seen:
                        seen.add(c["step"])
                        bar.write(f"  checkpoint written: {c['path']} (sha256 {c['sha256'][:12]}…)")
                if state["state"] not in ("queued", "running"):
                    break
                await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*load)
        if state["state"] != "succeeded":
            raise RuntimeError(f"the demo job ended {state['state']}: {state['error']}")
        print(f"trained {state['tokens']} tokens at {state['tokens_per_s']:.0f} tokens/s while serving "
              f"{counter['tokens']} inference tokens; final loss {state['loss']:.4f}")

        final = state["checkpoints"][-1]["path"]
        r = await client.put("/admin/adapters/demo-job", json={"path": final}, headers=admin)
        r.raise_for_status()
        print(f"\nloaded {final} as model 'demo-job'; the same prompts, greedy:")
        for row in task:
            base = await _complete(client, MODEL_NAME, row["prompt"], 6)
            tuned = await _complete(client, "demo-job", row["prompt"], 6)
            print(f"  {row['prompt']!r}\n    base     -> {base['choices'][0]['text']!r}\n"
                  f"    demo-job -> {tuned['choices'][0]['text']!r}   (taught: {row['completion']!r})")


def run_demo(workdir: Path) -> int:
    """Build what is missing under `workdir`, serve and train together, show the result, and stop."""
    model_dir, data_root = workdir / "model", workdir / "data"
    if not (model_dir / "config.json").is_file():
        print(f"building the tiny default model in {model_dir} ...")
        write_tiny_model(model_dir)
    data_root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(data_root / "adapters" / "demo-job", ignore_errors=True)
    dataset = resources.files("coserve.engine").joinpath("data/demo_task.jsonl").read_text()
    (data_root / "demo_task.jsonl").write_text(dataset)
    task = [json.loads(line) for line in dataset.splitlines() if line.strip()]
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("coserve").setLevel(logging.WARNING)   # the demo's own lines tell the job's story
    token = secrets.token_urlsafe(16)
    config = EngineConfig(model=str(model_dir), data_root=str(data_root), admin_token=token, num_kv_blocks=256,
                          served_model_name=MODEL_NAME)
    url, server, thread, engine = _serve_in_thread(config)
    print(f"engine serving {MODEL_NAME} at {url} (cost model: {engine.engine.cost.to_dict()})")
    try:
        asyncio.run(_drive(url, token, task))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()
    return 0
