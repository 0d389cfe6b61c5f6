"""A CoServingPool's engines, and the objects a managed pool is made of (pure functions of its spec)."""
from __future__ import annotations

import base64
import secrets

from coserve.operator.engine_client import EngineClient
from coserve.operator.reconcile import PoolView
from coserve.operator.settings import OperatorSettings

ENGINE_PORT_NAME = "http"


def token_secret_ref(pool: dict) -> tuple[str, str]:
    ref = pool["spec"].get("adminTokenSecret") or {}
    return ref.get("name") or f"{pool['metadata']['name']}-admin-token", ref.get("key") or "token"


def engine_urls(pool: dict, settings: OperatorSettings) -> dict[str, str]:
    """Engine name -> base URL: the listed ones (bring your own), or the StatefulSet's pods by stable DNS."""
    spec, meta = pool["spec"], pool["metadata"]
    if spec.get("engines"):
        return {e["name"]: e["url"].rstrip("/") for e in spec["engines"]}
    name, ns = meta["name"], meta["namespace"]
    replicas = (spec.get("template") or {}).get("replicas", 1)
    return {f"{name}-{i}": f"http://{name}-{i}.{name}.{ns}.svc.{settings.cluster_domain}:{settings.engine_port}"
            for i in range(replicas)}


def pool_view(pool: dict, token: str, settings: OperatorSettings) -> PoolView:
    meta = pool["metadata"]
    return PoolView(meta["namespace"], meta["name"], engine_urls(pool, settings),
                    EngineClient(token, settings.engine_timeout_seconds))


def token_secret(pool: dict) -> dict:
    name, key = token_secret_ref(pool)
    value = base64.b64encode(secrets.token_urlsafe(32).encode()).decode()
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "labels": pool_labels(pool)}, "data": {key: value}}


def pool_labels(pool: dict) -> dict[str, str]:
    return {"app.kubernetes.io/name": "coserve-engine", "app.kubernetes.io/managed-by": "coserve-operator",
            "coserve.dev/pool": pool["metadata"]["name"]}


def headless_service(pool: dict, settings: OperatorSettings) -> dict:
    name = pool["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": pool_labels(pool)},
            "spec": {"clusterIP": "None", "selector": pool_labels(pool), "publishNotReadyAddresses": True,
                     "ports": [{"name": ENGINE_PORT_NAME, "port": settings.engine_port}]}}


def quantities(resources: dict) -> dict:
    """Resource quantities as the strings the API's schema types them as (`nvidia.com/gpu: 1` -> "1")."""
    return {section: {name: str(q) for name, q in (values or {}).items()} for section, values in resources.items()}


def statefulset(pool: dict, settings: OperatorSettings) -> dict:
    """Engine pods: `coserve serve` on the pool's model, with the shared volume and the admin token."""
    spec, name = pool["spec"], pool["metadata"]["name"]
    t, e = spec.get("template") or {}, spec.get("engine") or {}
    storage = t.get("storage") or {}
    mount = storage.get("mountPath", "/data")
    secret_name, key = token_secret_ref(pool)
    args = ["serve", "--model", f"{mount}/{spec['model']['path']}", "--data-root", mount, "--host", "0.0.0.0",
            "--port", str(settings.engine_port), "--admin-token-file", f"/var/run/coserve/{key}",
            "--served-model-name", spec["model"].get("servedName") or name,
            "--tpot-slo-ms", str(e.get("tpotSloMs", 50)), "--idle-iteration-ms", str(e.get("idleIterationMs", 200)),
            "--max-num-seqs", str(e.get("maxNumSeqs", 256)), "--max-loras", str(e.get("maxAdapters", 8)),
            "--max-finetune-jobs", str(e.get("finetuneSlots", 2)), *t.get("args", [])]
    volumes = [{"name": "token", "secret": {"secretName": secret_name}}]
    mounts = [{"name": "token", "mountPath": "/var/run/coserve", "readOnly": True}]
    if storage.get("claimName"):
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": storage["claimName"]}})
        mounts.append({"name": "data", "mountPath": mount})
    probe = {"httpGet": {"path": "/ready", "port": settings.engine_port}, "periodSeconds": 5}
    container = {"name": "engine", "image": t.get("image", "ghcr.io/coserve/coserve:0.1.0"),
                 "command": ["coserve"], "args": args, "ports": [{"name": ENGINE_PORT_NAME,
                                                                  "containerPort": settings.engine_port}],
                 "resources": quantities(t.get("resources") or {}), "volumeMounts": mounts, "readinessProbe": probe,
                 "livenessProbe": {"httpGet": {"path": "/health", "port": settings.engine_port},
                                   "periodSeconds": 10, "failureThreshold": 6}}
    pod_spec = {"containers": [container], "volumes": volumes}
    if t.get("nodeSelector"):
        pod_spec["nodeSelector"] = t["nodeSelector"]
    if t.get("tolerations"):
        pod_spec["tolerations"] = t["tolerations"]
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "labels": pool_labels(pool)},
            "spec": {"serviceName": name, "replicas": t.get("replicas", 1), "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": pool_labels(pool)},
                     "template": {"metadata": {"labels": pool_labels(pool)}, "spec": pod_spec}}}
