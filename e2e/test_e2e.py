"""Scenarios on a real API server: apply, Ready, serve; a finetune job to Succeeded with a following endpoint;
bad manifests refused by the API server; the operator works with the chart's RBAC, not cluster-admin."""
from __future__ import annotations

import copy
import ssl
import time

import httpx
import kubernetes
import openai
import pytest

from harness import GROUP, NS, VERSION, custom, ready, wait_for









def create(api, plural: str, body: dict) -> None:
    custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, plural, body)


def table(api, plural: str) -> dict:
    """What `kubectl get` shows: the server-side table with the printer columns."""
    cfg = api.configuration
    r = httpx.get(f"{cfg.host}/apis/{GROUP}/{VERSION}/namespaces/{NS}/{plural}",
                  verify=ssl.create_default_context(cafile=cfg.ssl_ca_cert),
                  headers={"Authorization": cfg.api_key["BearerToken"],
                           "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
    return r.json()


def test_endpoint_becomes_ready_and_its_url_serves(api, pool):
    create(api, "inferenceendpoints", {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceEndpoint",
                                       "metadata": {"name": "chat"},
                                       "spec": {"pool": pool, "replicas": 2, "adapter": {"path": "adapters/qv"}}})
    obj = wait_for(api, "inferenceendpoints", "chat", ready)
    status = obj["status"]
    assert status["readyReplicas"] == 2 and status["observedGeneration"] == obj["metadata"]["generation"]
    client = openai.OpenAI(base_url=status["url"], api_key="x", max_retries=0)
    out = client.completions.create(model="chat", prompt="Hello", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens > 0
    t = table(api, "inferenceendpoints")
    columns = [c["name"] for c in t["columnDefinitions"]]
    row = dict(zip(columns, t["rows"][0]["cells"]))
    assert row["Pool"] == pool and row["Ready"] == "2/2" and row["URL"] == status["url"] and row["Status"] == "True"


def test_finetune_job_succeeds_and_a_following_endpoint_serves_it(api, pool):
    create(api, "finetunejobs", {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FinetuneJob",
                                 "metadata": {"name": "teach"},
                                 "spec": {"pool": pool, "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
                                          "lora": {"r": 8, "alpha": 16,
                                                   "targetModules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
                                          "training": {"lr": 0.01, "epochs": 12, "seed": 3, "chunkTokens": 8},
                                          "checkpointEvery": 8}})
    create(api, "inferenceendpoints", {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceEndpoint",
                                       "metadata": {"name": "taught"},
                                       "spec": {"pool": pool, "adapter": {"fromFinetuneJob": {"name": "teach"}}}})
    running = wait_for(api, "finetunejobs", "teach", lambda s: s.get("phase") in ("Running", "Succeeded"))
    assert running["status"]["placement"]["engine"] in ("e0", "e1")
    done = wait_for(api, "finetunejobs", "teach", lambda s: s.get("phase") == "Succeeded", timeout=300)
    st = done["status"]
    assert st["stepText"] == "48/48" and [c["step"] for c in st["checkpoints"]] == [8, 16, 24, 32, 40, 48]
    assert st["progress"]["percentage"] == 100
    ep = wait_for(api, "inferenceendpoints", "taught",
                  lambda s: ready(s) and s.get("adapterPath", "").endswith("checkpoint-48"))
    client = openai.OpenAI(base_url=ep["status"]["url"], api_key="x", max_retries=0)
    out = client.completions.create(model="taught", prompt="Monday, Tuesday,", max_tokens=6, temperature=0)
    assert out.choices[0].text == " Wednesday"
    row = table(api, "finetunejobs")["rows"][0]["cells"]
    assert "Succeeded" in row and 100 in row


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


def test_deleting_an_endpoint_unloads_its_adapter(api, engines, pool):
    custom(api).delete_namespaced_custom_object(GROUP, VERSION, NS, "inferenceendpoints", "chat")
    deadline = time.monotonic() + 60
    headers = {"Authorization": "Bearer e2e-engine-token"}
    while time.monotonic() < deadline:
        names = [a["name"] for e in engines
                 for a in httpx.get(e.url + "/admin/adapters", headers=headers).json()["adapters"]]
        if "chat" not in names:
            return
        time.sleep(0.5)
    raise AssertionError("the adapter is still loaded")
