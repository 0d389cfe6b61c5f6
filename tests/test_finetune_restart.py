"""Nothing trained is lost across engine restarts, on real `coserve serve` processes sharing one data root:
SIGTERM checkpoints a running job and its record says `interrupted`; kill -9 leaves the last record, and
half-written checkpoints are never used; after a restart both jobs are listed with their checkpoints and hashes,
and resuming ends exactly where an uninterrupted run does."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from coserve_testlib import rel_err, write_task
from coserve.engine.finetune.checkpoint import sha256_file
from server_proc import EngineProcess

TOKEN = "restart-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STEPS = 80


def body(job_id: str, checkpoint_every: int) -> dict:
    return {"id": job_id, "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "training": {"lr": 0.003, "epochs": STEPS // 4, "chunk_tokens": 8, "seed": 5},
            "output": f"adapters/{job_id}", "checkpoint_every": checkpoint_every}


def start(data: Path, llama_dir: Path) -> EngineProcess:
    return EngineProcess(llama_dir, data, TOKEN, "--num-kv-blocks", "64", "--shutdown-grace", "10")


def job(server: EngineProcess, job_id: str) -> dict:
    r = httpx.get(f"{server.url}/admin/finetune/jobs/{job_id}", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def wait(server: EngineProcess, job_id: str, until, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not until(state := job(server, job_id)):
        assert time.monotonic() < deadline, state
        time.sleep(0.01)
    return state


def final(data: Path, state: dict) -> tuple[dict, list[float]]:
    path = data / state["checkpoints"][-1]["path"]
    return (load_file(str(path / "adapter_model.safetensors")),
            json.loads((path / "trainer_state.json").read_text())["losses"])


def assert_same_training(data: Path, resumed: dict, straight: dict) -> None:
    weights, losses = final(data, resumed)
    ref_weights, ref_losses = final(data, straight)
    assert resumed["step"] == straight["step"] == STEPS
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for key, value in ref_weights.items():
        assert rel_err(weights[key], value) <= 1e-4, key


def assert_hashes_match(data: Path, state: dict) -> None:
    assert state["checkpoints"]
    for c in state["checkpoints"]:
        assert sha256_file(data / c["path"] / "adapter_model.safetensors") == c["sha256"], c


@pytest.fixture(scope="module")
def setup(llama_dir, tmp_path_factory):
    """A data root, an uninterrupted reference run, and the engine that trained it (still up)."""
    data = tmp_path_factory.mktemp("restart")
    write_task(data)
    server = start(data, llama_dir)
    r = httpx.post(server.url + "/admin/finetune/jobs", json=body("straight", 1000), headers=AUTH)
    assert r.status_code == 201, r.text
    straight = wait(server, "straight", lambda j: j["state"] == "succeeded")
    yield {"data": data, "server": server, "straight": straight}
    if server.alive():
        server.stop()


def test_sigterm_checkpoints_a_running_job_and_resuming_matches_an_uninterrupted_run(setup, llama_dir):
    data, server = setup["data"], setup["server"]
    r = httpx.post(server.url + "/admin/finetune/jobs", json=body("term", 1000), headers=AUTH)
    assert r.status_code == 201, r.text
    wait(server, "term", lambda j: j["step"] >= 20)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log.read_text()
    record = json.loads((data / "adapters/term/job.json").read_text())
    step = record["step"]
    assert record["state"] == "interrupted" and 20 <= step < STEPS
    assert [c["step"] for c in record["checkpoints"]] == [step]   # written by the shutdown (every 1000 steps)

    again = start(data, llama_dir)
    try:
        listed = {j["id"]: j for j in httpx.get(again.url + "/admin/finetune/jobs", headers=AUTH).json()["jobs"]}
        assert listed["straight"]["state"] == "succeeded"
        assert listed["straight"]["checkpoints"] == setup["straight"]["checkpoints"]
        term = listed["term"]
        assert term["state"] == "interrupted" and term["step"] == step and "shut down" in term["error"]
        assert term["checkpoints"] == record["checkpoints"]
        assert_hashes_match(data, term)
        r = httpx.post(again.url + "/admin/finetune/jobs/term/resume", headers=AUTH)
        assert r.status_code == 200 and r.json()["step"] == step, r.text
        assert r.json()["resumed_from"] == f"adapters/term/checkpoint-{step}"
        done = wait(again, "term", lambda j: j["state"] == "succeeded")
        assert_same_training(data, done, setup["straight"])
        assert httpx.post(again.url + "/admin/finetune/jobs/term/resume", headers=AUTH).status_code == 409
    finally:
        again.stop()


def test_kill_9_keeps_the_record_and_never_uses_a_half_written_checkpoint(setup, llama_dir):
    data = setup["data"]
    first = start(data, llama_dir)
    r = httpx.post(first.url + "/admin/finetune/jobs", json=body("killed", 10), headers=AUTH)
    assert r.status_code == 201, r.text
    wait(first, "killed", lambda j: j["step"] >= 25)
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)
    output = data / "adapters/killed"
    recorded = json.loads((output / "job.json").read_text())
    torn = output / f".tmp-checkpoint-{STEPS - 1}-{first.proc.pid}"   # what a kill mid-write leaves
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 100)

    again = start(data, llama_dir)
    try:
        killed = job(again, "killed")
        assert killed["state"] == "interrupted" and "without a clean shutdown" in killed["error"]
        assert killed["step"] == recorded["step"] >= 20 and killed["checkpoints"] == recorded["checkpoints"]
        assert all(c["step"] % 10 == 0 for c in killed["checkpoints"])
        assert_hashes_match(data, killed)
        assert not torn.exists()
        r = httpx.post(again.url + "/admin/finetune/jobs/killed/resume", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["resumed_from"] == killed["checkpoints"][-1]["path"]
        done = wait(again, "killed", lambda j: j["state"] == "succeeded")
        assert_same_training(data, done, setup["straight"])
        assert len(done["checkpoints"]) <= 5 + 2   # the default save_total_limit, plus the best and the final
    finally:
        again.stop()
