"""Level-triggered reconciliation of endpoints and jobs against a pool's engines. Each function reads the
object and the engines, acts to converge, and returns the status it should have plus the Events to post;
the kopf handlers do the Kubernetes side. Placements live in status, so a restarted operator resumes them."""
from __future__ import annotations

import asyncio
import datetime
import hashlib
import time
from dataclasses import dataclass

from coserve.operator.conditions import now_iso, set_condition
from coserve.operator.engine_client import EngineClient, EngineRejected, EngineUnavailable
from coserve.operator.placement import pick_endpoint_engines, pick_job_engine, reserve

Event = tuple[str, str, str]          # (Normal|Warning, Reason, message)
_pool_locks: dict[str, asyncio.Lock] = {}


@dataclass
class PoolView:
    """What the reconcilers need of a pool: its engines (name -> admin URL) and how to reach them."""

    namespace: str
    name: str
    engines: dict[str, str]
    client: EngineClient

    def lock(self) -> asyncio.Lock:
        """Serialises placement decisions on one pool, so concurrent handlers cannot over-commit an engine."""
        return _pool_locks.setdefault(f"{self.namespace}/{self.name}", asyncio.Lock())

    async def capacities(self) -> dict[str, dict | None]:
        async def one(url: str) -> dict | None:
            try:
                return await self.client.capacity(url)
            except (EngineUnavailable, EngineRejected):
                return None
        names = list(self.engines)
        caps = await asyncio.gather(*(one(self.engines[n]) for n in names))
        return dict(zip(names, caps))


# ---- InferenceEndpoint --------------------------------------------------------------------------------------

def endpoint_adapter_path(spec: dict, job_status: dict | None) -> tuple[str | None, str | None]:
    """(adapter path or None for the base model, reason it is not available yet or None)."""
    adapter = spec.get("adapter")
    if not adapter:
        return None, None
    if adapter.get("path"):
        return adapter["path"], None
    ref = adapter["fromFinetuneJob"]
    if job_status is None:
        return None, f"FinetuneJob {ref['name']!r} does not exist"
    checkpoints = [c for c in job_status.get("checkpoints") or [] if isinstance(c, dict) and c.get("path")]
    which = str(ref.get("checkpoint", "latest"))
    if which == "latest":
        return (checkpoints[-1]["path"], None) if checkpoints else (None, "the job has no checkpoint yet")
    if which == "final":
        if job_status.get("phase") != "Succeeded":
            return None, "the job has not finished"
        return checkpoints[-1]["path"], None
    match = [c for c in checkpoints if str(c.get("step")) == which]
    return (match[0]["path"], None) if match else (None, f"the job has no checkpoint at step {which}")


async def reconcile_endpoint(body: dict, pool: PoolView, job_status: dict | None) -> tuple[dict, list[Event]]:
    """The endpoint's whole desired status (what it had, updated) and the Events to post."""
    changes, events = await _reconcile_endpoint(body, pool, job_status)
    return {**(body.get("status") or {}), **changes}, events


async def _reconcile_endpoint(body: dict, pool: PoolView, job_status: dict | None) -> tuple[dict, list[Event]]:
    meta, spec, status = body["metadata"], body["spec"], dict(body.get("status") or {})
    generation = meta.get("generation")
    name = spec.get("servedModelName") or meta["name"]
    replicas = spec.get("replicas", 1)
    events: list[Event] = []
    path, waiting = endpoint_adapter_path(spec, job_status)
    conditions = status.get("conditions") or []
    if spec.get("adapter") and path is None:
        conditions = set_condition(conditions, "Ready", False, "WaitingForAdapter", waiting, generation)
        events.append(("Normal", "WaitingForAdapter", waiting))
        return {"observedGeneration": generation, "conditions": conditions, "readyReplicas": 0, "replicas": 0,
                "readyReplicasText": f"0/{replicas}", "model": name, "url": status.get("url") or ""}, events
    async with pool.lock():
        caps = await pool.capacities()
        placements: list[dict] = []
        for p in status.get("placements") or []:
            if not isinstance(p, dict) or p.get("engine") not in pool.engines:
                continue   # an engine the pool no longer lists, or a malformed entry: placed again below
            if caps.get(p["engine"]) is None:
                events.append(("Warning", "EngineLost", f"engine {p['engine']} stopped answering; re-placing"))
                status["lastFailure"] = {"engine": p["engine"], "time": now_iso(), "message": "engine not answering"}
            else:
                placements.append(p)
        if path is not None and len(placements) < replicas:   # only a placement can go twice
            placements += await _holders(pool, caps, name, path, {p["engine"] for p in placements})
        extra = placements[replicas:]
        placements = placements[:replicas]
        for p in extra:
            if path is not None:
                await _unload(pool, p["engine"], name)
            events.append(("Normal", "ScaledDown", f"released replica on {p['engine']}"))
        for engine in pick_endpoint_engines(caps, {p["engine"] for p in placements}, replicas - len(placements),
                                            path is not None):
            reserve(caps, engine, adapter_slot=path is not None)
            placements.append({"engine": engine, "url": pool.engines[engine], "state": "Pending"})
            events.append(("Normal", "Placed", f"replica placed on engine {engine}"))
        for p in placements:
            p["url"] = pool.engines[p["engine"]]
            if path is None:
                p.update(state="Loaded", adapterPath="")
                continue
            await _ensure_adapter(pool, p, name, path, events)
            if p["state"] == "Failed":
                status["lastFailure"] = {"engine": p["engine"], "time": now_iso(), "message": p.get("lastError", "")}
    placements.sort(key=lambda p: p["engine"])   # a stable order, so an unchanged state writes nothing
    if path is None:   # the base model answers to the engines' own name for it
        name = next((caps[p["engine"]]["model"] for p in placements
                     if (caps.get(p["engine"]) or {}).get("model")), name)
    ready = sum(p["state"] == "Loaded" for p in placements)
    loaded = [p for p in placements if p["state"] == "Loaded"]
    url = loaded[0]["url"] + "/v1" if loaded else ""   # the handler puts the endpoint's Service URL here
    conditions = set_condition(conditions, "Placed", len(placements) >= replicas,
                               "Placed" if len(placements) >= replicas else "NoCapacity",
                               f"{len(placements)}/{replicas} replicas placed", generation)
    failed = [p for p in placements if p["state"] == "Failed"]
    if ready >= replicas:
        conditions = set_condition(conditions, "Ready", True, "AdapterLoaded" if path else "Serving",
                                   f"{ready}/{replicas} replicas serving {name}", generation)
    else:
        reason = "AdapterLoadFailed" if failed else ("NoCapacity" if len(placements) < replicas else "Loading")
        message = (f"engine {failed[0]['engine']}: {failed[0].get('lastError', '')}" if failed
                   else f"{ready}/{replicas} replicas serving")
        conditions = set_condition(conditions, "Ready", False, reason, message, generation)
    out = {"observedGeneration": generation, "url": url, "model": name, "adapterPath": path or "",
           "replicas": len(placements), "readyReplicas": ready, "readyReplicasText": f"{ready}/{replicas}",
           "placements": placements,
           "conditions": conditions}
    if "lastFailure" in status:
        out["lastFailure"] = status["lastFailure"]
    return out, events


async def _holders(pool: PoolView, caps: dict[str, dict | None], name: str, path: str,
                   known: set[str]) -> list[dict]:
    """Engines that already hold the adapter but are missing from status (a stale or lost status write):
    adopted, so replicas are never placed twice."""
    found = []
    for engine, cap in caps.items():
        if cap is None or engine in known:
            continue
        try:
            have = await pool.client.get_adapter(pool.engines[engine], name)
        except (EngineUnavailable, EngineRejected):
            continue
        if have is not None and have.get("path") == path:
            found.append({"engine": engine, "url": pool.engines[engine], "state": "Loaded", "adapterPath": path})
    return found


async def _ensure_adapter(pool: PoolView, p: dict, name: str, path: str, events: list[Event]) -> None:
    url = pool.engines[p["engine"]]
    try:
        have = await pool.client.get_adapter(url, name)
        if have is not None and have.get("path") == path:
            p.update(state="Loaded", adapterPath=path)
            p.pop("lastError", None)
            return
        await pool.client.load_adapter(url, name, path)
        p.update(state="Loaded", adapterPath=path)
        p.pop("lastError", None)
        events.append(("Normal", "AdapterReloaded" if have else "AdapterLoaded",
                       f"{name} <- {path} on engine {p['engine']}"))
    except EngineRejected as exc:
        p.update(state="Failed", lastError=exc.message)
        events.append(("Warning", "AdapterLoadFailed", f"engine {p['engine']}: {exc.message}"))
    except EngineUnavailable as exc:
        p.update(state="Pending", lastError=str(exc))


async def _unload(pool: PoolView, engine: str, name: str) -> bool:
    """Unload the adapter; False when the engine did not answer (it may still hold it)."""
    try:
        await pool.client.unload_adapter(pool.engines[engine], name)
    except EngineUnavailable:
        return False
    except EngineRejected:
        pass
    return True


async def release_endpoint(body: dict, pool: PoolView) -> tuple[list[Event], list[str]]:
    """On deletion: unload the adapter everywhere it is placed. Returns the Events and the engines that did not
    answer, which the handler retries a few times before letting the object go."""
    spec, status = body["spec"], body.get("status") or {}
    name = spec.get("servedModelName") or body["metadata"]["name"]
    unreached = []
    if spec.get("adapter"):
        for p in status.get("placements") or []:
            if isinstance(p, dict) and p.get("engine") in pool.engines and not await _unload(pool, p["engine"], name):
                unreached.append(p["engine"])
    if unreached:
        return [("Warning", "ReleaseIncomplete", f"engines {', '.join(unreached)} did not answer; they may still "
                 f"hold {name} until they restart")], unreached
    return [("Normal", "Released", f"{name} unloaded from its engines")], []


# ---- FinetuneJob --------------------------------------------------------------------------------------------

def engine_job_id(namespace: str, name: str, attempt: int) -> str:
    raw = f"{namespace}.{name}.{attempt}"
    return raw if len(raw) <= 63 else f"{name[:40]}-{hashlib.sha1(raw.encode()).hexdigest()[:12]}.{attempt}"


def engine_job_body(body: dict, job_id: str, resume_from: str | None) -> dict:
    """The engine API's job request from the FinetuneJob's spec (camelCase to the engine's names)."""
    spec, meta = body["spec"], body["metadata"]
    lora, t = spec.get("lora") or {}, spec.get("training") or {}
    training = {"optimizer": t.get("optimizer", "adamw"), "lr": t.get("lr", 1e-4),
                "lr_schedule": t.get("lrSchedule", "constant"), "warmup_steps": t.get("warmupSteps", 0),
                "weight_decay": t.get("weightDecay", 0.0), "max_grad_norm": t.get("maxGradNorm"),
                "epochs": t.get("epochs", 1), "max_steps": t.get("maxSteps"),
                "sequences_per_step": t.get("sequencesPerStep", 1), "max_seq_len": t.get("maxSeqLen"),
                "packing": t.get("packing", False), "shuffle": t.get("shuffle", True), "seed": t.get("seed", 0),
                "chunk_tokens": t.get("chunkTokens", 64)}
    return {"id": job_id, "dataset": {"path": spec["dataset"]["path"],
                                      "format": spec["dataset"].get("format", "text")},
            "lora": {"r": lora.get("r", 16), "alpha": lora.get("alpha", 32), "dropout": lora.get("dropout", 0.0),
                     "target_modules": lora.get("targetModules", ["q_proj", "v_proj"]),
                     "use_rslora": lora.get("useRslora", False)},
            "training": training, "output": spec.get("output") or f"adapters/{meta['namespace']}/{meta['name']}",
            "checkpoint_every": spec.get("checkpointEvery", 100), "init_from": None if resume_from
            else spec.get("initFrom"), "resume_from": resume_from}


def _merge_checkpoints(old: list[dict], new: list[dict]) -> list[dict]:
    """The status's checkpoints with the engine's new ones, by step; entries without a step and path (a
    status edited by hand, an engine of another version) are dropped rather than trusted."""
    by_step = {c["step"]: c for c in old if isinstance(c, dict) and isinstance(c.get("step"), int) and c.get("path")}
    for c in new:
        if not isinstance(c.get("step"), int) or not c.get("path"):
            continue
        by_step[c["step"]] = {"step": c["step"], "path": c["path"], "sha256": c.get("sha256") or "",
                              "createdAt": c.get("createdAt") or _iso(c.get("time"))}
        if c.get("loss") is not None:
            by_step[c["step"]]["loss"] = round(c["loss"], 6)
    return [by_step[s] for s in sorted(by_step)][-50:]


def _age(iso: str) -> float:
    """Seconds since `iso`; 0 for a timestamp that does not parse (the deadline then counts from now on)."""
    try:
        started = datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    except (TypeError, ValueError):
        return 0.0
    return (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()


def _iso(ts: float | None) -> str:
    if ts is None:
        return now_iso()
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _start_step(progress: dict) -> int:
    """The step this engine job began at: a resumed job names its checkpoint (`.../checkpoint-<step>`)."""
    tail = str(progress.get("resumed_from") or "").rstrip("/").rsplit("checkpoint-", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else 0


def remaining_seconds(progress: dict, now: float) -> int | None:
    """Time left at the pace of this engine job's own steps (the steps it ran since it started or resumed);
    None before it has finished a step, or when it is not running."""
    step, total = int(progress.get("step") or 0), int(progress.get("total_steps") or 0)
    started = progress.get("started")
    done = step - _start_step(progress)
    if progress.get("state") != "running" or not started or done <= 0 or total <= 0:
        return None
    return max(0, round((now - started) / done * max(0, total - step)))


def duration_text(seconds: int) -> str:
    """`kubectl`'s way of writing a span: 45s, 3m20s, 2h5m, 3d4h."""
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60}s" if seconds % 60 else f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m" if seconds % 3600 // 60 else f"{seconds // 3600}h"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def _progress_fields(progress: dict, status: dict, events: list[Event]) -> dict:
    """Status fields from the engine's job progress, under Kubeflow Trainer's names (`progressPercentage`,
    `estimatedRemainingSeconds`) and as the text of the PROGRESS, ETA and STEP columns."""
    listed = [c for c in progress.get("checkpoints") or [] if isinstance(c, dict)]
    old = _merge_checkpoints(status.get("checkpoints") or [], [])
    # one this engine job wrote and no longer lists was deleted by its retention (save_total_limit); earlier
    # attempts' checkpoints stay
    kept = {c.get("step") for c in listed}
    checkpoints = _merge_checkpoints([c for c in old if c["step"] <= _start_step(progress) or c["step"] in kept],
                                     listed)
    for c in checkpoints:
        if c["step"] not in {o["step"] for o in old}:
            events.append(("Normal", "CheckpointWritten", f"step {c['step']}: {c['path']}"))
    step, total = int(progress.get("step") or 0), max(1, int(progress.get("total_steps") or 0))
    rate = progress.get("tokens_per_s") or 0.0
    metrics = [{"name": "loss", "value": f"{progress['loss']:.6g}" if progress.get("loss") is not None else ""},
               {"name": "tokensPerSecond", "value": f"{rate:.1f}"},
               {"name": "epoch", "value": str(progress.get("epoch", 0))}]
    percentage = min(100, int(100 * step / total))
    remaining = remaining_seconds(progress, time.time())
    if progress.get("state") == "succeeded":
        remaining = 0
    out = {"progress": {"progressPercentage": percentage, "currentStep": step, "totalSteps": total,
                        "epoch": progress.get("epoch", 0), "metrics": metrics, "lastUpdatedTime": now_iso()},
           "stepText": f"{step}/{total}", "progressText": f"{percentage}%", "etaText": "",
           "tokensPerSecond": round(rate, 1), "checkpoints": checkpoints,
           "latestCheckpoint": checkpoints[-1]["path"] if checkpoints else ""}
    if remaining is not None:
        out["progress"]["estimatedRemainingSeconds"] = remaining
        out["etaText"] = duration_text(remaining)
    if progress.get("loss") is not None:
        out["loss"] = round(progress["loss"], 6)
    return out


async def reconcile_job(body: dict, pool: PoolView) -> tuple[dict, list[Event]]:
    """The job's whole desired status (what it had, updated) and the Events to post."""
    changes, events = await _reconcile_job(body, pool)
    return {**(body.get("status") or {}), **changes}, events


async def _reconcile_job(body: dict, pool: PoolView) -> tuple[dict, list[Event]]:
    meta, spec = body["metadata"], body["spec"]
    status = dict(body.get("status") or {})
    generation = meta.get("generation")
    events: list[Event] = []
    conditions = status.get("conditions") or []
    phase = status.get("phase", "Pending")
    out: dict = {"observedGeneration": generation}
    if phase in ("Succeeded", "Failed"):
        return out, events
    placement = _placement(status.get("placement"))
    if spec.get("suspend"):
        if placement:
            try:
                final = await pool.client.cancel_job(placement["url"], placement["engineJobId"], checkpoint=True)
                if final:
                    out.update(_progress_fields(final, status, events))
            except (EngineUnavailable, EngineRejected) as exc:
                events.append(("Warning", "SuspendUnclean", f"engine did not confirm the stop: {exc}"))
            events.append(("Normal", "Suspended", "job stopped after a checkpoint"))
        out.update(phase="Suspended", placement=None, etaText="", conditions=set_condition(
            conditions, "Progressing", False, "Suspended", "spec.suspend is true", generation))
        return out, events
    deadline = spec.get("activeDeadlineSeconds")
    if placement and deadline and status.get("startTime") and _age(status["startTime"]) > deadline:
        try:
            final = await pool.client.cancel_job(placement["url"], placement["engineJobId"], checkpoint=True)
            if final:
                out.update(_progress_fields(final, status, events))
        except (EngineUnavailable, EngineRejected):
            pass
        message = f"ran longer than activeDeadlineSeconds={deadline}; stopped after a checkpoint"
        events.append(("Warning", "DeadlineExceeded", message))
        out.update(phase="Failed", placement=None, completionTime=now_iso(), etaText="", conditions=set_condition(
            conditions, "Failed", True, "DeadlineExceeded", message, generation))
        return out, events
    if placement:
        try:
            progress = await pool.client.get_job(placement["url"], placement["engineJobId"])
        except (EngineUnavailable, EngineRejected) as exc:
            progress = None
            events.append(("Warning", "EngineLost", f"engine {placement['engine']} lost the job ({exc}); re-placing "
                           "from the last checkpoint"))
            out["lastFailure"] = {"engine": placement["engine"], "time": now_iso(), "message": str(exc)[:500]}
        if progress is not None and progress.get("state") == "interrupted":
            out.update(_progress_fields(progress, status, events))   # its shutdown checkpoint, if it wrote one
            events.append(("Warning", "EngineRestarted", f"engine {placement['engine']} restarted and interrupted "
                           "the job; resuming from the last checkpoint"))
            progress = None
        if progress is not None and progress.get("state") != "cancelled":
            out.update(_progress_fields(progress, status, events))
            state = progress.get("state")
            if state == "succeeded":
                events.append(("Normal", "Completed", f"trained {out['progress']['currentStep']} steps"))
                out.update(phase="Succeeded", completionTime=now_iso(), conditions=set_condition(
                    set_condition(conditions, "Progressing", False, "Completed", "training finished", generation),
                    "Succeeded", True, "Completed", out.get("latestCheckpoint", ""), generation))
            elif state == "failed":
                events.append(("Warning", "TrainingFailed", progress.get("error") or "the engine failed the job"))
                out.update(phase="Failed", completionTime=now_iso(), conditions=set_condition(
                    conditions, "Failed", True, "TrainingFailed", progress.get("error") or "", generation))
            else:
                out.update(phase="Running", conditions=set_condition(
                    conditions, "Progressing", True, "Training", f"step {out['stepText']} on "
                    f"{placement['engine']}", generation))
            return out, events
        status.update({k: v for k, v in out.items() if k != "observedGeneration"})
    return await _place_job(body, status, pool, out, events)


async def _place_job(body: dict, status: dict, pool: PoolView, out: dict,
                     events: list[Event]) -> tuple[dict, list[Event]]:
    meta = body["metadata"]
    generation = meta.get("generation")
    conditions = status.get("conditions") or []
    attempt = int(status.get("attempt", 0)) + (1 if status.get("placement") or status.get("phase") else 0)
    resume = status.get("latestCheckpoint") or None
    async with pool.lock():
        caps = await pool.capacities()
        job_id = engine_job_id(meta["namespace"], meta["name"], attempt)
        adopted = await _find_job(pool, caps, job_id)
        engine = adopted or pick_job_engine(caps)
        if engine is None:
            why = "no engine of the pool has a free finetuning slot"
            events.append(("Warning", "NoCapacity", why))
            out.update(phase="Pending", placement=None, conditions=set_condition(
                conditions, "Placed", False, "NoCapacity", why, generation))
            return out, events
        url = pool.engines[engine]
        try:
            progress = (await pool.client.get_job(url, job_id) if adopted
                        else await pool.client.create_job(url, engine_job_body(body, job_id, resume)))
        except EngineRejected as exc:
            if exc.status == 409 and exc.param == "id":
                progress = await pool.client.get_job(url, job_id)   # created before a restart: adopt it
            else:
                events.append(("Warning", "InvalidSpec", exc.message))
                out.update(phase="Failed", placement=None, completionTime=now_iso(), conditions=set_condition(
                    conditions, "Failed", True, "InvalidSpec", f"{exc.param or 'spec'}: {exc.message}",
                    generation))
                return out, events
        except EngineUnavailable as exc:
            events.append(("Warning", "EngineLost", str(exc)))
            out.update(phase="Pending", placement=None)
            return out, events
        reserve(caps, engine, finetune_slot=True)
    events.append(("Normal", "Placed", f"training on engine {engine}" + (f", resuming from {resume}" if resume
                                                                         else "")))
    out.update(phase="Running", attempt=attempt, startTime=status.get("startTime") or now_iso(),
               placement={"engine": engine, "url": url, "engineJobId": job_id, "attempt": attempt},
               conditions=set_condition(set_condition(conditions, "Placed", True, "Placed", f"engine {engine}",
                                                      generation), "Progressing", True, "Training",
                                        f"attempt {attempt}", generation))
    out.update(_progress_fields(progress, status, events))
    return out, events


def _placement(placement: object) -> dict | None:
    """The job's placement from status when it names an engine, its URL and the engine job; else None (placed
    again, adopting the engine job if it runs)."""
    if not isinstance(placement, dict) or not all(placement.get(k) for k in ("engine", "url", "engineJobId")):
        return None
    return placement


async def _find_job(pool: PoolView, caps: dict[str, dict | None], job_id: str) -> str | None:
    """The engine already running this attempt, if any: placing twice (a handler that saw a stale status, an
    operator restarted mid-placement) adopts it instead of starting a second job."""
    for engine, cap in caps.items():
        if cap is None:
            continue
        try:
            found = await pool.client.get_job(pool.engines[engine], job_id)
        except (EngineUnavailable, EngineRejected):
            continue
        if (found or {}).get("state") in ("queued", "running", "succeeded"):
            return engine
    return None


async def release_job(body: dict, pool: PoolView) -> tuple[list[Event], list[str]]:
    """On deletion: cancel the engine job (checkpoints stay on the storage). Returns the Events and the engine
    that did not answer, if any."""
    placement = _placement((body.get("status") or {}).get("placement"))
    if placement:
        try:
            await pool.client.cancel_job(placement["url"], placement["engineJobId"])
        except EngineUnavailable:
            return [("Warning", "ReleaseIncomplete", f"engine {placement['engine']} did not answer; its job "
                     f"{placement['engineJobId']} may still run")], [placement["engine"]]
        except EngineRejected:
            pass
    return [("Normal", "Released", "engine job cancelled; checkpoints kept")], []
