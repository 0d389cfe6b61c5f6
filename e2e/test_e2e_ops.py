"""Operations on a real API server: the examples apply and a managed pool gets its owned objects; GitOps
re-apply changes nothing; the API server refuses a set of bad manifests naming the field; an engine dying
mid-job and an operator restart lose no more than one checkpoint interval and duplicate nothing."""
from __future__ import annotations

import copy
import json
import time

import httpx
import kubernetes
import pytest
import yaml

from argocd_health import argocd_health
from harness import GROUP, NS, ROOT, VERSION, byo_pool, custom, get, kubectl, ready, slice_backends, wait_for

PLURALS = {"CoServingPool": "coservingpools", "InferenceEndpoint": "inferenceendpoints",
           "FinetuneJob": "finetunejobs"}


def owners(obj) -> list[str]:
    return [o.uid for o in obj.metadata.owner_references]


def test_examples_apply_and_their_objects_are_made_and_owned(api, cluster, operator):
    kubeconfig, _ = cluster
    kubectl(kubeconfig, "apply", "-n", NS, "-f", "examples/")
    apps, core = kubernetes.client.AppsV1Api(api), kubernetes.client.CoreV1Api(api)
    deadline = time.monotonic() + 60
    while True:
        try:
            sts = apps.read_namespaced_stateful_set("llama-pool", NS)
            svc = core.read_namespaced_service("llama-pool", NS)
            secret = core.read_namespaced_secret("llama-pool-admin-token", NS)
            endpoint_svc = core.read_namespaced_service("llama-base", NS)
            break
        except kubernetes.client.ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    pool_uid = get(api, "coservingpools", "llama-pool")["metadata"]["uid"]
    for obj in (sts, svc, secret):
        assert owners(obj) == [pool_uid]
    assert sts.spec.replicas == 2 and svc.spec.cluster_ip == "None" and "token" in secret.data
    assert owners(endpoint_svc) == [get(api, "inferenceendpoints", "llama-base")["metadata"]["uid"]]
    assert endpoint_svc.spec.selector is None   # its EndpointSlices list the pods holding the adapter
    job = wait_for(api, "finetunejobs", "support-bot", lambda s: s.get("phase"))
    assert job["status"]["phase"] == "Pending"   # the pool's pods never start here: no kubelet
    listed = kubectl(kubeconfig, "get", "coserve", "-n", NS, "-o", "name").stdout.split()
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        assert f"{body['kind'].lower()}.{GROUP}/{body['metadata']['name']}" in listed
    kubectl(kubeconfig, "delete", "-n", NS, "-f", "examples/", "--timeout", "60s")


def test_gitops_reapply_changes_nothing_and_a_spec_change_is_reconciled(api, cluster, pool, tmp_path):
    kubeconfig, _ = cluster
    manifest = tmp_path / "gitops.yaml"
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceEndpoint", "metadata": {"name": "gitops"},
            "spec": {"pool": pool, "replicas": 2, "adapter": {"path": "adapters/qv"}}}
    manifest.write_text(json.dumps(body))
    kubectl(kubeconfig, "apply", "--server-side", "-n", NS, "-f", str(manifest))
    first = wait_for(api, "inferenceendpoints", "gitops", lambda s: ready(s) and s.get("readyReplicas") == 2)
    time.sleep(3)
    settled = get(api, "inferenceendpoints", "gitops")
    kubectl(kubeconfig, "apply", "--server-side", "-n", NS, "-f", str(manifest))
    time.sleep(3)   # three operator polls
    again = get(api, "inferenceendpoints", "gitops")
    assert again["metadata"]["generation"] == first["metadata"]["generation"]
    assert again["metadata"]["resourceVersion"] == settled["metadata"]["resourceVersion"], "status churned"
    assert again["status"]["placements"] == first["status"]["placements"]
    diff = kubectl(kubeconfig, "diff", "--server-side", "-n", NS, "-f", str(manifest), check=False)
    assert diff.returncode == 0 and diff.stdout == "", diff.stdout + diff.stderr
    body["spec"]["replicas"] = 1
    manifest.write_text(json.dumps(body))
    diff = kubectl(kubeconfig, "diff", "--server-side", "-n", NS, "-f", str(manifest), check=False)
    assert diff.returncode == 1 and "replicas: 1" in diff.stdout
    kubectl(kubeconfig, "apply", "--server-side", "-n", NS, "-f", str(manifest))
    scaled = wait_for(api, "inferenceendpoints", "gitops", lambda s: s.get("readyReplicas") == 1
                      and s.get("observedGeneration") == first["metadata"]["generation"] + 1)
    assert len(scaled["status"]["placements"]) == 1
    assert slice_backends(api, "gitops") == [(scaled["status"]["placements"][0]["url"], True)]
    body["spec"]["replicas"] = 0
    manifest.write_text(json.dumps(body))
    kubectl(kubeconfig, "apply", "--server-side", "-n", NS, "-f", str(manifest))
    wait_for(api, "inferenceendpoints", "gitops", lambda s: s.get("observedGeneration") == first["metadata"][
        "generation"] + 2 and not s.get("placements"))
    deadline = time.monotonic() + 30
    while slice_backends(api, "gitops"):   # the Service's slices follow: none left to route to
        assert time.monotonic() < deadline, slice_backends(api, "gitops")
        time.sleep(0.5)


def scale_of(kubeconfig: str, plural: str, name: str) -> dict:
    """The object's scale subresource, as an HPA reads it."""
    return json.loads(kubectl(kubeconfig, "get", plural, name, "-n", NS, "--subresource", "scale", "-o",
                              "json").stdout)


def test_kubectl_scale_moves_endpoints_and_managed_pools(api, cluster, pool):
    kubeconfig, _ = cluster
    kubectl(kubeconfig, "apply", "-n", NS, "-f", "-", stdin=json.dumps({
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceEndpoint", "metadata": {"name": "scaled"},
        "spec": {"pool": pool, "replicas": 1}}))
    wait_for(api, "inferenceendpoints", "scaled", lambda s: ready(s) and s.get("replicas") == 1)
    kubectl(kubeconfig, "scale", "-n", NS, "ie/scaled", "--replicas=3")
    wide = wait_for(api, "inferenceendpoints", "scaled", lambda s: s.get("readyReplicasText") == "2/3")
    placed = next(c for c in wide["status"]["conditions"] if c["type"] == "Placed")
    assert wide["status"]["replicas"] == 2 and placed["reason"] == "NoCapacity"   # the pool has two engines
    scale = scale_of(kubeconfig, "ie", "scaled")
    assert scale["spec"]["replicas"] == 3 and scale["status"]["replicas"] == 2
    assert scale["status"]["selector"] == f"app.kubernetes.io/name=coserve-engine,app.kubernetes.io/managed-by=" \
                                          f"coserve-operator,coserve.dev/pool={pool}"
    kubectl(kubeconfig, "scale", "-n", NS, "ie/scaled", "--replicas=1")
    narrow = wait_for(api, "inferenceendpoints", "scaled", lambda s: ready(s) and s.get("replicas") == 1
                      and s.get("readyReplicasText") == "1/1")
    assert len(narrow["status"]["placements"]) == 1
    kubectl(kubeconfig, "delete", "-n", NS, "ie/scaled", "--timeout", "60s")
    refused = kubectl(kubeconfig, "scale", "-n", NS, f"csp/{pool}", "--replicas=3", check=False)
    assert refused.returncode != 0   # engines you run yourself have no replicas to scale
    managed = yaml.safe_load((ROOT / "examples" / "01-pool.yaml").read_text())
    managed["metadata"]["name"] = "scaled-pool"
    kubectl(kubeconfig, "apply", "-n", NS, "-f", "-", stdin=json.dumps(managed))
    wait_for(api, "coservingpools", "scaled-pool", lambda s: s.get("replicas") == 2)
    kubectl(kubeconfig, "scale", "-n", NS, "csp/scaled-pool", "--replicas=3")
    wait_for(api, "coservingpools", "scaled-pool", lambda s: s.get("replicas") == 3 and s.get("readyEngines") == "0/3")
    apps = kubernetes.client.AppsV1Api(api)
    deadline = time.monotonic() + 30
    while apps.read_namespaced_stateful_set("scaled-pool", NS).spec.replicas != 3:
        assert time.monotonic() < deadline, "the StatefulSet did not follow the pool's scale"
        time.sleep(0.5)
    assert scale_of(kubeconfig, "csp", "scaled-pool")["status"]["selector"].endswith("coserve.dev/pool=scaled-pool")
    hpa = kubectl(kubeconfig, "apply", "-n", NS, "--dry-run=server", "-f", "examples/autoscaling/")
    assert "horizontalpodautoscaler.autoscaling/llama-pool created (server dry run)" in hpa.stdout
    kubectl(kubeconfig, "delete", "-n", NS, "csp/scaled-pool", "--timeout", "60s")


JOB = {"pool": "pool", "dataset": {"path": "task.jsonl", "format": "text"}}
ENDPOINT = {"pool": "pool"}
BAD = [
    ("FinetuneJob", {"lora": {"r": -2}}, "spec.lora.r"),
    ("FinetuneJob", {"lora": {"r": 512}}, "spec.lora.r"),
    ("FinetuneJob", {"lora": {"alpha": 0}}, "spec.lora.alpha"),
    ("FinetuneJob", {"lora": {"dropout": 1.5}}, "spec.lora.dropout"),
    ("FinetuneJob", {"training": {"optimizer": "lion"}}, "spec.training.optimizer"),
    ("FinetuneJob", {"training": {"epochs": 0}}, "spec.training.epochs"),
    ("FinetuneJob", {"training": {"lrSchedule": "step"}}, "spec.training.lrSchedule"),
    ("FinetuneJob", {"checkpointEvery": 0}, "spec.checkpointEvery"),
    ("FinetuneJob", {"dataset": None}, "spec.dataset"),
    ("FinetuneJob", {"initFrom": "../../etc"}, "initFrom must be relative"),
    ("InferenceEndpoint", {"adapter": {}}, "adapter needs exactly one"),
    ("InferenceEndpoint", {"adapter": {"path": "/abs/adapter"}}, "adapter.path must be relative"),
    ("InferenceEndpoint", {"adapter": {"fromFinetuneJob": {"name": "j", "checkpoint": "best"}}},
     "spec.adapter.fromFinetuneJob.checkpoint"),
    ("InferenceEndpoint", {"replicas": 100}, "spec.replicas"),
    ("InferenceEndpoint", {"servedModelName": "white space"}, "spec.servedModelName"),
    ("CoServingPool", {"model": {"path": "m"}}, "give exactly one of spec.engines"),
    ("CoServingPool", {"model": {"path": "../m"}, "engines": [{"name": "a", "url": "http://a"}]},
     "model.path must be relative"),
    ("CoServingPool", {"model": {"path": "m"}, "engines": [{"name": "a", "url": "ftp://a"}]},
     "spec.engines[0].url"),
    ("CoServingPool", {"model": {"path": "m"}, "engines": [{"name": "GPU_A", "url": "http://a"}]},
     "spec.engines[0].name"),
]


@pytest.mark.parametrize("kind, change, message", BAD, ids=[f"{k}-{m}" for k, _, m in BAD])
def test_api_server_refuses_bad_manifests(api, crds, namespaces, kind, change, message):
    spec = copy.deepcopy(JOB if kind == "FinetuneJob" else ENDPOINT if kind == "InferenceEndpoint" else {})
    for key, value in change.items():
        if value is None:
            spec.pop(key, None)
        elif isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    with pytest.raises(kubernetes.client.ApiException) as err:
        custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, PLURALS[kind], {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": "refused"}, "spec": spec})
    assert err.value.status == 422 and message in err.value.body, err.value.body


def test_engine_death_and_operator_restart_mid_job(api, cluster, namespaces, crds, operator, model_dirs, data_root):
    """A dedicated pool of two engines: kill the one training, restart the operator; the job resumes from
    its last checkpoint on the other engine and finishes, with one engine job per placement."""
    from server_proc import EngineProcess

    token = "fault-token"
    procs = [EngineProcess(model_dirs["llama"], data_root, token, "--num-kv-blocks", "128") for _ in range(2)]
    try:
        byo_pool(cluster[0], NS, "faulty", token, {f"f{i}": p.url for i, p in enumerate(procs)})
        custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, "finetunejobs", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "FinetuneJob", "metadata": {"name": "survivor"},
            "spec": {"pool": "faulty", "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
                     "lora": {"r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
                     "training": {"lr": 0.01, "epochs": 150, "chunkTokens": 8}, "checkpointEvery": 20}})
        job = wait_for(api, "finetunejobs", "survivor", lambda s: len(s.get("checkpoints") or []) >= 1)
        first = job["status"]["placement"]["engine"]
        procs[int(first[1])].stop()
        moved = wait_for(api, "finetunejobs", "survivor", lambda s: (s.get("placement") or {}).get("engine")
                         not in (None, first))
        last_before = max(c["step"] for c in job["status"]["checkpoints"])
        assert moved["status"]["lastFailure"]["engine"] == first
        assert moved["status"]["progress"]["currentStep"] >= last_before
        operator.stop()
        operator.start()
        done = wait_for(api, "finetunejobs", "survivor", lambda s: s.get("phase") == "Succeeded", timeout=300)
        assert done["status"]["progress"]["currentStep"] == done["status"]["progress"]["totalSteps"] == 600
        alive = procs[1 - int(first[1])]
        jobs = httpx.get(alive.url + "/admin/finetune/jobs", headers={"Authorization": f"Bearer {token}"}).json()
        mine = [j for j in jobs["jobs"] if j["id"].startswith("e2e.survivor.")]   # others: records on the volume
        assert len(mine) == 1, "the restarted operator must adopt the job, not start another"
    finally:
        for p in procs:
            p.stop()


def test_deleting_a_pool_marks_its_work_and_deleting_a_job_cancels_it(api, pool, engines):
    custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, "coservingpools", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "CoServingPool", "metadata": {"name": "short-lived"},
        "spec": {"model": {"path": "model"}, "adminTokenSecret": {"name": "pool-token"},
                 "engines": [{"name": "e0", "url": engines[0].url}]}})
    custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, "inferenceendpoints", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceEndpoint", "metadata": {"name": "orphan"},
        "spec": {"pool": "short-lived"}})
    wait_for(api, "inferenceendpoints", "orphan", ready)
    custom(api).delete_namespaced_custom_object(GROUP, VERSION, NS, "coservingpools", "short-lived")
    obj = wait_for(api, "inferenceendpoints", "orphan", lambda s: any(
        c["type"] == "Ready" and c["reason"] == "PoolNotReady" for c in s.get("conditions", [])))
    assert "does not exist" in next(c["message"] for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert argocd_health("InferenceEndpoint", obj)["status"] == "Degraded"
    custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, "coservingpools", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "CoServingPool", "metadata": {"name": "tokenless"},
        "spec": {"model": {"path": "model"}, "adminTokenSecret": {"name": "absent"},
                 "engines": [{"name": "e0", "url": engines[0].url}]}})
    tokenless = wait_for(api, "coservingpools", "tokenless", lambda s: any(
        c["type"] == "Ready" and c["reason"] == "AdminTokenMissing" for c in s.get("conditions", [])))
    assert argocd_health("CoServingPool", tokenless)["status"] == "Degraded"
    custom(api).delete_namespaced_custom_object(GROUP, VERSION, NS, "coservingpools", "tokenless")

    custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, "finetunejobs", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FinetuneJob", "metadata": {"name": "doomed"},
        "spec": {"pool": pool, "dataset": {"path": "task.jsonl", "format": "prompt_completion"},
                 "training": {"epochs": 500}, "checkpointEvery": 1000}})
    job = wait_for(api, "finetunejobs", "doomed", lambda s: s.get("phase") == "Running")
    placement = job["status"]["placement"]
    custom(api).delete_namespaced_custom_object(GROUP, VERSION, NS, "finetunejobs", "doomed")
    headers = {"Authorization": "Bearer e2e-engine-token"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = httpx.get(f"{placement['url']}/admin/finetune/jobs/{placement['engineJobId']}",
                          headers=headers).json()["state"]
        if state == "cancelled":
            return
        time.sleep(0.5)
    raise AssertionError(f"the engine job is still {state}")
