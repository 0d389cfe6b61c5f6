"""The engine's HTTP app in-process (FastAPI's TestClient) over a real tiny engine and AsyncEngine thread, for
checks that need to reach inside the process (injected faults, config variants); live ones use server_proc."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from coserve.engine.async_engine import AsyncEngine
from coserve.engine.config import EngineConfig
from coserve.engine.cost_model import CostModel
from coserve.engine.engine import LLMEngine
from coserve.engine.lora import write_adapter
from coserve.engine.server import create_app

TOKEN = "api-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FIXED_COST = CostModel(fwd_fixed_s=0.001, fwd_per_token_s=1e-5, unit_fixed_s=0.001, unit_per_token_s=1e-5)


@contextmanager
def api_client(model_dir: Path, data_root: Path, **config) -> Iterator[TestClient]:
    """A TestClient whose 500s come back as answers (as a real client sees them), not as raised errors."""
    settings = {"num_kv_blocks": 64, "max_model_len": 256, "admin_token": TOKEN, "served_model_name": "tiny"}
    settings.update(config)
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(model_dir), data_root=str(data_root), **settings),
                                   FIXED_COST))
    engine.start()
    try:
        with TestClient(create_app(engine), raise_server_exceptions=False) as client:
            yield client
    finally:
        engine.shutdown()


def engine_of(client: TestClient) -> AsyncEngine:
    return client.app.state.engine


def write_lora(model_dir: Path, out: Path, rank: int = 4, seed: int = 0, **config) -> Path:
    """A small random PEFT adapter on q_proj/v_proj of the tiny model; `config` overrides adapter_config keys."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, out_f in (("q_proj", hidden), ("v_proj", kv)):
            weights[f"model.layers.{layer}.self_attn.{module}"] = (torch.randn(rank, hidden, generator=g) * 0.1,
                                                                  torch.randn(out_f, rank, generator=g) * 0.1)
    write_adapter(out, weights, rank, 2.0 * rank, str(model_dir))
    if config:
        path = out / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return out


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    """The answer has OpenAI's error shape with this status (and names `param`, when given)."""
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"] == status, err
    if param is not None:
        assert err["param"] == param, err
    return err
