"""`coserve operator`: run the kopf handlers with liveness probe and peering from the chart's settings."""
from __future__ import annotations

import kopf

from coserve.operator import handlers  # noqa: F401  (registers the handlers)
from coserve.operator.settings import OperatorSettings


def run(settings: OperatorSettings) -> None:
    kopf.run(clusterwide=not settings.namespaces, namespaces=settings.namespaces,
             peering_name=settings.peering, standalone=settings.peering is None, priority=settings.priority,
             liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None)
