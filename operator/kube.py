"""Reads and writes of Kubernetes objects the handlers need, through the official client on a worker thread."""
from __future__ import annotations

import asyncio
import base64

import kubernetes
from kubernetes.client.rest import ApiException

GROUP, VERSION = "coserve.dev", "v1alpha1"
FIELD_MANAGER = "coserve-operator"


def load_config() -> None:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


async def get_custom(namespace: str, plural: str, name: str) -> dict | None:
    def call() -> dict | None:
        try:
            return kubernetes.client.CustomObjectsApi().get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
    return await asyncio.to_thread(call)


async def list_custom(namespace: str, plural: str) -> list[dict]:
    def call() -> list[dict]:
        return kubernetes.client.CustomObjectsApi().list_namespaced_custom_object(
            GROUP, VERSION, namespace, plural)["items"]
    return await asyncio.to_thread(call)


async def read_secret_value(namespace: str, name: str, key: str) -> str | None:
    def call() -> str | None:
        try:
            secret = kubernetes.client.CoreV1Api().read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        value = (secret.data or {}).get(key)
        return base64.b64decode(value).decode().strip() if value else None
    return await asyncio.to_thread(call)


async def ensure(namespace: str, manifest: dict, replace_spec: bool) -> None:
    """Create the object if missing; with `replace_spec`, bring an existing one's spec to the manifest."""
    kind = manifest["kind"]

    def call() -> None:
        apps, core = kubernetes.client.AppsV1Api(), kubernetes.client.CoreV1Api()
        create = {"StatefulSet": apps.create_namespaced_stateful_set, "Service": core.create_namespaced_service,
                  "Secret": core.create_namespaced_secret}[kind]
        try:
            create(namespace, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            if replace_spec and kind == "StatefulSet":
                apps.patch_namespaced_stateful_set(manifest["metadata"]["name"], namespace,
                                                  {"spec": {"replicas": manifest["spec"]["replicas"],
                                                            "template": manifest["spec"]["template"]}})
    await asyncio.to_thread(call)


def label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


async def pod_ips(namespace: str, selector: dict[str, str]) -> dict[str, str]:
    """Pod name -> IP of the pods with these labels that have one."""
    def call() -> dict[str, str]:
        pods = kubernetes.client.CoreV1Api().list_namespaced_pod(
            namespace, label_selector=label_selector(selector))
        return {p.metadata.name: p.status.pod_ip for p in pods.items if p.status and p.status.pod_ip}
    return await asyncio.to_thread(call)


async def apply(namespace: str, manifests: list[dict], prune_slices: dict[str, str]) -> None:
    """Server-side apply of Services and EndpointSlices (a no-op when nothing changed), then delete the
    EndpointSlices carrying the `prune_slices` labels that are no longer among them."""
    def call() -> None:
        core, discovery = kubernetes.client.CoreV1Api(), kubernetes.client.DiscoveryV1Api()
        patch = {"Service": core.patch_namespaced_service,
                 "EndpointSlice": discovery.patch_namespaced_endpoint_slice}
        for m in manifests:
            patch[m["kind"]](m["metadata"]["name"], namespace, m, field_manager=FIELD_MANAGER, force=True,
                             _content_type="application/apply-patch+yaml")
        keep = {m["metadata"]["name"] for m in manifests if m["kind"] == "EndpointSlice"}
        existing = discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=label_selector(prune_slices))
        for s in existing.items:
            if s.metadata.name not in keep:
                discovery.delete_namespaced_endpoint_slice(s.metadata.name, namespace)
    await asyncio.to_thread(call)


async def patch_status(namespace: str, plural: str, name: str, patch: dict) -> None:
    """Merge-patch the object's status subresource (None removes a field); a deleted object is left alone."""
    def call() -> None:
        try:
            kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, {"status": patch},
                _content_type="application/merge-patch+json")
        except ApiException as exc:
            if exc.status != 404:
                raise
    await asyncio.to_thread(call)
