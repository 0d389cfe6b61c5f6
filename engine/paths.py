"""User-given paths stay under the data root: anything that escapes it (.., absolute, symlinks) is refused."""
from __future__ import annotations

from pathlib import Path


class PathError(ValueError):
    """A path outside the data root, or otherwise unusable."""


def resolve_under(root: str | Path, relative: str) -> Path:
    """The real path of `relative` inside `root`."""
    if not isinstance(relative, str) or not relative.strip():
        raise PathError("path must be a non-empty string relative to the data root")
    if Path(relative).is_absolute():
        raise PathError(f"path {relative!r} must be relative to the data root, not absolute")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise PathError(f"path {relative!r} escapes the data root")
    return target
