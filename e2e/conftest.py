"""Fixtures: a control plane (or the cluster in KUBECONFIG), the CRDs, the operator running as its own
ServiceAccount with the chart's RBAC, two real engines on loopback and a bring-your-own-engines pool."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import kubernetes
import pytest
import yaml

from harness import NS, ROOT, ControlPlane, render_chart_rbac

sys.path.insert(0, str(ROOT / "tests"))

OP_NS, TOKEN = "coserve-system", "e2e-engine-token"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if os.environ.get("KUBECONFIG"):
        yield os.environ["KUBECONFIG"], None
        return
    plane = ControlPlane(tmp_path_factory.mktemp("kube")).start()
    yield str(plane.admin_kubeconfig), plane
    plane.stop()


@pytest.fixture(scope="session")
def api(cluster):
    kubeconfig, _ = cluster
    return kubernetes.config.new_client_from_config(config_file=kubeconfig)


def apply_all(api, docs: list[dict], namespace: str | None = None) -> None:
    for doc in docs:
        try:
            kubernetes.utils.create_from_dict(api, doc, namespace=namespace)
        except kubernetes.utils.FailToCreateError as exc:
            if not all(e.status == 409 for e in exc.api_exceptions):
                raise


@pytest.fixture(scope="session")
def crds(api):
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        apply_all(api, [d for d in yaml.safe_load_all(path.read_text()) if d])
    ext = kubernetes.client.ApiextensionsV1Api(api)
    for _ in range(60):
        names = {c.metadata.name for c in ext.list_custom_resource_definition().items
                 if any(cond.type == "Established" and cond.status == "True" for cond in c.status.conditions or [])}
        if {"coservingpools.coserve.dev", "inferenceendpoints.coserve.dev", "finetunejobs.coserve.dev"} <= names:
            return
        time.sleep(0.5)
    raise RuntimeError("CRDs not established")


@pytest.fixture(scope="session")
def namespaces(api):
    core = kubernetes.client.CoreV1Api(api)
    for ns in (NS, OP_NS):
        apply_all(api, [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}])
    return core


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster, api, namespaces, tmp_path_factory):
    """A kubeconfig holding a token of the operator's ServiceAccount, bound by the chart's RBAC only."""
    _, plane = cluster
    apply_all(api, render_chart_rbac("coserve", OP_NS), namespace=OP_NS)
    req = kubernetes.client.AuthenticationV1TokenRequest(spec=kubernetes.client.V1TokenRequestSpec(
        audiences=["https://kubernetes.default.svc"], expiration_seconds=7200))
    token = namespaces.create_namespaced_service_account_token("coserve-operator", OP_NS, req).status.token
    path = tmp_path_factory.mktemp("op") / "operator.kubeconfig"
    if plane is None:
        raise pytest.skip.Exception("a given KUBECONFIG cluster runs the operator from the chart")
    return plane.token_kubeconfig(path, token)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, model_dirs):
    from coserve_testlib import ADAPTERS, make_peft_adapter, write_task

    root = tmp_path_factory.mktemp("pooldata")
    write_task(root)
    make_peft_adapter(model_dirs["llama"], root / "adapters" / "qv", 0, **ADAPTERS["qv-r4"])
    return root


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    from coserve.engine.demo_model import write_tiny_model
    return {"llama": write_tiny_model(tmp_path_factory.mktemp("models") / "llama")}


@pytest.fixture(scope="session")
def engines(model_dirs, data_root):
    from server_proc import EngineProcess
    procs = [EngineProcess(model_dirs["llama"], data_root, TOKEN, "--num-kv-blocks", "128") for _ in range(2)]
    yield procs
    for p in procs:
        p.stop()


class OperatorProcess:
    """`coserve operator` as its own process, authenticated as the operator's ServiceAccount."""

    def __init__(self, kubeconfig: Path, log: Path):
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "COSERVE_POLL_SECONDS": "1",
                    "COSERVE_HEALTH_PORT": "0", "COSERVE_ENGINE_TIMEOUT_SECONDS": "3"}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "coserve.engine.cli", "operator"], env=self.env,
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        time.sleep(2)
        if self.proc.poll() is not None:
            raise RuntimeError(self.log.read_text()[-3000:])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def operator(operator_kubeconfig, crds, tmp_path_factory):
    op = OperatorProcess(operator_kubeconfig, tmp_path_factory.mktemp("oplog") / "operator.log")
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="session")
def pool(api, namespaces, crds, engines, operator):
    namespaces.create_namespaced_secret(NS, kubernetes.client.V1Secret(
        metadata=kubernetes.client.V1ObjectMeta(name="engine-token"),
        data={"token": base64.b64encode(TOKEN.encode()).decode()}))
    body = {"apiVersion": "coserve.dev/v1alpha1", "kind": "CoServingPool", "metadata": {"name": "pool"},
            "spec": {"model": {"path": "model"}, "adminTokenSecret": {"name": "engine-token"},
                     "engines": [{"name": f"e{i}", "url": p.url} for i, p in enumerate(engines)]}}
    kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object("coserve.dev", "v1alpha1", NS,
                                                                            "coservingpools", body)
    return "pool"
