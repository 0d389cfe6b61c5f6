"""User-given paths stay under the data root: anything that escapes it (.., absolute, symlinks) is refused."""
from __future__ import annotations

from pathlib import Path


MAX_PATH_CHARS = 1024


class PathError(ValueError):
    """A path outside the data root, or otherwise unusable."""


def resolve_under(root: str | Path, relative: str) -> Path:
    """The real path of `relative` inside `root`."""
    if not isinstance(relative, str) or not relative.strip():
        raise PathError("path must be a non-empty string relative to the data root")
    if "\x00" in relative or not _encodable(relative):
        raise PathError("path must be valid UTF-8 text without NUL characters")
    if len(relative) > MAX_PATH_CHARS or any(len(part.encode()) > 255 for part in Path(relative).parts):
        raise PathError(f"path is longer than {MAX_PATH_CHARS} characters or has a name over 255 bytes")
    if Path(relative).is_absolute():
        raise PathError(f"path {relative!r} must be relative to the data root, not absolute")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if not is_under(target, base):
        raise PathError(f"path {relative!r} escapes the data root")
    return target


def is_under(path: Path, root: Path) -> bool:
    """Whether the already resolved `path` is `root` or inside it."""
    return path == root or root in path.parents


def file_under(root: str | Path, file: Path) -> Path:
    """The real path of `file`, which must exist as a regular file under `root` once symlinks are resolved:
    a folder inside the root may still hold links to files outside it."""
    base = Path(root).resolve()
    target = file.resolve()
    if not is_under(target, base):
        raise PathError(f"{file.name} resolves to a file outside the data root")
    if not target.is_file():
        raise PathError(f"{file.name} is not a regular file")
    return target


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
