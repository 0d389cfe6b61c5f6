"""One reconcile loop per object, run as a kopf daemon: it alone writes the object's status and posts its
Events, so each change is seen (and announced) once. It wakes on its poll, on a change of its spec, or when a
FinetuneJob it follows writes a new checkpoint; any error of a pass becomes a condition and one Warning."""
from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from coserve.operator.conditions import set_condition
from coserve.operator.reconcile import Event

Step = Callable[[dict], Awaitable[tuple[dict, list[Event]]]]
WriteStatus = Callable[[dict], Awaitable[None]]
Post = Callable[[list[Event]], None]
ERROR_CONDITION = "Reconciled"


@dataclass
class Loop:
    """What the watch handlers need of a running loop: how to wake it, and what it last reconciled."""

    plural: str
    namespace: str
    name: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)   # held by a pass, and by a release on deletion
    generation: int | None = None
    follows: str | None = None    # the FinetuneJob an endpoint serves checkpoints of


class Loops:
    """The loops running in this process, by object, and what each job last announced to its followers."""

    def __init__(self) -> None:
        self.running: dict[tuple[str, str, str], Loop] = {}
        self.job_marks: dict[tuple[str, str], tuple] = {}

    def open(self, plural: str, namespace: str, name: str) -> Loop:
        loop = self.running.get((plural, namespace, name))
        if loop is None:
            loop = self.running[(plural, namespace, name)] = Loop(plural, namespace, name)
        return loop

    def close(self, loop: Loop) -> None:
        if self.running.get((loop.plural, loop.namespace, loop.name)) is loop:
            del self.running[(loop.plural, loop.namespace, loop.name)]

    def lock(self, plural: str, namespace: str, name: str) -> asyncio.Lock:
        """The object's pass lock (a fresh one when no loop runs), so a release never overlaps a pass."""
        loop = self.running.get((plural, namespace, name))
        return loop.lock if loop else asyncio.Lock()

    def spec_seen(self, plural: str, body: Mapping) -> None:
        """Wake the object's loop when its spec changed since its last pass."""
        meta = body.get("metadata") or {}
        loop = self.running.get((plural, meta.get("namespace"), meta.get("name")))
        if loop is not None and loop.generation != meta.get("generation"):
            loop.wake.set()

    def job_seen(self, body: Mapping, gone: bool = False) -> None:
        """Wake the endpoints following this job when its checkpoints or phase changed, or it is gone."""
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        namespace, name = meta.get("namespace"), meta.get("name")
        mark = (status.get("latestCheckpoint"), status.get("phase"), meta.get("deletionTimestamp"))
        if gone:
            self.job_marks.pop((namespace, name), None)
        elif self.job_marks.get((namespace, name)) == mark:
            return
        else:
            self.job_marks[(namespace, name)] = mark
        for loop in self.running.values():
            if loop.plural == "inferenceendpoints" and loop.namespace == namespace and loop.follows == name:
                loop.wake.set()


def followed_job(spec: Mapping) -> str | None:
    """The FinetuneJob whose checkpoints an endpoint serves, if any."""
    return ((spec.get("adapter") or {}).get("fromFinetuneJob") or {}).get("name")


def snapshot(body: Mapping) -> dict:
    """A plain deep copy of kopf's live body: it changes under a pass as watch events arrive."""
    return {k: copy.deepcopy(dict(v) if isinstance(v, Mapping) else v) for k, v in body.items()}


def error_reason(exc: BaseException) -> str:
    """A CamelCase reason naming what failed: `ReconcileError` for a bug, `KubernetesApiError` for the API."""
    return "KubernetesApiError" if type(exc).__name__ == "ApiException" else "ReconcileError"


def failed_pass(status: dict, generation: int | None, exc: BaseException) -> tuple[dict, list[Event]]:
    """The status a failed pass leaves (what it had, plus a False `Reconciled` condition saying why) and the
    Warning announcing it."""
    reason, message = error_reason(exc), f"{type(exc).__name__}: {exc}"[:1000]
    conditions = set_condition(status.get("conditions") or [], ERROR_CONDITION, False, reason, message, generation)
    return {**status, "conditions": conditions}, [("Warning", reason, message)]


def recovered(status: dict, generation: int | None, events: list[Event]) -> tuple[dict, list[Event]]:
    """After a failed pass, the first good one flips `Reconciled` back to True and says so once."""
    old = next((c for c in status.get("conditions") or [] if c.get("type") == ERROR_CONDITION), None)
    if old is None or old.get("status") == "True":
        return status, events
    message = f"reconciled again after {old.get('reason') or 'an error'}"
    conditions = set_condition(status.get("conditions") or [], ERROR_CONDITION, True, "Recovered", message,
                               generation)
    return {**status, "conditions": conditions}, [*events, ("Normal", "Recovered", message)]


def news(events: list[Event], previous: set[Event] | None, conditions: list[dict]) -> list[Event]:
    """The events that announce a change: one emitted by the previous pass too restates a standing state (a
    pool still missing, a load still refused); on a loop's first pass (`previous` None: a restarted operator)
    so does one that equals a condition the object already carries."""
    if previous is None:
        previous = {(t, c.get("reason"), c.get("message")) for c in conditions for t in ("Normal", "Warning")}
    out: list[Event] = []
    for event in events:
        if event not in previous and event not in out:
            out.append(event)
    return out


def stored(status: dict) -> dict:
    """The status as the API server keeps it after a merge patch: fields set to None are gone."""
    return {k: v for k, v in status.items() if v is not None}


def changes(current: dict, desired: dict) -> dict:
    """The merge patch from `current` to `desired`: changed top-level fields, and None for removed ones."""
    patch = {k: v for k, v in desired.items() if current.get(k) != v}
    patch.update({k: None for k in current if k not in desired})
    return patch


async def run(loop: Loop, body: Mapping, stopped: object, step: Step, write: WriteStatus, post: Post,
              poll_seconds: float, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Reconcile until kopf stops the daemon: each pass reads the live spec with the status this loop last
    wrote (its own writes may not have come back through the watch yet), writes what changed, posts news."""
    status = stored(dict(body.get("status") or {}))
    previous: set[Event] | None = None
    while not stopped:
        loop.wake.clear()
        async with loop.lock:
            if stopped:
                break
            current = snapshot(body)
            generation = current["metadata"].get("generation")
            current["status"] = status
            loop.follows = followed_job(current["spec"])
            try:
                desired, events = await step(current)
                desired, events = recovered(stored(desired), generation, events)
            except Exception as exc:   # any bug or API error: a condition and one Warning, then the next poll
                logger.warning(f"reconcile pass failed: {type(exc).__name__}: {exc}", exc_info=True)
                desired, events = failed_pass(status, generation, exc)
            loop.generation = generation
            patch = changes(status, desired)
            if patch:
                try:
                    await write(patch)
                    status = desired
                except Exception as exc:   # e.g. a status the schema refuses: one Warning, not one per poll
                    logger.warning(f"status not written: {type(exc).__name__}: {exc}")
                    events = [*events, ("Warning", error_reason(exc),
                                        f"status not written: {type(exc).__name__}: {exc}"[:1000])]
            post(news(events, previous, current["status"].get("conditions") or []))
            previous = set(events)
        await sleep(loop.wake, stopped, poll_seconds)


async def sleep(wake: asyncio.Event, stopped: object, seconds: float) -> None:
    """Until woken, stopped (kopf's daemon flag) or `seconds` pass."""
    waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
