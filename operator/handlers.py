"""kopf handlers: one reconcile loop (a daemon, loops.py) per object writes its status and posts its Events;
watch handlers only wake loops (a spec change, a followed job's new checkpoint); deletion releases the engines,
retrying those that do not answer with backoff."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import kopf
from kubernetes.client.rest import ApiException

from coserve.operator import kube, loops
from coserve.operator.conditions import set_condition
from coserve.operator.pool import (engine_urls, headless_service, pool_labels, pool_view, statefulset,
                                   token_secret, token_secret_ref)
from coserve.operator.reconcile import (Event, PoolView, reconcile_endpoint, reconcile_job, release_endpoint,
                                        release_job)
from coserve.operator.routing import endpoint_labels, endpoint_service, endpoint_slices, routable_ip, service_url
from coserve.operator.settings import OperatorSettings

GROUP, VERSION = kube.GROUP, kube.VERSION
SETTINGS = OperatorSettings()
LOOPS = loops.Loops()
STOP_SECONDS = SETTINGS.engine_timeout_seconds   # a loop stopped mid-pass is cancelled; kopf waits this long
_routed: dict[str, tuple[str, float]] = {}   # endpoint uid -> (its Service and slices as last applied, when)
_children: dict[str, tuple[int | None, float]] = {}   # pool uid -> (generation of its objects as applied, when)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    """Progress in annotations (status is schema-pruned), Events only for what we post ourselves, and no log line
    per engine request (each loop polls its engines every few seconds)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="coserve.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="coserve.dev")
    settings.posting.level = logging.ERROR
    settings.watching.server_timeout = 300
    kube.load_config()


@kopf.on.probe(id="engines")
def liveness(**_) -> str:
    return "ok"


def post(body: Mapping, events: list[Event]) -> None:
    for type_, reason, message in events:
        kopf.event(dict(body), type=type_, reason=reason, message=message)


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


def pool_missing(body: dict, why: str) -> tuple[dict, list[Event]]:
    """The status of work whose pool cannot be used, and the Warning (posted once while it stays so)."""
    gen = body["metadata"].get("generation")
    status = dict(body.get("status") or {})
    conditions = set_condition(status.get("conditions") or [], "Ready", False, "PoolNotReady", why, gen)
    if body["kind"] == "FinetuneJob":
        status.setdefault("phase", "Pending")
    return {**status, "conditions": conditions, "observedGeneration": gen}, [("Warning", "PoolNotReady", why)]


async def reconcile_loop(plural: str, body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger,
                         step: loops.Step) -> None:
    """Run the object's loop (loops.run) with the Kubernetes side: status by merge patch, Events by kopf."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    loop = LOOPS.open(plural, namespace, name)

    async def write(patch: dict) -> None:
        await kube.patch_status(namespace, plural, name, patch)

    try:
        await loops.run(loop, body, stopped, step, write, lambda events: post(body, events), SETTINGS.poll_seconds,
                        logger)
    finally:
        LOOPS.close(loop)


async def released(plural: str, body: kopf.Body, retry: int, logger: kopf.Logger,
                   release: Callable[[dict, PoolView], Awaitable[tuple[list[Event], list[str]]]]) -> None:
    """On deletion: the object's engine side released (never during a pass of its loop). Engines that did not
    answer are retried with backoff a few times; then the object goes anyway (deletion never hangs) with a
    Warning saying what may be left behind; an unexpected error is one Warning, and the object goes."""
    meta = body["metadata"]
    try:
        async with LOOPS.lock(plural, meta["namespace"], meta["name"]):
            _, view, _why = await load_pool(meta["namespace"], body["spec"]["pool"])
            if view is None:
                return
            events, unreached = await release(loops.snapshot(body), view)
    except Exception as exc:
        logger.warning(f"release failed: {type(exc).__name__}: {exc}", exc_info=True)
        post(body, [("Warning", "ReleaseIncomplete", f"{type(exc).__name__}: {exc}"[:1000])])
        return
    if unreached and retry < SETTINGS.release_retries:
        raise kopf.TemporaryError(f"engines {', '.join(unreached)} did not answer", delay=SETTINGS.retry_seconds)
    post(body, events)


# ---- CoServingPool ------------------------------------------------------------------------------------------

@kopf.daemon(GROUP, VERSION, "coservingpools", cancellation_timeout=STOP_SECONDS)
async def pool_daemon(body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_) -> None:
    await reconcile_loop("coservingpools", body, stopped, logger, pool_pass)


async def pool_pass(body: dict) -> tuple[dict, list[Event]]:
    """A managed pool's owned objects, then each engine's readiness and headroom, the model they serve, and
    how much work the pool carries."""
    meta = body["metadata"]
    namespace, name, gen = meta["namespace"], meta["name"], meta.get("generation")
    if not body["spec"].get("engines"):
        await pool_children(body)
    _, view, why = await load_pool(namespace, name)
    engines = []
    caps: dict[str, dict | None] = await view.capacities() if view is not None else {}
    urls = engine_urls(body, SETTINGS)
    for engine, url in urls.items():
        cap = caps.get(engine) or {}
        engines.append({"name": engine, "url": url, "ready": caps.get(engine) is not None,
                        "adapterSlotsFree": cap.get("adapter_slots_free", 0),
                        "finetuneSlotsFree": cap.get("finetune_slots_free", 0), "kvUsage": cap.get("kv_usage", 0.0)})
    ready = sum(e["ready"] for e in engines)
    models = sorted({str(cap["model"]) for cap in caps.values() if cap and cap.get("model")})
    endpoints = [e for e in await kube.list_custom(namespace, "inferenceendpoints") if e["spec"].get("pool") == name]
    jobs = [j for j in await kube.list_custom(namespace, "finetunejobs") if j["spec"].get("pool") == name]
    reason = "EnginesReady" if ready else ("AdminTokenMissing" if view is None else "NoEngineReady")
    status = dict(body.get("status") or {})
    conditions = set_condition(status.get("conditions") or [], "Ready", ready > 0, reason,
                               why or f"{ready}/{len(urls)} engines answer", gen)
    desired = {**status, "observedGeneration": gen, "engines": engines, "readyEngines": f"{ready}/{len(urls)}",
               "replicas": len(urls), "selector": kube.label_selector(pool_labels(body)),
               "endpoints": len(endpoints), "jobs": len(jobs), "conditions": conditions}
    if models:   # what clients send for the base model; kept while no engine answers
        desired["model"] = ",".join(models)
    return desired, []


async def pool_children(body: dict) -> None:
    """A managed pool's Secret, headless Service and StatefulSet, owned by the pool: applied when the spec
    changes and every resync period, not on every pass."""
    meta = body["metadata"]
    key, when = _children.get(meta["uid"], (None, 0.0))
    if key == meta.get("generation") and time.monotonic() - when < SETTINGS.route_resync_seconds:
        return
    namespace = meta["namespace"]
    secret = token_secret(body)
    if body["spec"].get("adminTokenSecret") is None:
        kopf.adopt(secret, owner=body)
        await kube.ensure(namespace, secret, replace_spec=False)
    for manifest, replace in ((headless_service(body, SETTINGS), False), (statefulset(body, SETTINGS), True)):
        kopf.adopt(manifest, owner=body)
        await kube.ensure(namespace, manifest, replace_spec=replace)
    _children[meta["uid"]] = meta.get("generation"), time.monotonic()


@kopf.on.event(GROUP, VERSION, "coservingpools")
def pool_seen(body: kopf.Body, **_) -> None:
    """A spec change (`kubectl scale csp/x`, a new engine list) wakes the pool's loop at once."""
    LOOPS.spec_seen("coservingpools", body)


@kopf.on.delete(GROUP, VERSION, "coservingpools")
async def pool_deleted(body: kopf.Body, namespace: str, name: str, logger: kopf.Logger, **_) -> None:
    """Work on a deleted pool is marked, not silently lost."""
    _children.pop(body["metadata"]["uid"], None)
    try:
        for plural in ("inferenceendpoints", "finetunejobs"):
            for obj in await kube.list_custom(namespace, plural):
                if obj["spec"].get("pool") == name:
                    kopf.event(obj, type="Warning", reason="PoolDeleted", message=f"pool {name} was deleted")
    except Exception as exc:
        logger.warning(f"marking the pool's work failed: {type(exc).__name__}: {exc}", exc_info=True)
        post(body, [("Warning", loops.error_reason(exc), f"{type(exc).__name__}: {exc}"[:1000])])


# ---- InferenceEndpoint --------------------------------------------------------------------------------------

@kopf.daemon(GROUP, VERSION, "inferenceendpoints", cancellation_timeout=STOP_SECONDS)
async def endpoint_daemon(body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_) -> None:
    await reconcile_loop("inferenceendpoints", body, stopped, logger, endpoint_pass)


@kopf.on.event(GROUP, VERSION, "inferenceendpoints")
def endpoint_seen(body: kopf.Body, **_) -> None:
    LOOPS.spec_seen("inferenceendpoints", body)


async def endpoint_pass(body: dict) -> tuple[dict, list[Event]]:
    namespace = body["metadata"]["namespace"]
    ref = (body["spec"].get("adapter") or {}).get("fromFinetuneJob")
    job_status = None
    if ref:
        job = await kube.get_custom(namespace, "finetunejobs", ref["name"])
        job_status = (job or {}).get("status") or ({} if job else None)
    pool, view, why = await load_pool(namespace, body["spec"]["pool"])
    if view is None or pool is None:
        return pool_missing(body, why)
    return await serve_endpoint(body, pool, view, job_status)


async def serve_endpoint(body: dict, pool: dict, view: PoolView,
                         job_status: dict | None) -> tuple[dict, list[Event]]:
    """The endpoint reconciled on its engines and routed: its Service URL when a Service can point at the
    engines, else the URL of an engine serving it (empty while none does)."""
    desired, events = await reconcile_endpoint(body, view, job_status)
    desired["selector"] = kube.label_selector(pool_labels(pool))   # the pods an HPA's pod metrics average over
    gen = body["metadata"].get("generation")
    conditions = desired.get("conditions") or []
    try:
        url = await route(body, pool, desired.get("placements") or [])
    except ApiException as exc:
        message = f"the endpoint's Service or EndpointSlices: {exc.status} {exc.reason}"
        events.append(("Warning", "ServiceNotUpdated", message))
        desired["conditions"] = set_condition(conditions, "Routed", False, "ServiceNotUpdated", message, gen)
        return desired, events
    if any(c.get("type") == "Routed" for c in conditions):
        desired["conditions"] = set_condition(conditions, "Routed", True, "ServiceUpdated", "", gen)
    desired["url"] = url or desired.get("url") or ""
    return desired, events


async def route(body: dict, pool: dict, placements: list[dict]) -> str | None:
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
async def endpoint_deleted(body: kopf.Body, retry: int, logger: kopf.Logger, **_) -> None:
    _routed.pop(body["metadata"]["uid"], None)
    await released("inferenceendpoints", body, retry, logger, release_endpoint)


# ---- FinetuneJob --------------------------------------------------------------------------------------------

@kopf.daemon(GROUP, VERSION, "finetunejobs", cancellation_timeout=STOP_SECONDS)
async def job_daemon(body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_) -> None:
    await reconcile_loop("finetunejobs", body, stopped, logger, job_pass)


@kopf.on.event(GROUP, VERSION, "finetunejobs")
def job_seen(body: kopf.Body, type: str | None, **_) -> None:
    """A spec change wakes the job's loop; a new checkpoint or phase, or its deletion, wakes the endpoints
    following it."""
    LOOPS.spec_seen("finetunejobs", body)
    LOOPS.job_seen(body, gone=type == "DELETED")


async def job_pass(body: dict) -> tuple[dict, list[Event]]:
    _, view, why = await load_pool(body["metadata"]["namespace"], body["spec"]["pool"])
    if view is None:
        return pool_missing(body, why)
    return await reconcile_job(body, view)


@kopf.on.delete(GROUP, VERSION, "finetunejobs")
async def finetune_job_deleted(body: kopf.Body, retry: int, logger: kopf.Logger, **_) -> None:
    await released("finetunejobs", body, retry, logger, release_job)
