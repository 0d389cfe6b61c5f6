"""Fixtures: a control plane (or the cluster in KUBECONFIG), the CRDs, the operator running as its own
ServiceAccount with the chart's RBAC, two real engines on this machine and a bring-your-own-engines pool."""
from __future__ import annotations

import os
import sys

import kubernetes
import pytest

from harness import NS, OP_NS, ROOT, ControlPlane, OperatorProcess, byo_pool, host_ip, install_crds, kubectl
from harness import operator_kubeconfig as operator_kubeconfig_for

sys.path.insert(0, str(ROOT / "tests"))

TOKEN = "e2e-engine-token"


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
    install_crds(cluster[0])


@pytest.fixture(scope="session")
def namespaces(cluster, api):
    kubeconfig, _ = cluster
    for ns in (NS, OP_NS):
        kubectl(kubeconfig, "create", "namespace", ns, check=False)
    return kubernetes.client.CoreV1Api(api)


@pytest.fixture(scope="session")
def operator_kubeconfig(cluster, namespaces, tmp_path_factory):
    _, plane = cluster
    if plane is None:
        raise pytest.skip.Exception("a given KUBECONFIG cluster runs the operator from the chart")
    return operator_kubeconfig_for(plane, tmp_path_factory.mktemp("op") / "operator.kubeconfig")


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


@pytest.fixture(scope="session")
def operator(operator_kubeconfig, crds, tmp_path_factory):
    op = OperatorProcess(operator_kubeconfig, tmp_path_factory.mktemp("oplog") / "operator.log")
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="session")
def pool(cluster, namespaces, crds, engines, operator):
    byo_pool(cluster[0], NS, "pool", TOKEN, {f"e{i}": p.url for i, p in enumerate(engines)})
    return "pool"
