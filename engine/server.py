"""The HTTP server's entry points: `create_app` (built in `coserve.engine.api`) and the admin token."""
from __future__ import annotations

from pathlib import Path

from coserve.engine.api.app import create_app

__all__ = ["create_app", "load_token"]


def load_token(token_file: str | None, env_value: str | None) -> str | None:
    """The admin token from a file (stripped) or the environment; None disables the admin API."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"admin token file {token_file} is empty")
        return token
    return env_value or None
