"""The operator's settings, from environment variables the Helm chart sets."""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field


def _priority() -> int:
    """kopf freezes peers of equal priority, and a Deployment's replicas share their environment: unless set,
    each process draws its own, so the highest serves and the others stand by."""
    return int(os.environ.get("COSERVE_PRIORITY") or secrets.randbelow(2**31 - 2) + 1)


def _env_list(name: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


@dataclass
class OperatorSettings:
    namespaces: list[str] = field(default_factory=lambda: _env_list("COSERVE_NAMESPACES"))  # empty: all
    poll_seconds: float = float(os.environ.get("COSERVE_POLL_SECONDS", "10"))
    engine_timeout_seconds: float = float(os.environ.get("COSERVE_ENGINE_TIMEOUT_SECONDS", "5"))
    retry_seconds: float = float(os.environ.get("COSERVE_RETRY_SECONDS", "5"))      # backoff of a failed release
    release_retries: int = int(os.environ.get("COSERVE_RELEASE_RETRIES", "3"))     # before deletion goes on anyway
    route_resync_seconds: float = float(os.environ.get("COSERVE_ROUTE_RESYNC_SECONDS", "300"))  # re-apply Services
    engine_port: int = int(os.environ.get("COSERVE_ENGINE_PORT", "8000"))
    peering: str | None = os.environ.get("COSERVE_PEERING") or None
    priority: int = field(default_factory=_priority)
    health_port: int = int(os.environ.get("COSERVE_HEALTH_PORT", "8080"))
    cluster_domain: str = os.environ.get("COSERVE_CLUSTER_DOMAIN", "cluster.local")
