"""The judge cache: an append-only JSONL file of every judgment paid for (one fsync'ed line each), its cache key,
the check of every entry against the rubric on load (a hand-edited or damaged entry is discarded and re-judged,
never trained on), and the advisory lock that allows one judge run per cache (by its real path) at a time."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fluent_reward.config import Rubric
from fluent_reward.errors import FluentRewardError
from fluent_reward.io import stable_hash
from fluent_reward.judge.cost import USAGE_FIELDS
from fluent_reward.judge.reply import score_problem

log = logging.getLogger(__name__)


def entry_problem(entry: dict[str, Any], rubric: Rubric) -> str | None:
    """What makes a cache entry unusable under ``rubric`` (None: usable). A cached judgment is a training target,
    so it gets the checks a reply gets: every dimension, an integer score on the scale, rationales as text."""
    scores, rationales, usage = entry.get("scores"), entry.get("rationales", {}), entry.get("usage", {})
    if not isinstance(scores, dict):
        return f"scores is {scores!r}, not an object"
    for name in rubric.names:
        if name not in scores:
            return f"no score for {name}"
        problem = score_problem(name, scores[name], rubric.scale.min, rubric.scale.max)
        if problem:
            return problem
    if not isinstance(rationales, dict) or not all(isinstance(v, str) for v in rationales.values()):
        return "rationales is not an object of texts"
    if not isinstance(usage, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in usage.items() if k in USAGE_FIELDS
    ):
        return "usage is not an object of token counts"
    return None


def judgment_key(user_message: str, model: str, version: str, sample: int) -> str:
    """The cache key: what was asked (the rendered record), of which model, with which prompt, which sample."""
    return stable_hash(user_message, model, version, sample, length=24)


class JudgeCache:
    """Successful judgments by key. A torn last line (a crash mid-write) is ignored, and repaired before the
    next append; failures are never written, so a rerun retries them."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self._handle: Any = None
        self._torn_at: int | None = None

    def load(self, rubric: Rubric, prompt_version: str) -> dict[str, dict[str, Any]]:
        """Every usable entry by key. An entry that fails ``entry_problem`` under ``rubric`` is left out (so its
        record is judged again): with a warning naming its line when it claims this prompt version, quietly when
        it was made with another rubric (it comes back if that rubric does)."""
        if not self.path.is_file():
            return self.entries
        data = self.path.read_bytes()
        offset = 0
        for number, line in enumerate(data.splitlines(keepends=True), start=1):
            entry = self._parse(line, offset, complete=line.endswith(b"\n"))
            offset += len(line)
            if entry is None:
                continue
            problem = entry_problem(entry, rubric)
            if problem is None:
                self.entries.setdefault(entry["key"], entry)
            elif entry.get("prompt_version") in (prompt_version, None):
                log.warning("%s: line %d: discarded (%s); its record is judged again", self.path, number, problem)
        return self.entries

    def _parse(self, line: bytes, offset: int, *, complete: bool) -> dict[str, Any] | None:
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or "scores" not in entry:
                raise ValueError("not a cache entry")
        except ValueError:
            if not complete:
                log.warning("%s: ignoring a torn last line (a run was interrupted mid-write)", self.path)
                self._torn_at = offset
            elif line.strip():
                log.warning("%s: ignoring an unreadable line at byte %d", self.path, offset)
            return None
        if not complete:
            self._torn_at = offset  # complete JSON but no newline: kept, and rewritten whole on repair
        return entry

    def append(self, entry: dict[str, Any]) -> None:
        """Write one entry durably (fsync) before it counts as judged."""
        if self._handle is None:
            self._open()
        self._handle.write((json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.entries.setdefault(entry["key"], entry)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._handle = open(self.path, "r+b" if not created else "wb")  # noqa: SIM115 (held for the run)
        self._handle.seek(0, os.SEEK_END)
        if self._torn_at is not None:
            self._repair()
        if created:
            _fsync_dir(self.path.parent)

    def _repair(self) -> None:
        """Cut the torn tail; a complete entry that only lacked its newline is written back whole."""
        self._handle.seek(self._torn_at)
        tail = self._handle.read()
        self._handle.seek(self._torn_at)
        self._handle.truncate()
        with contextlib.suppress(ValueError):
            entry = json.loads(tail)
            if isinstance(entry, dict) and "key" in entry:
                self._handle.write(tail.rstrip(b"\r\n") + b"\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._torn_at = None
        log.info("%s: repaired the torn last line", self.path)

    def touch(self) -> None:
        """Create the file if no judgment was ever written (dvc.yaml declares it as an output)."""
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform; the file's own fsync still holds
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def exclusive_lock(cache_path: Path) -> Iterator[None]:
    """One judge run per cache at a time (an advisory lock, released by the OS even on SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; do not run two judges at once
        yield
        return
    # Keyed by the real path: the same cache reached through a symlink (or another spelling) is the same lock.
    lock_path = Path(f"{Path(cache_path).resolve()}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FluentRewardError(
                f"{cache_path}: another `fluent-reward judge` is using this cache (lock {lock_path}); wait for it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
