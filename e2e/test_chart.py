"""The Helm chart, rendered and linted by Helm itself and checked by the API server; and its two operator
replicas sharing the work through kopf peering: one serves, the other stands by and takes over."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from coserve.operator.pool import headless_service, pool_labels
from coserve.operator.settings import OperatorSettings
from harness import (GROUP, NS, OP_NS, ROOT, VERSION, OperatorProcess, helm, install_third_party_crds, kubectl, ready,
                     wait_for)
from metric_names import PROTOCOL_METRICS, exported_metric_names, promql_metric_names

VALUES = {"defaults": [], "namespaced": ["--set", f"watchNamespaces={{{NS}}}"],
          "tuned": ["--set", "replicas=3", "--set", "pollSeconds=5", "--set", "nodeSelector.pool=system"]}


def test_chart_lints_clean():
    out = helm("lint", "--strict", "charts/coserve")
    assert "0 chart(s) failed" in out and "[WARNING]" not in out and "[ERROR]" not in out


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_chart_renders_objects_the_api_server_accepts(cluster, crds, namespaces, values):
    kubeconfig, _ = cluster
    rendered = helm("template", "coserve", "charts/coserve", "--namespace", OP_NS, *values)
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = sorted(d["kind"] for d in docs)
    peering = ["KopfPeering"] if "watchNamespaces" in " ".join(values) else ["ClusterKopfPeering"]
    assert all(d["metadata"].get("namespace") in (None, OP_NS, NS) for d in docs)
    assert kinds == sorted(["ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount", *peering])
    kubectl(kubeconfig, "apply", "--dry-run=server", "-f", "-", stdin=rendered)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["COSERVE_PEERING"]["value"] == "coserve" and "fieldRef" in env["POD_ID"]["valueFrom"]
    assert deployment["spec"]["replicas"] == (3 if "replicas=3" in values else 2)


def test_chart_crds_are_the_repositorys_crds():
    rendered = helm("template", "coserve", "charts/coserve", "--include-crds")
    crds = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "CustomResourceDefinition"]
    files = [d for p in sorted((ROOT / "crds").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    assert sorted(json.dumps(d, sort_keys=True) for d in crds) == sorted(json.dumps(d, sort_keys=True) for d in files)


OPTIONAL = ["--set", "inferencePool.enabled=true", "--set", "inferencePool.pool=pool", "--set",
            f"inferencePool.namespace={NS}", "--set", "monitoring.serviceMonitor.enabled=true", "--set",
            "monitoring.prometheusRule.enabled=true", "--set", "monitoring.dashboard.enabled=true"]
BASE_KINDS = ["ClusterKopfPeering", "ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]


def test_optional_objects_render_when_the_cluster_serves_their_kinds_and_the_api_server_accepts_them(
        cluster, crds, namespaces):
    """InferencePool, ServiceMonitor and PrometheusRule are skipped while their CRDs are absent; with the CRDs of
    their projects' releases applied, Helm (reading the cluster's APIs) renders them and the API server accepts
    them; they select the engine pods and port the operator makes, and the alerts query exported metrics."""
    kubeconfig, _ = cluster
    absent = [d for d in yaml.safe_load_all(helm("template", "coserve", "charts/coserve", "-n", OP_NS, *OPTIONAL))
              if d]
    assert sorted(d["kind"] for d in absent) == sorted([*BASE_KINDS, "ConfigMap"])   # the dashboard needs no CRD
    install_third_party_crds(kubeconfig)
    rendered = helm("template", "probe", "charts/coserve", "-n", OP_NS, "--validate", "--kubeconfig", kubeconfig,
                    *OPTIONAL)
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered) if d}
    assert sorted(docs) == sorted([*BASE_KINDS, "ConfigMap", "InferencePool", "ServiceMonitor", "PrometheusRule"])
    optional = [docs[k] for k in ("InferencePool", "ServiceMonitor", "PrometheusRule", "ConfigMap")]
    kubectl(kubeconfig, "apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(optional))
    pool = {"metadata": {"name": "pool", "namespace": NS}}
    service = headless_service(pool, OperatorSettings())
    ip = docs["InferencePool"]
    assert ip["apiVersion"] == "inference.networking.k8s.io/v1" and ip["metadata"]["namespace"] == NS
    assert ip["spec"]["selector"]["matchLabels"] == pool_labels(pool)
    assert ip["spec"]["targetPorts"] == [{"number": service["spec"]["ports"][0]["port"]}]
    monitor = docs["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["endpoints"]] == [service["spec"]["ports"][0]["name"]]
    exprs = [r["expr"] for g in docs["PrometheusRule"]["spec"]["groups"] for r in g["rules"]]
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert used and used - (exported_metric_names() | PROTOCOL_METRICS) == set()
    dashboard = json.loads(docs["ConfigMap"]["data"]["coserve.json"])
    assert dashboard == json.loads((ROOT / "charts/coserve/dashboards/coserve.json").read_text())


def test_two_peered_operators_one_serves_and_the_other_takes_over(api, cluster, operator, operator_kubeconfig, pool,
                                                                  tmp_path: Path):
    kubeconfig, _ = cluster
    kubectl(kubeconfig, "apply", "-f", "-",
            stdin=helm("template", "coserve", "charts/coserve", "--show-only", "templates/peering.yaml"))
    operator.stop()   # the session's operator runs standalone; two peered replicas replace it here
    standby = OperatorProcess(operator_kubeconfig, tmp_path / "a.log", COSERVE_PEERING="coserve",
                              COSERVE_PRIORITY="10", POD_ID="replica-a")
    active = OperatorProcess(operator_kubeconfig, tmp_path / "b.log", COSERVE_PEERING="coserve",
                             COSERVE_PRIORITY="20", POD_ID="replica-b")
    try:
        standby.start()
        active.start()
        deadline = time.monotonic() + 60
        while "Pausing operations in favour of" not in standby.log.read_text():
            assert time.monotonic() < deadline, standby.log.read_text()[-2000:]
            time.sleep(0.5)
        peers = json.loads(kubectl(kubeconfig, "get", "clusterkopfpeering", "coserve", "-o", "json").stdout)
        assert {"replica-a", "replica-b"} <= set(peers["status"])
        kubectl(kubeconfig, "apply", "-n", NS, "-f", "-", stdin=json.dumps({
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceEndpoint", "metadata": {"name": "peered"},
            "spec": {"pool": pool}}))
        wait_for(api, "inferenceendpoints", "peered", ready)
        active.stop()   # a clean exit leaves the peering at once; the standby resumes
        kubectl(kubeconfig, "apply", "-n", NS, "-f", "-", stdin=json.dumps({
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceEndpoint", "metadata": {"name": "after-failover"},
            "spec": {"pool": pool}}))
        wait_for(api, "inferenceendpoints", "after-failover", ready)
        assert "Resuming operations" in standby.log.read_text()
        for name in ("peered", "after-failover"):
            kubectl(kubeconfig, "delete", "-n", NS, "inferenceendpoint", name, "--timeout", "60s")
    finally:
        for op in (standby, active):
            if op.proc and op.proc.poll() is None:
                op.stop()
        operator.start()

