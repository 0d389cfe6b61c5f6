"""The finetuning job API on a live `coserve serve` process: create, progress, checkpoints served by name while
training continues, cancel, and every bad request answered 4xx naming the field."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from server_proc import EngineProcess
from coserve_testlib import write_task

TOKEN = "ft-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def job_body(job_id: str, **over) -> dict:
    body = {"id": job_id, "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
            "training": {"lr": 0.01, "epochs": 12, "chunk_tokens": 8, "seed": 3}, "output": f"adapters/{job_id}",
            "checkpoint_every": 8}
    body.update(over)
    return body


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("ftdata")
    write_task(data)
    (data / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    (data / "broken.jsonl").write_text('{"text": "fine"}\n\n{"text": oops}\n')
    (data / "latin1.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (data / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": "a\\ud800b"}\n')
    proc = EngineProcess(llama_dir, data, TOKEN, "--num-kv-blocks", "128", "--tpot-slo-ms", "200")
    yield proc
    proc.stop()


def wait_job(server, job_id: str, until, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = httpx.get(f"{server.url}/admin/finetune/jobs/{job_id}", headers=AUTH).json()
        if until(job) or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_job_trains_while_serving_and_its_checkpoint_serves_by_name(server):
    r = httpx.post(server.url + "/admin/finetune/jobs", json=job_body("teach"), headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["state"] in ("queued", "running") and r.json()["total_steps"] == 48
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    job = wait_job(server, "teach", lambda j: j["checkpoints"])
    ckpt = job["checkpoints"][0]
    assert ckpt["step"] == 8 and len(ckpt["sha256"]) == 64 and ckpt["path"] == "adapters/teach/checkpoint-8"
    r = httpx.put(server.url + "/admin/adapters/teach-early", json={"path": ckpt["path"]}, headers=AUTH)
    assert r.status_code == 200
    served = client.completions.create(model="teach-early", prompt="Monday, Tuesday,", max_tokens=3, temperature=0)
    assert served.choices[0].text is not None
    job = wait_job(server, "teach", lambda j: j["state"] == "succeeded")
    assert job["state"] == "succeeded" and job["step"] == 48 and job["loss"] < 0.5
    assert job["tokens_per_s"] > 0 and job["activation_bytes_per_token"] > 0
    final = job["checkpoints"][-1]["path"]
    assert httpx.put(server.url + "/admin/adapters/teach", json={"path": final}, headers=AUTH).status_code == 200
    out = client.completions.create(model="teach", prompt="Question: what is the capital of France? Answer:",
                                    max_tokens=6, temperature=0)
    assert out.choices[0].text == " Paris" and out.choices[0].finish_reason == "stop"
    base = client.completions.create(model="tiny", prompt="Question: what is the capital of France? Answer:",
                                     max_tokens=6, temperature=0)
    assert not base.choices[0].text.startswith(" Paris")
    listed = httpx.get(server.url + "/admin/finetune/jobs", headers=AUTH).json()["jobs"]
    assert "teach" in [j["id"] for j in listed]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'coserve_finetune_step{job="teach"} 48.0' in metrics and 'coserve_tokens_total{kind="finetune"}' in metrics


def test_cancel_keeps_checkpoints_and_can_checkpoint_first(server):
    body = job_body("stop-me", checkpoint_every=1000, training={"lr": 0.01, "epochs": 50, "chunk_tokens": 8})
    assert httpx.post(server.url + "/admin/finetune/jobs", json=body, headers=AUTH).status_code == 201
    wait_job(server, "stop-me", lambda j: j["step"] >= 2)
    r = httpx.delete(server.url + "/admin/finetune/jobs/stop-me?checkpoint=true", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    ckpts = r.json()["checkpoints"]
    assert [c["step"] for c in ckpts] == [r.json()["step"]]
    assert ckpts and all(httpx.put(server.url + "/admin/adapters/kept", json={"path": c["path"]},
                                   headers=AUTH).status_code == 200 for c in ckpts)
    cap = httpx.get(server.url + "/admin/capacity", headers=AUTH).json()
    assert cap["finetune_jobs"]["running"] == 0 and cap["finetune_slots_free"] == cap["finetune_slots_total"]


@pytest.mark.parametrize("over, status, param, text", [
    ({"dataset": {"path": "bad.jsonl", "format": "prompt_completion"}}, 400, "dataset.path", "line 2"),
    ({"dataset": {"path": "broken.jsonl", "format": "text"}}, 400, "dataset.path", "line 3"),
    ({"lora": {"r": 0}}, 400, "lora.r", "greater than or equal to 1"),
    ({"lora": {"r": 8, "target_modules": ["qkv_proj"]}}, 400, "lora.target_modules", "qkv_proj"),
    ({"output": "../elsewhere"}, 400, "output", "escapes the data root"),
    ({"dataset": {"path": "task.jsonl", "format": "csv"}}, 400, "dataset.format", "text"),
    ({"training": {"lr": -1}}, 400, "training.lr", "greater than 0"),
    ({"id": "Bad Id!"}, 400, "id", "lowercase"),
    ({"init_from": "a", "resume_from": "b"}, 400, None, "not both"),
    ({"lora": {"r": 8, "dropout": 1.0}}, 400, "lora.dropout", "less than 1"),
    ({"dataset": {"path": "latin1.jsonl", "format": "text"}}, 400, "dataset.path", "line 2: not valid UTF-8"),
    ({"dataset": {"path": "surrogate.jsonl", "format": "text"}}, 400, "dataset.path", "line 3"),
    ({"training": {"lr": float("inf")}}, 400, "training.lr", "finite"),
    ({"training": {"lr": float("nan")}}, 400, "training.lr", "finite"),
    ({"training": {"lr": 50.0}}, 400, "training.lr", "less than or equal to 10"),
    ({"lora": {"r": 8, "alpha": float("inf")}}, 400, "lora.alpha", "finite"),
    ({"lora": {"r": 300}}, 400, "lora.r", "less than or equal to 256"),
    ({"training": {"betas": [0.9, 1.0]}}, 400, "training.betas.1", "less than 1"),
    ({"training": {"eps": 0}}, 400, "training.eps", "greater than 0"),
    ({"training": {"max_grad_norm": 0}}, 400, "training.max_grad_norm", "greater than 0"),
    ({"training": {"weight_decay": -0.1}}, 400, "training.weight_decay", "greater than or equal to 0"),
    ({"training": {"seed": -1}}, 400, "training.seed", "greater than or equal to 0"),
    ({"save_total_limit": 0}, 400, "save_total_limit", "greater than or equal to 1"),
])
def test_bad_job_requests_name_the_field(server, over, status, param, text):
    body = json.dumps(job_body("bad-job", **over))   # NaN and Infinity as Python's json writes them
    r = httpx.post(server.url + "/admin/finetune/jobs", content=body,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and text in err["message"]
    assert server.alive()


def test_an_lr_of_1e999_is_refused_not_trained(server):
    body = json.dumps(job_body("huge-lr")).replace('"lr": 0.01', '"lr": 1e999')
    r = httpx.post(server.url + "/admin/finetune/jobs", content=body,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "training.lr", r.text
    assert httpx.get(server.url + "/admin/finetune/jobs/huge-lr", headers=AUTH).status_code == 404


def test_duplicate_id_is_a_conflict_and_auth_is_required(server):
    assert httpx.post(server.url + "/admin/finetune/jobs", json=job_body("dup")).status_code == 401
    body = job_body("dup", training={"epochs": 1})
    assert httpx.post(server.url + "/admin/finetune/jobs", json=body, headers=AUTH).status_code == 201
    r = httpx.post(server.url + "/admin/finetune/jobs", json=body, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["param"] == "id"
    assert httpx.get(server.url + "/admin/finetune/jobs/none", headers=AUTH).status_code == 404
