"""`coserve operator`: run the kopf handlers with liveness probe and peering from the chart's settings."""
from __future__ import annotations

import kopf

from coserve.operator.handlers import SETTINGS


def run() -> None:
    """Run with the handlers' own settings, so one process has one peering priority."""
    kopf.run(clusterwide=not SETTINGS.namespaces, namespaces=SETTINGS.namespaces,
             peering_name=SETTINGS.peering, standalone=SETTINGS.peering is None, priority=SETTINGS.priority,
             liveness_endpoint=f"http://0.0.0.0:{SETTINGS.health_port}/healthz" if SETTINGS.health_port else None)
