"""Loading and unloading serving adapters for the HTTP APIs: one set of checks and error answers whether the
call comes as `PUT /admin/adapters/{name}` or as vLLM's `POST /v1/load_lora_adapter`. Paths in answers are
relative to the data root."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from coserve.engine.api.errors import APIError
from coserve.engine.async_engine import AsyncEngine
from coserve.engine.lora import AdapterError, AdapterInfo
from coserve.engine.paths import MAX_PATH_CHARS, PathError, is_under, resolve_under

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class AdapterOps:
    """Adapter loads and unloads on the engine thread; `name_param`/`path_param` let each API name its own
    fields in refusals."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.core = engine.engine
        self.root = Path(self.core.config.data_root).resolve()

    def relative(self, value: Any) -> Any:
        """Server paths in messages (an OS error names the file) are cut to paths under the data root."""
        root = str(self.root)
        if isinstance(value, str):
            return value.replace(root + "/", "").replace(root, ".")
        if isinstance(value, dict):
            return {k: self.relative(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.relative(v) for v in value]
        return value

    def check_name(self, name: str, param: str) -> None:
        if not ADAPTER_NAME.match(name) or name == self.core.model_name:
            raise APIError(400, "adapter name must be 1-63 letters, digits, '.', '_' or '-', start with a letter "
                                "or digit, and differ from the base model's name", param)

    def under_root(self, path: str, param: str, absolute_ok: bool = False) -> tuple[Path, str]:
        """The real folder and its path relative to the data root. With `absolute_ok` (vLLM's clients send
        absolute paths) an absolute path is taken when it lies under the data root once symlinks are resolved."""
        if absolute_ok and path.startswith("/") and len(path) <= MAX_PATH_CHARS and "\x00" not in path:
            real = Path(path).resolve()
            if is_under(real, self.root):
                path = str(real.relative_to(self.root)) if real != self.root else "."
        try:
            folder = resolve_under(self.root, path)
        except PathError as exc:
            raise APIError(400, self.relative(str(exc)), param) from exc
        if not folder.is_dir():
            raise APIError(404, f"adapter folder {path!r} does not exist under the data root", param)
        return folder, path

    async def load(self, name: str, path: str, name_param: str, path_param: str,
                   absolute_ok: bool = False) -> AdapterInfo:
        """Load (or hot-reload) `name` from `path` under the data root; a full set of slots answers 409."""
        self.check_name(name, name_param)
        folder, shown = self.under_root(path, path_param, absolute_ok)
        try:
            return await self.engine.call(lambda: self.core.loras.load(name, folder, shown, self.root))
        except AdapterError as exc:
            status = 409 if "slots" in str(exc) else 400
            raise APIError(status, self.relative(str(exc)), path_param if status == 400 else None) from exc

    def loaded(self, name: str, param: str) -> AdapterInfo:
        info = self.core.loras.adapters.get(name)
        if info is None:
            raise APIError(404, f"adapter {name!r} is not loaded", param)
        return info

    async def unload(self, name: str, param: str) -> AdapterInfo:
        self.loaded(name, param)

        def run() -> AdapterInfo:
            if name not in self.core.loras.adapters:   # unloaded meanwhile by another call
                raise APIError(404, f"adapter {name!r} is not loaded", param)
            return self.core.loras.unload(name)
        return await self.engine.call(run)
