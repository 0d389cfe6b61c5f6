"""Scenarios on a real API server: apply, Ready, serve; a finetune job to Succeeded with a following endpoint;
bad manifests refused by the API server; the operator works with the chart's RBAC, not cluster-admin."""
from __future__ import annotations

import copy
import json
import re
import signal
import time

import httpx
import kubernetes
import openai
import pytest

from argocd_health import argocd_health
from harness import GROUP, NS, VERSION, custom, get, kubectl, ready, slice_backends, wait_for


def create(api, plural: str, body: dict) -> None:
    custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, plural, body)


def apply(kubeconfig: str, body: dict) -> None:
    kubectl(kubeconfig, "apply", "-n", NS, "-f", "-", stdin=json.dumps(body))


def kubectl_get(kubeconfig: str, plural: str) -> list[dict[str, str]]:
    """`kubectl get` as a user reads it: one dict per row, keyed by the column headers."""
    lines = kubectl(kubeconfig, "get", plural, "-n", NS).stdout.splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(header, re.split(r"\s{2,}", line.strip()))) for line in lines[1:]]


def describe(kubeconfig: str, kind: str, name: str) -> tuple[str, list[tuple[str, str, str]]]:
    """`kubectl describe` as a user reads it: the whole text, and its Events table as (type, reason, message)."""
    text = kubectl(kubeconfig, "describe", kind, name, "-n", NS).stdout
    table = text.split("\nEvents:", 1)[1].splitlines()[3:]   # after the header and its underline
    rows = [re.split(r"\s{2,}", line.strip()) for line in table]
    return text, [(cols[0], cols[1], cols[-1]) for cols in rows if len(cols) >= 5]


def squeeze(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text)


def test_endpoint_becomes_ready_behind_its_service(api, cluster, engines, pool):
    kubeconfig, _ = cluster
    apply(kubeconfig, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceEndpoint", "metadata": {"name": "chat"},
                       "spec": {"pool": pool, "replicas": 2, "adapter": {"path": "adapters/qv"}}})
    obj = wait_for(api, "inferenceendpoints", "chat", ready)
    status = obj["status"]
    assert status["readyReplicas"] == 2 and status["observedGeneration"] == obj["metadata"]["generation"]
    assert status["url"] == f"http://chat.{NS}.svc.cluster.local/v1"
    service = kubernetes.client.CoreV1Api(api).read_namespaced_service("chat", NS)
    assert [o.uid for o in service.metadata.owner_references] == [obj["metadata"]["uid"]]
    backends = slice_backends(api, "chat")
    assert backends == sorted((e.url, True) for e in engines)
    for base, _ in backends:   # each address the Service routes to serves the endpoint's adapter
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        out = client.completions.create(model="chat", prompt="Hello", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens > 0
    row = next(r for r in kubectl_get(kubeconfig, "inferenceendpoints") if r["NAME"] == "chat")
    assert row["POOL"] == pool and row["READY"] == "2/2" and row["URL"] == status["url"] and row["STATUS"] == "True"
    assert argocd_health("InferenceEndpoint", obj)["status"] == "Healthy"
    assert argocd_health("CoServingPool", get(api, "coservingpools", pool))["status"] == "Healthy"


def test_finetune_job_succeeds_and_a_following_endpoint_serves_it(api, cluster, pool):
    kubeconfig, _ = cluster
    apply(kubeconfig, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FinetuneJob", "metadata": {"name": "teach"},
                       "spec": {"pool": pool, "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
                                "lora": {"r": 8, "alpha": 16,
                                         "targetModules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
                                "training": {"lr": 0.01, "epochs": 12, "seed": 3, "chunkTokens": 8},
                                "checkpointEvery": 8}})
    apply(kubeconfig, {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceEndpoint", "metadata": {"name": "taught"},
                       "spec": {"pool": pool, "replicas": 1, "adapter": {"fromFinetuneJob": {"name": "teach"}}}})
    running = wait_for(api, "finetunejobs", "teach", lambda s: 0 < s.get("progress", {}).get("currentStep", 0) < 48
                       and s.get("etaText"))
    assert running["status"]["placement"]["engine"] in ("e0", "e1")
    assert running["status"]["progress"]["estimatedRemainingSeconds"] >= 0
    row = next(r for r in kubectl_get(kubeconfig, "finetunejobs") if r["NAME"] == "teach")
    assert row["PHASE"] in ("Running", "Succeeded") and re.fullmatch(r"\d+/48", row["STEP"])
    assert re.fullmatch(r"\d+%", row["PROGRESS"]) and re.fullmatch(r"(\d+[dhms])+", row["ETA"])
    done = wait_for(api, "finetunejobs", "teach", lambda s: s.get("phase") == "Succeeded", timeout=300)
    st = done["status"]
    assert st["stepText"] == "48/48" and st["progress"]["progressPercentage"] == 100
    steps = kubectl(kubeconfig, "get", "finetunejob", "teach", "-n", NS, "-o",
                    "jsonpath={.status.checkpoints[*].step}").stdout.split()
    assert steps == ["16", "24", "32", "40", "48"]   # six written; the engine keeps the last five (+ best, final)
    ep = wait_for(api, "inferenceendpoints", "taught",
                  lambda s: ready(s) and s.get("adapterPath", "").endswith("checkpoint-48"))
    [(base, _)] = slice_backends(api, "taught")
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    out = client.completions.create(model="taught", prompt="Monday, Tuesday,", max_tokens=6, temperature=0)
    assert out.choices[0].text == " Wednesday"
    row = next(r for r in kubectl_get(kubeconfig, "finetunejobs") if r["NAME"] == "teach")
    assert row["PHASE"] == "Succeeded" and row["PROGRESS"] == "100%" and row["ETA"] == "0s"
    assert row["LATEST"] == st["latestCheckpoint"]
    assert ep["status"]["adapterPath"] == st["latestCheckpoint"]


def test_kubectl_describe_tells_each_objects_story(cluster, pool):
    """Conditions with a reason and a message, then the Events in the order things happened."""
    kubeconfig, _ = cluster
    text, events = describe(kubeconfig, "finetunejob", "teach")
    for line in ("Reason: Completed", "Type: Succeeded", "Message: training finished", "Progress Percentage: 100"):
        assert line in squeeze(text), line
    reasons = [r for _, r, _ in events]
    assert reasons[0] == "Placed" and "CheckpointWritten" in reasons and "Completed" in reasons
    done = reasons.index("Completed")
    # kubectl orders Events by time to the second: a checkpoint listed after the end was posted in the same second
    assert all(events[i][0] == events[done][0] for i in range(done + 1, len(events))), events
    assert all(t == "Normal" for t, _, _ in events)
    assert any(m.startswith("training on engine e") for _, r, m in events if r == "Placed")
    text, events = describe(kubeconfig, "inferenceendpoint", "taught")
    assert "Reason: AdapterLoaded" in squeeze(text) and "Type: Ready" in squeeze(text)
    reasons = [r for _, r, _ in events]
    assert reasons[0] == "WaitingForAdapter" and "AdapterLoaded" in reasons
    text, _ = describe(kubeconfig, "coservingpool", pool)
    assert "Reason: EnginesReady" in squeeze(text) and "Message: 2/2 engines answer" in squeeze(text)


BAD = [
    ({"lora": {"r": 0}}, "spec.lora.r"),
    ({"dataset": {"path": "../x.jsonl"}}, "dataset.path must be relative"),
    ({"dataset": {"path": "d.jsonl", "format": "csv"}}, "spec.dataset.format"),
    ({"lora": {"targetModules": ["qkv"]}}, "spec.lora.targetModules[0]"),
    ({"output": "/abs"}, "output must be relative"),
]


@pytest.mark.parametrize("change, message", BAD)
def test_api_server_refuses_bad_jobs_naming_the_field(api, crds, namespaces, change, message):
    spec = {"pool": "pool", "dataset": {"path": "task.jsonl"}}
    for k, v in change.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    with pytest.raises(kubernetes.client.ApiException) as err:
        create(api, "finetunejobs", {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FinetuneJob",
                                     "metadata": {"name": "bad"}, "spec": spec})
    assert err.value.status == 422 and message in err.value.body


def test_both_adapter_sources_and_immutable_pool_are_refused(api, pool):
    with pytest.raises(kubernetes.client.ApiException) as err:
        create(api, "inferenceendpoints", {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceEndpoint",
                                           "metadata": {"name": "two"},
                                           "spec": {"pool": pool, "adapter": {"path": "a",
                                                                              "fromFinetuneJob": {"name": "j"}}}})
    assert err.value.status == 422 and "exactly one" in err.value.body
    obj = custom(api).get_namespaced_custom_object(GROUP, VERSION, NS, "inferenceendpoints", "chat")
    changed = copy.deepcopy(obj)
    changed["spec"]["pool"] = "elsewhere"
    with pytest.raises(kubernetes.client.ApiException) as err:
        custom(api).replace_namespaced_custom_object(GROUP, VERSION, NS, "inferenceendpoints", "chat", changed)
    assert "pool is immutable" in err.value.body


def test_engines_refuse_admin_calls_without_the_pools_token(engines):
    assert httpx.get(engines[0].url + "/admin/capacity").status_code == 401


def test_deleting_an_endpoint_unloads_its_adapter_retrying_an_engine_that_paused(api, engines, pool):
    """Engine 0 is frozen (SIGSTOP) when the endpoint is deleted: the first release times out, kopf retries
    with backoff, and once the engine answers again the release completes on both engines."""
    engines[0].proc.send_signal(signal.SIGSTOP)
    try:
        custom(api).delete_namespaced_custom_object(GROUP, VERSION, NS, "inferenceendpoints", "chat")
        time.sleep(4)   # longer than the operator's engine timeout: the first attempt has failed by now
    finally:
        engines[0].proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while True:   # the finalizer holds the object until the release is done or given up
        try:
            custom(api).get_namespaced_custom_object(GROUP, VERSION, NS, "inferenceendpoints", "chat")
        except kubernetes.client.ApiException as exc:
            assert exc.status == 404
            break
        assert time.monotonic() < deadline, "the endpoint was never released"
        time.sleep(0.5)
    headers = {"Authorization": "Bearer e2e-engine-token"}
    assert not any(a["name"] == "chat" for e in engines
                   for a in httpx.get(e.url + "/admin/adapters", headers=headers).json()["adapters"])
    reasons = {e.reason for e in kubernetes.client.CoreV1Api(api).list_namespaced_event(
        NS, field_selector="involvedObject.name=chat").items}
    assert "Released" in reasons and "ReleaseIncomplete" not in reasons   # the retry reached the engine
