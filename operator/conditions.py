"""Status conditions as Kubernetes conventions want them: lastTransitionTime moves only when status flips."""
from __future__ import annotations

import datetime


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[dict], type_: str, status: bool, reason: str, message: str,
                  generation: int | None) -> list[dict]:
    """A new list with `type_` set; unchanged entries keep their transition time."""
    value = "True" if status else "False"
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    changed = old is None or old.get("status") != value
    out.append({"type": type_, "status": value, "reason": reason, "message": message[:1000],
                "lastTransitionTime": now_iso() if changed else old.get("lastTransitionTime", now_iso()),
                "observedGeneration": generation})
    return sorted(out, key=lambda c: c["type"])


def status_diff(current: dict, desired: dict) -> dict:
    """Only the top-level status fields that change, so an unchanged reconcile writes nothing."""
    return {k: v for k, v in desired.items() if current.get(k) != v}
