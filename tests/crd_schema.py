"""Checks a manifest against our CRDs as the API server would, as far as that is possible without one:
the OpenAPI schema (types, enums, ranges, required) and the CEL rules (x-kubernetes-validations)."""
from __future__ import annotations

from pathlib import Path

import celpy
import yaml
from jsonschema import Draft4Validator

CRDS = Path(__file__).resolve().parents[1] / "crds"


def crd_schema(kind: str) -> dict:
    for path in CRDS.glob("coserve.dev_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    raise KeyError(kind)


def _cel(schema: dict, value, old, path: str, errors: list[str]) -> None:
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"] and old is None:
            continue   # transition rules apply to updates only
        bindings = {"self": celpy.json_to_cel(value)}
        if old is not None:
            bindings["oldSelf"] = celpy.json_to_cel(old)
        if not env.program(env.compile(rule["rule"])).evaluate(bindings):
            errors.append(f"{path}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                _cel(sub, value[key], old.get(key) if isinstance(old, dict) else None, f"{path}.{key}", errors)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _cel(schema["items"], item, None, f"{path}[{i}]", errors)


def validate(obj: dict, old: dict | None = None) -> list[str]:
    """Messages naming the field, empty when the API server would accept the object."""
    schema = crd_schema(obj["kind"])
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in Draft4Validator(schema).iter_errors(obj)]
    _cel(schema["properties"]["spec"], obj.get("spec", {}), (old or {}).get("spec") if old else None, "spec",
         errors)
    return errors
