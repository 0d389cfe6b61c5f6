"""Where work goes, as plain functions of the engines' reported capacity (None: engine not answering)."""
from __future__ import annotations


def pick_endpoint_engines(capacity: dict[str, dict | None], exclude: set[str], count: int,
                          needs_adapter_slot: bool) -> list[str]:
    """`count` distinct answering engines for endpoint replicas: most free adapter slots first, then least KV
    usage; engines already holding a replica are excluded."""
    candidates = [(name, cap) for name, cap in capacity.items()
                  if cap is not None and name not in exclude
                  and (not needs_adapter_slot or cap.get("adapter_slots_free", 0) > 0)]
    candidates.sort(key=lambda nc: (-nc[1].get("adapter_slots_free", 0), nc[1].get("kv_usage", 0.0), nc[0]))
    return [name for name, _ in candidates[:count]]


def pick_job_engine(capacity: dict[str, dict | None]) -> str | None:
    """The answering engine with the most finetuning headroom: free job slots, then the lightest load."""
    candidates = [(name, cap) for name, cap in capacity.items()
                  if cap is not None and cap.get("finetune_slots_free", 0) > 0 and cap.get("adapter_slots_free", 0) > 0]
    if not candidates:
        return None
    return min(candidates, key=lambda nc: (-nc[1]["finetune_slots_free"], nc[1].get("load", 0.0), nc[0]))[0]


def reserve(capacity: dict[str, dict | None], engine: str, adapter_slot: bool = True,
            finetune_slot: bool = False) -> None:
    """Count a placement against the cached capacity, so the next decision in the same pass sees it."""
    cap = capacity.get(engine)
    if cap is None:
        return
    if adapter_slot:
        cap["adapter_slots_free"] = cap.get("adapter_slots_free", 0) - 1
    if finetune_slot:
        cap["finetune_slots_free"] = cap.get("finetune_slots_free", 0) - 1
