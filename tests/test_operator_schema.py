"""The CRDs accept every example and refuse bad manifests with a message naming the field (OpenAPI schema and
CEL rules); a managed pool's objects; placement as plain functions."""
from __future__ import annotations

import base64
import copy
from pathlib import Path

import pytest
import yaml

from coserve.operator.conditions import set_condition, status_diff
from coserve.operator.placement import pick_endpoint_engines, pick_job_engine, reserve
from coserve.operator.pool import engine_urls, headless_service, statefulset, token_secret
from coserve.operator.reconcile import (duration_text, endpoint_adapter_path, engine_job_body, engine_job_id,
                                        remaining_seconds)
from coserve.operator.routing import endpoint_service, endpoint_slices, routable_ip
from coserve.operator.settings import OperatorSettings
from crd_schema import crd_schema, validate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def examples() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))}


def test_every_example_is_valid():
    found = examples()
    assert {o["kind"] for o in found.values()} == {"CoServingPool", "InferenceEndpoint", "FinetuneJob"}
    for name, obj in found.items():
        assert validate(obj) == [], name


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (safe_load silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        duplicates = {k for k in keys if keys.count(k) > 1}
        if duplicates:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(duplicates)}",
                                                    node.start_mark)
        return super().construct_mapping(node, deep)


@pytest.mark.parametrize("path", sorted((EXAMPLES.parent / "crds").glob("*.yaml")) + sorted(EXAMPLES.glob("*.yaml")),
                         ids=lambda p: p.name)
def test_crds_and_examples_name_each_key_once(path):
    for _ in yaml.load_all(path.read_text(), Loader=_UniqueKeyLoader):
        pass


def test_printer_columns_read_conditions_by_type_and_kinds_share_a_category():
    for kind in ("CoServingPool", "InferenceEndpoint", "FinetuneJob"):
        crd = next(c for p in (EXAMPLES.parent / "crds").glob("coserve.dev_*.yaml")
                   if (c := yaml.safe_load(p.read_text()))["spec"]["names"]["kind"] == kind)
        assert crd["spec"]["names"]["categories"] == ["coserve"] and crd["spec"]["names"]["shortNames"]
        version = crd["spec"]["versions"][0]
        scale = {"CoServingPool": ".spec.template.replicas", "InferenceEndpoint": ".spec.replicas"}.get(kind)
        expected = {"status": {}}
        if scale:   # kubectl scale and an HPA: replicas in spec, what runs and the pods' selector in status
            expected["scale"] = {"specReplicasPath": scale, "statusReplicasPath": ".status.replicas",
                                 "labelSelectorPath": ".status.selector"}
            status_fields = crd_schema(kind)["properties"]["status"]["properties"]
            assert status_fields["replicas"]["type"] == "integer" and status_fields["selector"]["type"] == "string"
        assert version["subresources"] == expected
        for col in version["additionalPrinterColumns"]:
            assert "conditions[0]" not in col["jsonPath"]
        assert "conditions" in crd_schema(kind)["properties"]["status"]["properties"]


def patched(name: str, change) -> dict:
    obj = copy.deepcopy(examples()[name])
    change(obj["spec"])
    return obj


JOB, POOL, FOLLOW, BASE = "03-finetune-job.yaml", "01-pool.yaml", "04-endpoint-follows-job.yaml", \
    "02-endpoint-base.yaml"
BAD = [
    (JOB, lambda s: s["lora"].update(r=0), "spec.lora.r"),
    (JOB, lambda s: s["lora"].update(r=-4), "spec.lora.r"),
    (JOB, lambda s: s["lora"].update(targetModules=["qkv_proj"]), "spec.lora.targetModules.0"),
    (JOB, lambda s: s["dataset"].update(format="csv"), "spec.dataset.format"),
    (JOB, lambda s: s["dataset"].update(path="../secrets.jsonl"), "spec.dataset.path: dataset.path must be"),
    (JOB, lambda s: s["dataset"].update(path="/etc/passwd"), "spec.dataset.path: dataset.path must be"),
    (JOB, lambda s: s.update(output="adapters/../../x"), "spec.output: output must be"),
    (JOB, lambda s: s.pop("dataset"), "'dataset' is a required property"),
    (JOB, lambda s: s["training"].update(lr=-0.1), "spec.training.lr"),
    (JOB, lambda s: s["training"].update(epochs=0), "spec.training.epochs"),
    (JOB, lambda s: s["lora"].update(dropout=1.0), "spec.lora.dropout"),
    (FOLLOW, lambda s: s["adapter"].update(path="adapters/x"), "spec.adapter: adapter needs exactly one"),
    (FOLLOW, lambda s: s.update(adapter={}), "spec.adapter: adapter needs exactly one"),
    (FOLLOW, lambda s: s["adapter"]["fromFinetuneJob"].update(checkpoint="newest"),
     "spec.adapter.fromFinetuneJob.checkpoint"),
    (BASE, lambda s: s.update(replicas=-1), "spec.replicas"),
    (BASE, lambda s: s.update(servedModelName="bad name!"), "spec.servedModelName"),
    (POOL, lambda s: s.update(engines=[{"name": "a", "url": "http://a:8000"}]), "give exactly one of"),
    (POOL, lambda s: s.pop("template"), "give exactly one of"),
    (POOL, lambda s: s["model"].update(path="/models/x"), "spec.model.path: model.path must be"),
    (POOL, lambda s: s["engine"].update(finetuneSlots=-1), "spec.engine.finetuneSlots"),
]


@pytest.mark.parametrize("name, change, expected", BAD)
def test_bad_manifests_are_refused_naming_the_field(name, change, expected):
    errors = validate(patched(name, change))
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("name, change, expected", [
    (BASE, lambda s: s.update(pool="other-pool"), "spec.pool: pool is immutable"),
    (JOB, lambda s: s["training"].update(lr=0.5), "spec: training is immutable"),
    (JOB, lambda s: s["dataset"].update(path="datasets/other.jsonl"), "spec: dataset is immutable"),
])
def test_immutable_fields_cannot_change(name, change, expected):
    old = examples()[name]
    assert any(expected in e for e in validate(patched(name, change), old=old))
    assert validate(patched(name, lambda s: s.update(replicas=3) if "replicas" in s else s.update(suspend=True)),
                    old=old) == []


def test_managed_pool_objects():
    pool = examples()[POOL]
    pool["metadata"]["namespace"] = "ml"
    settings = OperatorSettings()
    urls = engine_urls(pool, settings)
    assert urls == {f"llama-pool-{i}": f"http://llama-pool-{i}.llama-pool.ml.svc.cluster.local:8000" for i in (0, 1)}
    sts = statefulset(pool, settings)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == "llama-pool"
    assert container["args"][:4] == ["serve", "--model", "/data/models/llama-3.1-8b-instruct", "--data-root"]
    assert "--admin-token-file" in container["args"] and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    flags = dict(zip(container["args"], container["args"][1:]))
    engine_flags = ("--tpot-slo-ms", "--idle-iteration-ms", "--max-num-seqs", "--max-loras", "--max-finetune-jobs")
    assert tuple(flags[f] for f in engine_flags) == ("50", "200", "256", "8", "2")
    pool["spec"]["engine"] = {"tpotSloMs": 45, "idleIterationMs": 150, "maxNumSeqs": 128, "maxAdapters": 4,
                              "finetuneSlots": 1}
    args = statefulset(pool, settings)["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(zip(args, args[1:]))
    assert tuple(flags[f] for f in engine_flags) == ("45", "150", "128", "4", "1"), \
        "the pool's engine settings reach the engines' command line"
    assert sts["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert headless_service(pool, settings)["spec"]["clusterIP"] == "None"
    secret = token_secret(pool)
    assert secret["metadata"]["name"] == "llama-pool-admin-token"
    assert len(base64.b64decode(secret["data"]["token"])) >= 32
    byo = {**pool, "spec": {**pool["spec"], "engines": [{"name": "gpu-a", "url": "http://10.0.0.5:8000/"}]}}
    assert engine_urls(byo, settings) == {"gpu-a": "http://10.0.0.5:8000"}


def test_placement_spreads_replicas_and_picks_the_most_headroom():
    caps = {"a": {"adapter_slots_free": 1, "kv_usage": 0.5, "finetune_slots_free": 1, "load": 0.9},
            "b": {"adapter_slots_free": 3, "kv_usage": 0.1, "finetune_slots_free": 2, "load": 0.2},
            "c": None,
            "d": {"adapter_slots_free": 0, "kv_usage": 0.0, "finetune_slots_free": 2, "load": 0.0}}
    assert pick_endpoint_engines(caps, set(), 3, needs_adapter_slot=True) == ["b", "a"]
    assert pick_endpoint_engines(caps, {"b"}, 1, needs_adapter_slot=True) == ["a"]
    assert pick_endpoint_engines(caps, set(), 3, needs_adapter_slot=False) == ["b", "a", "d"]
    assert pick_job_engine(caps) == "b"
    reserve(caps, "b", finetune_slot=True)
    reserve(caps, "b", finetune_slot=True)
    assert pick_job_engine(caps) == "a"
    assert pick_job_engine({"x": None}) is None


def test_conditions_keep_transition_time_and_unchanged_status_writes_nothing():
    first = set_condition([], "Ready", True, "Serving", "ok", 1)
    again = set_condition(first, "Ready", True, "Serving", "ok", 1)
    assert again == first and status_diff({"conditions": first}, {"conditions": again}) == {}
    flipped = set_condition(first, "Ready", False, "EngineLost", "gone", 1)
    assert flipped[0]["status"] == "False" and flipped[0]["reason"] == "EngineLost"


def test_job_spec_maps_to_the_engine_api_and_ids_fit():
    body = examples()[JOB]
    body["metadata"]["namespace"] = "team-a"
    req = engine_job_body(body, "x", None)
    assert req["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert req["training"]["lr_schedule"] == "cosine" and req["output"] == "adapters/team-a/support-bot"
    assert engine_job_body(body, "x", "adapters/team-a/support-bot/checkpoint-100")["resume_from"]
    long_id = engine_job_id("n" * 40, "j" * 60, 3)
    assert len(long_id) <= 63 and long_id.endswith(".3")
    checkpoints = {"phase": "Running", "checkpoints": [{"step": 5, "path": "p5"}, {"step": 10, "path": "p10"}]}
    assert endpoint_adapter_path({"adapter": {"fromFinetuneJob": {"name": "j"}}}, checkpoints) == ("p10", None)
    assert endpoint_adapter_path({"adapter": {"fromFinetuneJob": {"name": "j", "checkpoint": "5"}}},
                                 checkpoints) == ("p5", None)
    assert endpoint_adapter_path({"adapter": {"fromFinetuneJob": {"name": "j", "checkpoint": "final"}}},
                                 checkpoints)[0] is None


def test_endpoint_service_routes_only_to_engines_holding_the_adapter():
    endpoint = {"metadata": {"name": "chat", "namespace": "team"}}
    assert endpoint_service(endpoint)["spec"].get("selector") is None   # the operator writes its slices
    assert [routable_ip(u) for u in ("http://10.1.2.3:8000", "http://127.0.0.1:8000", "http://engine:8000",
                                     "http://169.254.1.1", "http://[fd00::1]:8000")] == ["10.1.2.3"] + [None] * 4
    placements = [{"engine": "p-1", "url": "http://p-1.pool:8000", "state": "Loaded"},
                  {"engine": "p-0", "url": "http://p-0.pool:8000", "state": "Pending"},
                  {"engine": "p-2", "url": "http://p-2.pool:8000", "state": "Loaded"}]
    [s] = endpoint_slices(endpoint, {"p-0": "10.0.0.5", "p-1": "10.0.0.6"}, placements, pods=True)
    assert s["metadata"]["labels"]["kubernetes.io/service-name"] == "chat" and s["ports"][0]["port"] == 8000
    assert [(e["addresses"], e["conditions"]["ready"], e["targetRef"]["name"]) for e in s["endpoints"]] == [
        (["10.0.0.5"], False, "p-0"), (["10.0.0.6"], True, "p-1")]   # p-2 has no address yet: left out
    byo = [{"engine": "a", "url": "http://10.0.0.7:8000", "state": "Loaded"},
           {"engine": "b", "url": "http://10.0.0.8:9000", "state": "Loaded"}]
    slices = endpoint_slices(endpoint, {"a": "10.0.0.7", "b": "10.0.0.8"}, byo, pods=False)
    assert [(s["metadata"]["name"], s["ports"][0]["port"]) for s in slices] == [("chat-8000", 8000),
                                                                                 ("chat-9000", 9000)]
    assert all("targetRef" not in e for s in slices for e in s["endpoints"])


def test_each_operator_process_draws_its_own_peering_priority(monkeypatch):
    """kopf pauses every peer of equal priority: replicas sharing one environment must still differ."""
    monkeypatch.delenv("COSERVE_PRIORITY", raising=False)
    assert len({OperatorSettings().priority for _ in range(5)}) == 5
    monkeypatch.setenv("COSERVE_PRIORITY", "7")
    assert OperatorSettings().priority == 7


def test_eta_comes_from_the_pace_of_the_steps_this_engine_job_ran():
    running = {"state": "running", "step": 30, "total_steps": 100, "started": 1000.0}
    assert remaining_seconds(running, 1060.0) == 140            # 2 s a step, 70 steps left
    resumed = {**running, "resumed_from": "adapters/ns/job/checkpoint-20"}
    assert remaining_seconds(resumed, 1060.0) == 420            # only 10 steps ran since the resume: 6 s a step
    assert remaining_seconds({**resumed, "step": 20}, 1060.0) is None     # no step done yet in this attempt
    assert remaining_seconds({**running, "state": "succeeded"}, 1060.0) is None
    assert remaining_seconds({**running, "started": None}, 1060.0) is None
    assert [duration_text(s) for s in (0, 45, 60, 200, 3600, 7500, 90000)] == \
        ["0s", "45s", "1m", "3m20s", "1h", "2h5m", "1d1h"]
