"""Fixtures: a control plane (or the cluster in KUBECONFIG), the CRDs, the operator running as its own
ServiceAccount with the chart's RBAC, two real engines on loopback and a bring-your-own-engines pool."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import kubernetes
import pytest

from harness import NS, ROOT, ControlPlane, chart_rbac, host_ip, kubectl

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


@pytest.fixture(scope="session")
def crds(cluster):
    kubeconfig, _ = cluster
    kubectl(kubeconfig, "apply", "--server-side", "-f", "crds/")
    kubectl(kubeconfig, "wait", "--for", "condition=Established", "--timeout", "60s",
            "crd/coservingpools.coserve.dev", "crd/inferenceendpoints.coserve.dev", "crd/finetunejobs.coserve.dev")


@pytest.fixture(scope="session")
def namespaces(cluster, api):
    kubeconfig, _ = cluster
    for ns in (NS, OP_NS):
        kubectl(kubeconfig, "create", "namespace", ns, check=False)
    return kubernetes.client.CoreV1Api(api)


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster, namespaces, tmp_path_factory):
    """A kubeconfig holding a token of the operator's ServiceAccount, bound by the chart's RBAC only."""
    kubeconfig, plane = cluster
    if plane is None:
        raise pytest.skip.Exception("a given KUBECONFIG cluster runs the operator from the chart")
    kubectl(kubeconfig, "apply", "-f", "-", stdin=chart_rbac("coserve", OP_NS))
    token = kubectl(kubeconfig, "create", "token", "coserve-operator", "-n", OP_NS, "--duration", "2h",
                    "--audience", "https://kubernetes.default.svc").stdout.strip()
    return plane.token_kubeconfig(tmp_path_factory.mktemp("op") / "operator.kubeconfig", token)


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
    procs = [EngineProcess(model_dirs["llama"], data_root, TOKEN, "--num-kv-blocks", "128", host=host_ip())
             for _ in range(2)]
    yield procs
    for p in procs:
        p.stop()


class OperatorProcess:
    """`coserve operator` as its own process, authenticated as the operator's ServiceAccount."""

    def __init__(self, kubeconfig: Path, log: Path, **env: str):
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "COSERVE_POLL_SECONDS": "1",
                    "COSERVE_HEALTH_PORT": "0", "COSERVE_ENGINE_TIMEOUT_SECONDS": "3", **env}
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
def pool(cluster, namespaces, crds, engines, operator):
    kubeconfig, _ = cluster
    kubectl(kubeconfig, "create", "secret", "generic", "engine-token", "-n", NS, f"--from-literal=token={TOKEN}")
    body = {"apiVersion": "coserve.dev/v1alpha1", "kind": "CoServingPool", "metadata": {"name": "pool"},
            "spec": {"model": {"path": "model"}, "adminTokenSecret": {"name": "engine-token"},
                     "engines": [{"name": f"e{i}", "url": p.url} for i, p in enumerate(engines)]}}
    kubectl(kubeconfig, "apply", "-n", NS, "-f", "-", stdin=json.dumps(body))
    return "pool"
