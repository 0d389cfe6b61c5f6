"""The operator's only way into an engine: its admin HTTP API, with timeouts and the pool's token."""
from __future__ import annotations

from typing import Any

import httpx


class EngineUnavailable(Exception):
    """The engine did not answer (down, restarting, unreachable)."""


class EngineRejected(Exception):
    """The engine answered with an error; `status` and `message` say what it refused."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.param = status, message, param


class EngineClient:
    def __init__(self, token: str, timeout: float = 5.0):
        self.headers = {"Authorization": f"Bearer {token}"}
        self.timeout = timeout

    async def _call(self, method: str, url: str, json: dict | None = None,
                    params: dict | None = None) -> Any:
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                r = await client.request(method, url, json=json, params=params, headers=self.headers)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                raise EngineRejected(r.status_code, err.get("message", r.text), err.get("param"))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise EngineRejected(r.status_code, r.text[:500]) from None
        try:
            answer = r.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):   # not a coserve engine (a wrong URL in the pool): refused, not a crash
            raise EngineRejected(r.status_code, f"{method} {url}: the answer is not a JSON object: {r.text[:200]!r}")
        return answer

    async def capacity(self, base: str) -> dict:
        return await self._call("GET", f"{base}/admin/capacity")

    async def get_adapter(self, base: str, name: str) -> dict | None:
        try:
            return await self._call("GET", f"{base}/admin/adapters/{name}")
        except EngineRejected as exc:
            if exc.status == 404:
                return None
            raise

    async def load_adapter(self, base: str, name: str, path: str) -> dict:
        return await self._call("PUT", f"{base}/admin/adapters/{name}", json={"path": path})

    async def unload_adapter(self, base: str, name: str) -> None:
        try:
            await self._call("DELETE", f"{base}/admin/adapters/{name}")
        except EngineRejected as exc:
            if exc.status != 404:
                raise

    async def create_job(self, base: str, body: dict) -> dict:
        return await self._call("POST", f"{base}/admin/finetune/jobs", json=body)

    async def get_job(self, base: str, job_id: str) -> dict:
        return await self._call("GET", f"{base}/admin/finetune/jobs/{job_id}")

    async def cancel_job(self, base: str, job_id: str, checkpoint: bool = False) -> dict | None:
        try:
            return await self._call("DELETE", f"{base}/admin/finetune/jobs/{job_id}",
                                    params={"checkpoint": "true"} if checkpoint else None)
        except EngineRejected as exc:
            if exc.status == 404:
                return None
            raise
