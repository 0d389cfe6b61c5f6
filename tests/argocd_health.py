"""Argo CD's health checks for the coserve kinds (charts/coserve/argocd/argocd-cm.yaml), run the way Argo CD runs
them: the Lua script with the object as the global `obj`, on Lua 5.1 (Argo CD's gopher-lua speaks 5.1)."""
from __future__ import annotations

from pathlib import Path

import yaml
from lupa.lua51 import LuaRuntime

CHECKS = yaml.safe_load((Path(__file__).resolve().parents[1] / "charts" / "coserve" / "argocd" /
                         "argocd-cm.yaml").read_text())["data"]


def argocd_health(kind: str, obj: dict) -> dict[str, str]:
    """{"status": Healthy | Progressing | Degraded | Suspended, "message": ...} for the object."""
    lua = LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    return dict(lua.execute(CHECKS[f"resource.customizations.health.coserve.dev_{kind}"]))
