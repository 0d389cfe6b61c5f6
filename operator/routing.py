"""An InferenceEndpoint's Service and the EndpointSlices behind it: clients in the cluster reach the endpoint by
one name, and the slices list exactly the engines that hold its adapter (ready only once it is loaded)."""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

SERVICE_PORT = 80
MANAGED_BY = "operator.coserve.dev"   # the endpointslice.kubernetes.io/managed-by label


def routable_ip(url: str) -> str | None:
    """The engine URL's host when an EndpointSlice may carry it (an IPv4 address that is not loopback,
    link-local, multicast or unspecified); names and loopback engines cannot be routed to by a Service."""
    try:
        ip = ipaddress.ip_address(urlsplit(url).hostname or "")
    except ValueError:
        return None
    if ip.version != 4 or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return None
    return str(ip)


def url_port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def service_url(namespace: str, name: str, cluster_domain: str) -> str:
    return f"http://{name}.{namespace}.svc.{cluster_domain}/v1"


def endpoint_labels(endpoint: dict) -> dict[str, str]:
    return {"app.kubernetes.io/name": "coserve-endpoint", "app.kubernetes.io/managed-by": "coserve-operator",
            "coserve.dev/endpoint": endpoint["metadata"]["name"]}


def endpoint_service(endpoint: dict) -> dict:
    """A Service without a selector: its EndpointSlices are written by the operator, not by Kubernetes."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": endpoint["metadata"]["name"], "labels": endpoint_labels(endpoint)},
            "spec": {"ports": [{"name": "http", "port": SERVICE_PORT, "protocol": "TCP"}]}}


def endpoint_slices(endpoint: dict, addresses: dict[str, str], placements: list[dict], pods: bool) -> list[dict]:
    """One slice per engine port (a slice has one port list), each endpoint ready when its adapter is Loaded.
    `addresses` maps engine name -> IP; placements on engines without one are left out. With `pods`, the
    engines are the pool's pods and each endpoint refers to its pod."""
    name, namespace = endpoint["metadata"]["name"], endpoint["metadata"]["namespace"]
    by_port: dict[int, list[dict]] = {}
    for p in sorted(placements, key=lambda p: p["engine"]):
        ip = addresses.get(p["engine"])
        if ip is None:
            continue
        ready = p["state"] == "Loaded"
        entry = {"addresses": [ip], "conditions": {"ready": ready, "serving": ready, "terminating": False},
                 "hostname": p["engine"]}
        if pods:
            entry["targetRef"] = {"kind": "Pod", "name": p["engine"], "namespace": namespace}
        by_port.setdefault(url_port(p["url"]), []).append(entry)
    return [{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
             "metadata": {"name": f"{name}-{port}",
                          "labels": {**endpoint_labels(endpoint), "kubernetes.io/service-name": name,
                                     "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
             "endpoints": endpoints, "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}
            for port, endpoints in sorted(by_port.items())]
