"""Atomic file writes and run provenance.

Every file vaelab writes goes to a temporary name in the same folder first and is then
``os.replace``-d into place, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary file keeps the target's suffix so writers that look at the extension
    (matplotlib's ``savefig``, torchvision's ``save_image``) still pick the right format.
    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def dumps(obj: Any, **kw) -> str:
    """Strict JSON (``allow_nan=False``): NaN or infinity is a bug to fix, never a number to write.

    Raises:
        ValueError: naming the first non-finite value's key path (e.g. ``summary.test_recon_nats``).
    """
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError as exc:
        where = _non_finite_path(obj) or "?"
        raise ValueError(f"refusing to write non-finite number at {where}: JSON holds no NaN/Infinity; "
                         "store null with a reason instead") from exc


def _non_finite_path(obj: Any, prefix: str = "") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return prefix or "(top level)"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite_path(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented strict JSON (see ``dumps``), atomically."""
    write_text(path, dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    """The mapping in YAML file ``path`` (``{}`` for an empty file).

    Raises:
        ConfigError: the file is missing, is not valid YAML, or holds something other than a mapping;
            the message names ``what`` the file should be and the path.
    """
    from vaelab.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping ({what}), got {type(values).__name__}")
    return values


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON row by rewriting the file atomically (metrics files are small)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    write_text(path, old + dumps(row) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def git_sha() -> str | None:
    """The commit of the vaelab source tree, or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``rows`` as a JSON-lines file (strict JSON), atomically."""
    write_text(path, "".join(dumps(r) + "\n" for r in rows))
