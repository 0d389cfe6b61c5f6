"""The operator's reconcilers driven against real engine processes on loopback (two engines sharing one data
root, as pool pods share a volume): placement, status, hot reload, re-placement, suspend, release."""
from __future__ import annotations

import asyncio
import copy
import shutil

import httpx
import pytest

from coserve.operator.conditions import status_diff
from coserve.operator.engine_client import EngineClient, EngineRejected
from coserve.operator.handlers import serve_endpoint
from coserve.operator.reconcile import (PoolView, duration_text, reconcile_endpoint, reconcile_job,
                                        release_endpoint, release_job)
from argocd_health import argocd_health
from coserve_testlib import ADAPTERS, make_peft_adapter, write_task
from server_proc import EngineProcess

TOKEN = "op-token"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def data_root(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pooldata")
    write_task(root)
    make_peft_adapter(llama_dir, root / "adapters" / "qv", 0, **ADAPTERS["qv-r4"])
    return root


@pytest.fixture(scope="module")
def engines(llama_dir, data_root):
    procs = [EngineProcess(llama_dir, data_root, TOKEN, "--num-kv-blocks", "128") for _ in range(2)]
    yield procs
    for p in procs:
        p.stop()


def pool_of(procs) -> PoolView:
    return PoolView("ns", "pool", {f"e{i}": p.url for i, p in enumerate(procs)}, EngineClient(TOKEN, 3.0))


def endpoint(name: str, replicas: int, adapter: dict | None, generation: int = 1) -> dict:
    spec = {"pool": "pool", "replicas": replicas}
    if adapter:
        spec["adapter"] = adapter
    return {"metadata": {"name": name, "namespace": "ns", "generation": generation}, "spec": spec, "status": {}}


def job(name: str, **spec) -> dict:
    base = {"pool": "pool", "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
            "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
            "training": {"lr": 0.01, "epochs": 12, "seed": 3, "chunkTokens": 8}, "checkpointEvery": 8}
    base.update(spec)
    return {"metadata": {"name": name, "namespace": "ns", "generation": 1}, "spec": base, "status": {}}


def adapters_on(proc) -> list[str]:
    r = httpx.get(proc.url + "/admin/adapters", headers={"Authorization": f"Bearer {TOKEN}"})
    return [a["name"] for a in r.json()["adapters"]]


def cond(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def health(body: dict, status: dict) -> str:
    """What Argo CD's health check (charts/coserve/argocd) makes of the object with this status."""
    kind = "FinetuneJob" if "dataset" in body["spec"] else "InferenceEndpoint"
    return argocd_health(kind, {**body, "status": status})["status"]


def test_endpoint_is_placed_on_distinct_engines_and_is_idempotent(engines):
    pool = pool_of(engines)
    body = endpoint("chat", 2, {"path": "adapters/qv"})
    status, events = run(reconcile_endpoint(body, pool, None))
    assert status["readyReplicas"] == 2 and status["readyReplicasText"] == "2/2" and status["replicas"] == 2
    assert {p["engine"] for p in status["placements"]} == {"e0", "e1"}
    assert cond(status, "Ready")["status"] == "True" and status["url"].endswith("/v1")
    assert [e[1] for e in events].count("AdapterLoaded") == 2
    assert all("chat" in adapters_on(p) for p in engines)
    assert health(body, status) == "Healthy"
    body["status"] = copy.deepcopy(status)
    again, events = run(reconcile_endpoint(body, pool, None))
    assert events == [] and status_diff(body["status"], again) == {}
    body["spec"]["replicas"] = 1
    body["metadata"]["generation"] = 2
    assert health(body, body["status"]) == "Progressing"   # the spec change is not reconciled yet
    scaled, events = run(reconcile_endpoint(body, pool, None))
    assert scaled["readyReplicas"] == 1 and scaled["replicas"] == 1 and "ScaledDown" in [e[1] for e in events]
    assert sum("chat" in adapters_on(p) for p in engines) == 1
    events, unreached = run(release_endpoint({**body, "status": scaled}, pool))
    assert unreached == [] and [e[1] for e in events] == ["Released"]
    assert not any("chat" in adapters_on(p) for p in engines)


def test_release_reports_engines_that_did_not_answer():
    gone = PoolView("ns", "pool", {"gone": "http://127.0.0.1:9"}, EngineClient(TOKEN, 1.0))
    body = endpoint("chat", 1, {"path": "adapters/qv"})
    body["status"] = {"placements": [{"engine": "gone", "url": "http://127.0.0.1:9", "state": "Loaded"}]}
    events, unreached = run(release_endpoint(body, gone))
    assert unreached == ["gone"] and events[0][:2] == ("Warning", "ReleaseIncomplete")
    body = job("lost")
    body["status"] = {"placement": {"engine": "gone", "url": "http://127.0.0.1:9", "engineJobId": "ns.lost.0"}}
    events, unreached = run(release_job(body, gone))
    assert unreached == ["gone"] and events[0][:2] == ("Warning", "ReleaseIncomplete")


def test_bad_adapter_path_is_reported_in_status_and_events(engines):
    status, events = run(reconcile_endpoint(endpoint("broken", 1, {"path": "task.jsonl"}), pool_of(engines), None))
    ready = cond(status, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "AdapterLoadFailed"
    assert ("Warning", "AdapterLoadFailed") in [(e[0], e[1]) for e in events]
    assert status["lastFailure"]["engine"] in ("e0", "e1")
    assert health(endpoint("broken", 1, {"path": "task.jsonl"}), status) == "Degraded"


def test_base_model_endpoint_needs_no_adapter(engines):
    status, _ = run(reconcile_endpoint(endpoint("base", 2, None), pool_of(engines), None))
    assert status["readyReplicas"] == 2 and status["adapterPath"] == "" and status["model"] == "tiny"
    r = httpx.post(status["url"] + "/completions", json={"model": status["model"], "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_job_trains_to_success_and_a_following_endpoint_hot_reloads(engines, data_root):
    pool = pool_of(engines)
    body = job("teach")
    follower = endpoint("follow", 1, {"fromFinetuneJob": {"name": "teach", "checkpoint": "latest"}})
    status, events = run(reconcile_job(body, pool))
    assert status["phase"] == "Running" and status["placement"]["engine"] in ("e0", "e1")
    assert "Placed" in [e[1] for e in events]
    waiting, _ = run(reconcile_endpoint(follower, pool, status))
    assert cond(waiting, "Ready")["reason"] in ("WaitingForAdapter", "AdapterLoaded")
    assert health(body, status) == "Progressing"
    seen_paths, reloads, etas = set(), 0, []
    for _ in range(600):
        body["status"] = status
        status, events = run(reconcile_job(body, pool))
        if status.get("phase") == "Running" and status["etaText"]:
            etas.append((status["progress"]["estimatedRemainingSeconds"], status["etaText"]))
            assert status["progressText"] == f"{status['progress']['progressPercentage']}%"
        if status.get("checkpoints"):
            follower_status, ev = run(reconcile_endpoint(follower, pool, {**body["status"], **status}))
            follower["status"] = follower_status
            seen_paths.add(follower_status["adapterPath"])
            reloads += [e[1] for e in ev].count("AdapterReloaded")
        if status.get("phase") == "Succeeded":
            break
        run(asyncio.sleep(0.05))
    assert status["phase"] == "Succeeded" and status["stepText"] == "48/48"
    assert status["progress"]["progressPercentage"] == 100 and status["progressText"] == "100%"
    assert status["progress"]["estimatedRemainingSeconds"] == 0 and etas   # the ETA column showed while it ran
    assert all(seconds >= 0 and text == duration_text(seconds) for seconds, text in etas)
    # six written; the engine's retention (save_total_limit 5) deleted the first, and status follows it
    assert [c["step"] for c in status["checkpoints"]] == [16, 24, 32, 40, 48]
    assert not (data_root / "adapters/ns/teach/checkpoint-8").exists()
    assert status["latestCheckpoint"] == "adapters/ns/teach/checkpoint-48"
    assert cond(status, "Succeeded")["status"] == "True" and health(body, status) == "Healthy"
    assert len(seen_paths) >= 2 and reloads >= 1
    final, _ = run(reconcile_endpoint(follower, pool, {**body["status"], **status}))
    assert final["adapterPath"] == "adapters/ns/teach/checkpoint-48"
    r = httpx.post(final["url"] + "/completions", json={"model": "follow", "max_tokens": 6, "temperature": 0,
                                                        "prompt": "Monday, Tuesday,"})
    assert r.json()["choices"][0]["text"] == " Wednesday"


def test_invalid_job_fails_with_the_engines_reason(engines):
    status, events = run(reconcile_job(job("bad", dataset={"path": "missing.jsonl"}), pool_of(engines)))
    assert status["phase"] == "Failed"
    failed = cond(status, "Failed")
    assert failed["reason"] == "InvalidSpec" and "dataset.path" in failed["message"]
    assert ("Warning", "InvalidSpec") in [(e[0], e[1]) for e in events]
    assert health(job("bad"), status) == "Degraded"


def test_suspend_checkpoints_and_resume_continues(engines):
    pool = pool_of(engines)
    body = job("pause", checkpointEvery=1000)
    status, _ = run(reconcile_job(body, pool))
    while status.get("progress", {}).get("currentStep", 0) < 3:
        body["status"] = status
        status, _ = run(reconcile_job(body, pool))
    body["status"], body["spec"]["suspend"] = status, True
    status, events = run(reconcile_job(body, pool))
    assert status["phase"] == "Suspended" and status["placement"] is None
    assert status["checkpoints"] and "Suspended" in [e[1] for e in events]
    assert health(body, status) == "Suspended"
    step = status["checkpoints"][-1]["step"]
    body["status"], body["spec"]["suspend"] = {**body["status"], **status}, False
    status, events = run(reconcile_job(body, pool))
    assert status["phase"] == "Running" and status["attempt"] == 1
    assert any("resuming from" in e[2] for e in events)
    assert status["progress"]["currentStep"] >= step
    run(release_job({**body, "status": status}, pool))


def test_job_on_a_dead_engine_resumes_elsewhere_from_its_checkpoint(llama_dir, data_root):
    procs = [EngineProcess(llama_dir, data_root, TOKEN, "--num-kv-blocks", "128") for _ in range(2)]
    try:
        pool = pool_of(procs)
        body = job("survivor", checkpointEvery=4, training={"lr": 0.01, "epochs": 40, "chunkTokens": 8})
        status, _ = run(reconcile_job(body, pool))
        while not status.get("checkpoints"):
            body["status"] = status
            status, _ = run(reconcile_job(body, pool))
        first = status["placement"]["engine"]
        procs[int(first[1])].stop()
        body["status"] = status
        status, events = run(reconcile_job(body, pool))
        assert status.get("placement") and status["placement"]["engine"] != first, (status, events)
        assert status["phase"] == "Running"
        assert "EngineLost" in [e[1] for e in events] and status["lastFailure"]["engine"] == first
        resumed_from = max(c["step"] for c in body["status"]["checkpoints"])
        assert status["progress"]["currentStep"] >= resumed_from
        run(release_job({**body, "status": status}, pool))
    finally:
        for p in procs:
            p.stop()
    shutil.rmtree(data_root / "adapters" / "ns" / "survivor", ignore_errors=True)


def test_job_interrupted_by_an_engine_restart_resumes_from_its_checkpoint(llama_dir, data_root):
    """SIGTERM checkpoints the job and the restarted engine lists it `interrupted`: a new attempt resumes it."""
    proc = EngineProcess(llama_dir, data_root, TOKEN, "--num-kv-blocks", "128")
    try:
        body = job("restarted", checkpointEvery=4, training={"lr": 0.01, "epochs": 40, "chunkTokens": 8})
        status, _ = run(reconcile_job(body, pool_of([proc])))
        while not status.get("checkpoints"):
            body["status"] = status
            status, _ = run(reconcile_job(body, pool_of([proc])))
        first_id = status["placement"]["engineJobId"]
        proc.stop()
        proc = EngineProcess(llama_dir, data_root, TOKEN, "--num-kv-blocks", "128", port=proc.port)
        body["status"] = status
        status, events = run(reconcile_job(body, pool_of([proc])))
        assert "EngineRestarted" in [e[1] for e in events], events
        assert status["phase"] == "Running" and status["placement"]["engineJobId"] != first_id
        assert status["progress"]["currentStep"] >= max(c["step"] for c in body["status"]["checkpoints"])
        run(release_job({**body, "status": status}, pool_of([proc])))
    finally:
        proc.stop()
    shutil.rmtree(data_root / "adapters" / "ns" / "restarted", ignore_errors=True)


def test_active_deadline_stops_the_job_after_a_checkpoint(engines):
    pool = pool_of(engines)
    body = job("late", activeDeadlineSeconds=1, checkpointEvery=1000,
               training={"lr": 0.01, "epochs": 200, "chunkTokens": 8})
    status, _ = run(reconcile_job(body, pool))
    run(asyncio.sleep(2.2))
    body["status"] = status
    status, events = run(reconcile_job(body, pool))
    assert status["phase"] == "Failed" and cond(status, "Failed")["reason"] == "DeadlineExceeded"
    assert status["checkpoints"] and status["checkpoints"][-1]["loss"] > 0
    assert "DeadlineExceeded" in [e[1] for e in events]


def byo_pool(procs) -> dict:
    return {"metadata": {"name": "pool", "namespace": "ns"},
            "spec": {"model": {"path": "m"}, "engines": [{"name": f"e{i}", "url": p.url} for i, p in enumerate(procs)]}}


def test_an_endpoint_following_a_job_without_a_checkpoint_waits_with_a_status_and_one_event(engines):
    """Issue 9: on a pool whose engines get no Service (loopback), this pass raised KeyError: 'url'."""
    body = endpoint("follow", 1, {"fromFinetuneJob": {"name": "teach", "checkpoint": "latest"}})
    body["metadata"]["uid"] = "uid-follow"
    status, events = run(serve_endpoint(body, byo_pool(engines), pool_of(engines), {"phase": "Running"}))
    assert status["url"] == "" and status["readyReplicasText"] == "0/1"
    assert cond(status, "Ready")["reason"] == "WaitingForAdapter"
    assert events == [("Normal", "WaitingForAdapter", "the job has no checkpoint yet")]
    assert health(body, status) == "Progressing"


def test_status_fields_that_are_missing_or_malformed_are_not_trusted(engines):
    """Status written by hand or by an older operator: entries lacking their keys are placed again, never a
    KeyError (which would stop the object's reconciliation)."""
    pool = pool_of(engines)
    body = endpoint("odd", 1, {"path": "adapters/qv"})
    body["metadata"]["uid"] = "uid-odd"
    body["status"] = {"placements": [{"url": "http://gone"}, "junk"], "conditions": [{"type": "Ready"}]}
    status, _ = run(serve_endpoint(body, byo_pool(engines), pool, None))
    assert status["readyReplicas"] == 1 and status["url"].endswith("/v1")
    run(release_endpoint({**body, "status": status}, pool))
    follower = endpoint("odd-follow", 1, {"fromFinetuneJob": {"name": "j", "checkpoint": "latest"}})
    waiting, _ = run(reconcile_endpoint(follower, pool, {"checkpoints": [{"step": 3}, None]}))
    assert cond(waiting, "Ready")["reason"] == "WaitingForAdapter"
    body = job("odd-job")
    body["status"] = {"phase": "Running", "placement": {"engine": "e0"}, "checkpoints": [{"step": 3}],
                      "startTime": "yesterday"}
    status, events = run(reconcile_job(body, pool))
    assert status["phase"] == "Running" and status["placement"]["engineJobId"]
    assert status["checkpoints"] == [] and "Placed" in [e[1] for e in events]
    run(release_job({**body, "status": status}, pool))


def test_a_pool_listing_something_that_is_not_an_engine_is_refused_not_a_crash(tmp_path):
    """A careless pool: its URL answers 200 with a list, or with HTML. The engine is not ready; nothing raises."""
    import http.server
    import threading

    class NotAnEngine(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"[]" if "capacity" in self.path else b"<html>hello</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotAnEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        pool = PoolView("ns", "pool", {"odd": url}, EngineClient(TOKEN, 3.0))
        assert run(pool.capacities()) == {"odd": None}
        status, _ = run(reconcile_endpoint(endpoint("e", 1, None), pool, None))
        assert cond(status, "Ready")["reason"] == "NoCapacity"
        with pytest.raises(EngineRejected, match="not a JSON object"):
            run(pool.client.get_adapter(url, "x"))
    finally:
        server.shutdown()
