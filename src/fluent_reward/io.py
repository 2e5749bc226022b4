"""Small file helpers shared by every stage: atomic writes, hashing, JSON and JSONL."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from fluent_reward.errors import FluentRewardError

log = logging.getLogger(__name__)

# Temporary files of atomic_open: ".<name>.<pid>-<random>.tmp" beside the output (the pid says whose it is).
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[\w]+\.tmp")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched, so a crash or a validation
    failure never leaves a half-written output behind. A process killed outright (SIGKILL, power loss) cannot
    clean up: its temporary file is removed by the next write of the same output (see ``remove_stale_temps``).
    A full disk or an output path that is a directory is a FluentRewardError naming the path.
    """
    path = Path(path)
    if path.is_dir():
        raise FluentRewardError(f"{path}: is a directory; give the path of a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file 0600; give it the mode a plain open() would have (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise FluentRewardError(
                f"{path}: disk full (no space left on device) while writing; the previous file is untouched: "
                "free some space and rerun"
            ) from None
        raise


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files that killed writers of ``path`` left beside it; return them.

    Only files of atomic_open's own naming for this output are touched, and only when the process that created
    them is gone, so a concurrent writer's file is never pulled from under it.
    """
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = _TEMP_NAME.fullmatch(candidate.name)
        if not match or match["name"] != path.name or _alive(match["pid"]):
            continue
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()
            removed.append(candidate)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write of %s", len(removed), path)
    return removed


def _alive(pid: str | None) -> bool:
    if pid is None:  # written before temp names carried the pid: no live writer can own it now
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process (or an absurd number): leave the file alone
    return True


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as pretty, key-sorted UTF-8 JSON, atomically (stable bytes, so git and DVC diffs stay small)."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, sort_keys=True)
        handle.write("\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL atomically; return how many were written."""
    count = 0
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_json_file(path: str | Path, what: str) -> Any:
    """A JSON file this project wrote, or a FluentRewardError naming it and saying what it should be."""
    try:
        return read_json(path)
    except json.JSONDecodeError as exc:
        raise FluentRewardError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); {what}"
        ) from None
    except UnicodeDecodeError as exc:
        raise FluentRewardError(f"{path}: not UTF-8 text (byte {exc.start + 1}); {what}") from None
    except RecursionError:
        raise FluentRewardError(f"{path}: JSON nested too deeply to be {what}") from None


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the rows of a JSONL file written by this project; a damaged line is a FluentRewardError naming it."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                row = None
            if not isinstance(row, dict):
                raise FluentRewardError(
                    f"{path}: line {number} is not a JSON object (damaged file? rerun the stage that wrote it)"
                )
            yield row


def stable_hash(*parts: Any, length: int = 16) -> str:
    """A short, stable hex digest of JSON-serialisable parts (order matters)."""
    payload = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
