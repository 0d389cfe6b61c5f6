"""kopf handlers: each event of each kind calls one reconciler; status goes through kopf's patch, only the
fields that change; failures become conditions and Events; engines that do not answer retry with backoff."""
from __future__ import annotations

import json
import logging
import time

import kopf
from kubernetes.client.rest import ApiException

from coserve.operator import kube
from coserve.operator.conditions import set_condition, status_diff
from coserve.operator.pool import (engine_urls, headless_service, pool_labels, pool_view, statefulset,
                                   token_secret, token_secret_ref)
from coserve.operator.reconcile import (Event, PoolView, reconcile_endpoint, reconcile_job, release_endpoint,
                                        release_job)
from coserve.operator.routing import endpoint_labels, endpoint_service, endpoint_slices, routable_ip, service_url
from coserve.operator.settings import OperatorSettings

GROUP, VERSION = kube.GROUP, kube.VERSION
SETTINGS = OperatorSettings()
_routed: dict[str, tuple[str, float]] = {}   # endpoint uid -> (its Service and slices as last applied, when)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    """Progress in annotations (status is schema-pruned), Events only for what we post ourselves."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="coserve.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="coserve.dev")
    settings.posting.level = logging.ERROR
    settings.watching.server_timeout = 300
    kube.load_config()


@kopf.on.probe(id="engines")
def liveness(**_) -> str:
    return "ok"


def post(body: dict, events: list[Event]) -> None:
    for type_, reason, message in events:
        kopf.event(body, type=type_, reason=reason, message=message)


def write_status(patch: kopf.Patch, body: dict, desired: dict) -> None:
    for key, value in status_diff(dict(body.get("status") or {}), desired).items():
        patch.status[key] = value


async def load_pool(namespace: str, name: str) -> tuple[dict | None, PoolView | None, str]:
    """The pool object and a view of its engines; (None, None, why) when it cannot be used yet."""
    pool = await kube.get_custom(namespace, "coservingpools", name)
    if pool is None:
        return None, None, f"CoServingPool {name!r} does not exist in {namespace}"
    secret, key = token_secret_ref(pool)
    token = await kube.read_secret_value(namespace, secret, key)
    if not token:
        return pool, None, f"admin token Secret {secret!r} (key {key!r}) is missing"
    return pool, pool_view(pool, token, SETTINGS), ""


def pool_missing(body: dict, patch: kopf.Patch, why: str) -> None:
    gen = body["metadata"].get("generation")
    status = dict(body.get("status") or {})
    conditions = set_condition(status.get("conditions") or [], "Ready", False, "PoolNotReady", why, gen)
    if body["kind"] == "FinetuneJob":
        status.setdefault("phase", "Pending")
    write_status(patch, body, {**status, "conditions": conditions, "observedGeneration": gen})
    post(body, [("Warning", "PoolNotReady", why)])


# ---- CoServingPool ------------------------------------------------------------------------------------------

@kopf.on.create(GROUP, VERSION, "coservingpools")
@kopf.on.update(GROUP, VERSION, "coservingpools")
@kopf.on.resume(GROUP, VERSION, "coservingpools")
async def pool_children(body: kopf.Body, namespace: str, **_) -> None:
    """A managed pool's Secret, headless Service and StatefulSet, owned by the pool."""
    if body["spec"].get("engines"):
        return
    secret = token_secret(body)
    if body["spec"].get("adminTokenSecret") is None:
        kopf.adopt(secret, owner=body)
        await kube.ensure(namespace, secret, replace_spec=False)
    for manifest, replace in ((headless_service(body, SETTINGS), False), (statefulset(body, SETTINGS), True)):
        kopf.adopt(manifest, owner=body)
        await kube.ensure(namespace, manifest, replace_spec=replace)


@kopf.timer(GROUP, VERSION, "coservingpools", interval=SETTINGS.poll_seconds)
async def pool_status(body: kopf.Body, patch: kopf.Patch, namespace: str, name: str, **_) -> None:
    """Each engine's readiness and headroom, and how much work the pool carries."""
    _, view, why = await load_pool(namespace, name)
    gen = body["metadata"].get("generation")
    conditions = (body.get("status") or {}).get("conditions") or []
    engines = []
    if view is not None:
        caps = await view.capacities()
        for engine, url in engine_urls(body, SETTINGS).items():
            cap = caps.get(engine)
            engines.append({"name": engine, "url": url, "ready": cap is not None,
                            "adapterSlotsFree": (cap or {}).get("adapter_slots_free", 0),
                            "finetuneSlotsFree": (cap or {}).get("finetune_slots_free", 0),
                            "kvUsage": (cap or {}).get("kv_usage", 0.0)})
    ready = sum(e["ready"] for e in engines)
    total = len(engine_urls(body, SETTINGS))
    endpoints = [e for e in await kube.list_custom(namespace, "inferenceendpoints") if e["spec"]["pool"] == name]
    jobs = [j for j in await kube.list_custom(namespace, "finetunejobs") if j["spec"]["pool"] == name]
    reason = "EnginesReady" if ready else ("AdminTokenMissing" if view is None else "NoEngineReady")
    conditions = set_condition(conditions, "Ready", ready > 0, reason,
                               why or f"{ready}/{total} engines answer", gen)
    write_status(patch, body, {"observedGeneration": gen, "engines": engines, "readyEngines": f"{ready}/{total}",
                               "endpoints": len(endpoints), "jobs": len(jobs), "conditions": conditions})


@kopf.on.delete(GROUP, VERSION, "coservingpools")
async def pool_deleted(body: kopf.Body, namespace: str, name: str, **_) -> None:
    """Work on a deleted pool is marked, not silently lost."""
    for plural in ("inferenceendpoints", "finetunejobs"):
        for obj in await kube.list_custom(namespace, plural):
            if obj["spec"]["pool"] == name:
                kopf.event(obj, type="Warning", reason="PoolDeleted", message=f"pool {name} was deleted")


# ---- InferenceEndpoint --------------------------------------------------------------------------------------

@kopf.on.create(GROUP, VERSION, "inferenceendpoints")
@kopf.on.update(GROUP, VERSION, "inferenceendpoints")
@kopf.on.resume(GROUP, VERSION, "inferenceendpoints")
@kopf.timer(GROUP, VERSION, "inferenceendpoints", interval=SETTINGS.poll_seconds)
async def endpoint(body: kopf.Body, patch: kopf.Patch, namespace: str, **_) -> None:
    ref = (body["spec"].get("adapter") or {}).get("fromFinetuneJob")
    job_status = None
    if ref:
        job = await kube.get_custom(namespace, "finetunejobs", ref["name"])
        job_status = (job or {}).get("status") or ({} if job else None)
    pool, view, why = await load_pool(namespace, body["spec"]["pool"])
    if view is None:
        pool_missing(body, patch, why)
        return
    desired, events = await reconcile_endpoint(dict(body), view, job_status)
    try:
        desired["url"] = await route(body, pool, desired.get("placements") or []) or desired["url"]
    except ApiException as exc:
        events.append(("Warning", "ServiceNotUpdated", f"the endpoint's Service or EndpointSlices: {exc.status} "
                       f"{exc.reason}"))
    write_status(patch, body, desired)
    post(body, events)


async def route(body: kopf.Body, pool: dict, placements: list[dict]) -> str | None:
    """Keep the endpoint's Service and EndpointSlices equal to the engines holding its adapter; its URL, or
    None when no engine of the pool can sit behind a Service (loopback or named bring-your-own engines)."""
    namespace = body["metadata"]["namespace"]
    managed = not pool["spec"].get("engines")
    if managed:
        addresses = await kube.pod_ips(namespace, pool_labels(pool))
    else:
        addresses = {e: ip for e, url in engine_urls(pool, SETTINGS).items() if (ip := routable_ip(url))}
        if not addresses:
            return None
    manifests = [endpoint_service(body), *endpoint_slices(body, addresses, placements, pods=managed)]
    kopf.adopt(manifests, owner=body)
    uid, key = body["metadata"]["uid"], json.dumps(manifests, sort_keys=True)
    last, when = _routed.get(uid, ("", 0.0))
    if key != last or time.monotonic() - when > SETTINGS.route_resync_seconds:   # no API calls when unchanged
        await kube.apply(namespace, manifests, prune_slices=endpoint_labels(body))
        _routed[uid] = key, time.monotonic()
    return service_url(namespace, body["metadata"]["name"], SETTINGS.cluster_domain)


@kopf.on.delete(GROUP, VERSION, "inferenceendpoints")
async def endpoint_deleted(body: kopf.Body, namespace: str, retry: int, **_) -> None:
    _routed.pop(body["metadata"]["uid"], None)
    _, view, _why = await load_pool(namespace, body["spec"]["pool"])
    if view is not None:
        release(body, retry, *await release_endpoint(dict(body), view))


def release(body: kopf.Body, retry: int, events: list[Event], unreached: list[str]) -> None:
    """Engines that did not answer a release are retried with backoff a few times; then the object goes anyway
    (deletion never hangs) with a Warning saying what may be left behind."""
    if unreached and retry < SETTINGS.release_retries:
        raise kopf.TemporaryError(f"engines {', '.join(unreached)} did not answer", delay=SETTINGS.retry_seconds)
    post(body, events)


# ---- FinetuneJob --------------------------------------------------------------------------------------------

@kopf.on.create(GROUP, VERSION, "finetunejobs")
@kopf.on.update(GROUP, VERSION, "finetunejobs")
@kopf.on.resume(GROUP, VERSION, "finetunejobs")
@kopf.timer(GROUP, VERSION, "finetunejobs", interval=SETTINGS.poll_seconds)
async def finetune_job(body: kopf.Body, patch: kopf.Patch, namespace: str, **_) -> None:
    _, view, why = await load_pool(namespace, body["spec"]["pool"])
    if view is None:
        pool_missing(body, patch, why)
        return
    desired, events = await reconcile_job(dict(body), view)
    write_status(patch, body, desired)
    post(body, events)


@kopf.on.delete(GROUP, VERSION, "finetunejobs")
async def finetune_job_deleted(body: kopf.Body, namespace: str, retry: int, **_) -> None:
    _, view, _why = await load_pool(namespace, body["spec"]["pool"])
    if view is not None:
        release(body, retry, *await release_job(dict(body), view))
