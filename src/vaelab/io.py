"""Atomic file writes, damage-checked reads, and run provenance.

Every file vaelab writes goes to a temporary name in the same folder first and is then
``os.replace``-d into place, so an interrupted run never leaves a half-written file. Files still get
damaged after they were written (a copy cut short, a disk that filled up while moving a folder), so
every read of a file vaelab wrote goes through ``read_checked`` (results, checkpoints, state: stop
with one line naming the file and what to do) or ``read_cache`` (caches: a warning, then the caller
computes the value again).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import yaml
from safetensors import SafetensorError

from vaelab.errors import VaelabError

T = TypeVar("T")


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
    """Write ``text`` to ``path`` through a temporary file and a rename (complete or absent)."""
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
    """``obj`` as YAML (keys in insertion order), atomically (``write_text``)."""
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


# what reading or parsing a truncated, cut or foreign file raises: JSON/YAML/Unicode errors are
# ValueErrors, torch.load raises RuntimeError (zip archive) or UnpicklingError/EOFError, safetensors its own
READ_ERRORS = (OSError, ValueError, EOFError, KeyError, RuntimeError, pickle.UnpicklingError, yaml.YAMLError,
               SafetensorError)


class DamagedFileError(VaelabError):
    """A file vaelab wrote earlier cannot be read back (truncated, cut, half-copied, overwritten).

    Attributes:
        path: the file. problem: what reading it raised, on one line. remedy: what to do about it.
    """

    def __init__(self, path: str | os.PathLike, problem: str, remedy: str):
        self.path, self.problem, self.remedy = Path(path), problem, remedy
        super().__init__(f"{self.path} is damaged ({problem}); {remedy}")


def one_line(exc: BaseException, limit: int = 160) -> str:
    """``exc``'s message on one line (whitespace collapsed), its first sentence when it is longer than ``limit``
    characters, cut at ``limit``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit and ". " in text:
        text = text[: text.index(". ")]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checked(path: str | os.PathLike, read: Callable[[Path], T], *, remedy: str) -> T:
    """``read(path)``; a file that cannot be read or parsed raises ``DamagedFileError`` instead.

    Args:
        read: reads and parses the file (e.g. ``json.loads`` of its text, ``torch.load``); a
            ``VaelabError`` it raises (a readable file with a bad value) passes through unchanged.
        remedy: what the person should do, e.g. "delete it and rerun `vaelab evaluate --run RUN`".

    Raises:
        DamagedFileError: ``read`` raised one of ``READ_ERRORS``; the message names the file, the
            problem and ``remedy``, on one line.
    """
    path = Path(path)
    try:
        return read(path)
    except VaelabError:
        raise
    except READ_ERRORS as exc:
        raise DamagedFileError(path, one_line(exc), remedy) from exc


def read_cache(path: str | os.PathLike, read: Callable[[Path], T], *, redo: str) -> T | None:
    """``read(path)`` of a cache file, or ``None`` after one ``WARNING`` line on stderr when it is damaged
    (the caller then computes the value again and overwrites the file).

    Args:
        redo: what happens instead, e.g. "computing the statistics again".
    """
    try:
        return read_checked(path, read, remedy=redo)
    except DamagedFileError as exc:
        warn(str(exc))
        return None


def warn(text: str) -> None:
    """One ``WARNING:`` line on stderr (on a line of its own also while a progress bar is drawn)."""
    from tqdm.auto import tqdm

    tqdm.write(f"WARNING: {text}", file=sys.stderr)


def read_json(path: str | os.PathLike, *, remedy: str) -> Any:
    """The JSON value in ``path`` (see ``read_checked``)."""
    return read_checked(path, lambda p: json.loads(p.read_text()), remedy=remedy)


def load_written_yaml(path: Path) -> Any:
    """The YAML value of a file vaelab wrote with ``write_yaml`` (for ``read_checked``).

    Raises:
        ValueError: its last line has no newline (``yaml.safe_dump`` ends every file with one): the copy
            was cut short, even where the rest still parses. yaml.YAMLError: not YAML.
    """
    text = path.read_text()
    if text and not text.endswith("\n"):
        raise ValueError("its last line is cut")
    return yaml.safe_load(text)


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
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML ({one_line(exc)})") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping ({what}), got {type(values).__name__}")
    return values


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON row by rewriting the file atomically (metrics files are small)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    write_text(path, old + dumps(row) + "\n")


def read_jsonl(path: str | os.PathLike, *, remedy: str | None = None) -> list[dict]:
    """The rows of a JSON-lines file (``[]`` when it is absent).

    Raises:
        DamagedFileError: a line is not a JSON object (a cut or half-copied row), named by its number;
            ``remedy`` (default: remove that line or restore the file from a copy) says what to do.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = read_checked(path, lambda p: p.read_text().splitlines(), remedy=remedy or "restore it from a copy")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}")
        except ValueError as exc:
            raise DamagedFileError(path, f"line {number} of {len(lines)} is not a JSON object: {one_line(exc)}",
                                   remedy or f"remove line {number} (a cut row) or restore the file from a copy") from exc
        rows.append(row)
    return rows


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
