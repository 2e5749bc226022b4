"""The judge stage: Claude scores every validated record against the rubric; cached, resumable, cost-aware.

What gets sent where, and why:

- Records covered by ``judge.reference`` files (by content, else by id) are taken as they are: never sent.
- Every other record needs ``judge.samples`` judgments. Each is keyed by a hash of (the rendered user message, the
  model, ``prompt_version``, the sample index) and looked up in the append-only JSONL cache (``data.judge_cache``),
  which is fsync'ed after every judgment: a run killed at any moment loses at most the calls in flight.
- What remains is judged with ``messages`` (concurrent requests) or ``batch`` (Message Batches, half price); every
  reply is validated client-side (all dimensions, integer scores on the scale) and re-asked when invalid.
- ``data.judgments`` (one entry per record, in the order of the validated file) and ``data.judge_metrics`` are
  written from the reference files and the cache only, so what was paid for is never lost and never paid twice.

The API key is read from the environment or ``.env`` and handed to the SDK; it is never logged nor written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from itertools import combinations
from pathlib import Path
from typing import Any, TypeVar

from fluent_reward.config import JudgeConfig, Params, Price, Rubric
from fluent_reward.errors import FluentRewardError, StageFailed
from fluent_reward.io import iter_jsonl, read_json, stable_hash, write_json
from fluent_reward.rubric import (
    TOOL_NAME,
    prompt_version,
    render_system_prompt,
    render_user_message,
    require_anchors,
    tool_definition,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Local token estimate when count_tokens is not available: Claude's tokenizer averages about 3.5 characters per
# token on Latin-script text and about one token per CJK character.
CHARS_PER_TOKEN = 3.5
# Output estimate before any judgment has been seen: a one-or-two-sentence rationale plus JSON keys per dimension.
OUTPUT_TOKENS_PER_DIMENSION = 55
OUTPUT_TOKENS_OVERHEAD = 20
# Smallest prefix the API caches (Sonnet's threshold; some models need more): below it the estimate assumes no cache.
MIN_CACHEABLE_TOKENS = 1024
# Each wait the SDK itself makes is capped at its own longest backoff. It obeys retry-after without an upper bound
# (retry-after: 3600 would sleep an hour inside one call); longer waits are ours, bounded by rate_limit_max_wait_s.
SDK_RETRY_AFTER_CAP_S = 8.0
_ORIGINAL_RETRY_AFTER = "x-fluent-reward-original-retry-after"
# Batch requests are also limited to 256 MB per batch; stay well below.
BATCH_MAX_BYTES = 200_000_000
# count_tokens in dry-run: many user messages are counted in one request, up to this many characters.
COUNT_CHUNK_CHARS = 200_000
_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")  # kana, CJK ideographs, hangul


# ---------------------------------------------------------------------------------------------------------------
# Key, prompt and cost


def resolve_api_settings(cwd: Path | None = None) -> tuple[str | None, str | None]:
    """(API key, base URL) from the environment, else from ``.env`` in ``cwd``; the environment always wins."""
    key = os.environ.get("ANTHROPIC_API_KEY", "").strip() or None
    base_url = os.environ.get("ANTHROPIC_BASE_URL", "").strip() or None
    env_file = (cwd or Path.cwd()) / ".env"
    if (key is None or base_url is None) and env_file.is_file():
        from dotenv import dotenv_values

        values = dotenv_values(env_file)
        key = key or (values.get("ANTHROPIC_API_KEY") or "").strip() or None
        base_url = base_url or (values.get("ANTHROPIC_BASE_URL") or "").strip() or None
    return key, base_url


@dataclass(frozen=True)
class Prompt:
    """Everything sent to the judge apart from the record, and its version."""

    system: str
    tool: dict[str, Any]
    version: str
    model: str
    max_tokens: int
    cache_ttl: str

    @classmethod
    def build(cls, rubric: Rubric, cfg: JudgeConfig) -> Prompt:
        return cls(
            system=render_system_prompt(rubric),
            tool=tool_definition(rubric),
            version=prompt_version(rubric),
            model=cfg.model,
            max_tokens=cfg.max_tokens,
            cache_ttl=cfg.prompt_cache_ttl,
        )

    def system_blocks(self) -> list[dict[str, Any]]:
        # The breakpoint on the system prompt caches tools + system: the same for every record. "5m" is the API's
        # default, so the ttl is only sent for "1h".
        cache_control = {"type": "ephemeral"} | ({"ttl": self.cache_ttl} if self.cache_ttl != "5m" else {})
        return [{"type": "text", "text": self.system, "cache_control": cache_control}]

    def request(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The Messages API parameters for one judgment (also the ``params`` of a batch request)."""
        return {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": self.system_blocks(),
            "tools": [self.tool],
            "tool_choice": {"type": "tool", "name": TOOL_NAME},
            "messages": messages,
        }

    @functools.cached_property
    def _prefix_tokens(self) -> int:
        return estimate_tokens(self.system + json.dumps(self.tool))

    def local_tokens(self, messages: Sequence[Mapping[str, Any]] = ()) -> int:
        """Local estimate of a call's input tokens (tools + system + these messages)."""
        contents = (m["content"] if isinstance(m["content"], str) else json.dumps(m["content"]) for m in messages)
        return self._prefix_tokens + estimate_tokens("".join(contents))


def estimate_tokens(text: str) -> int:
    """A local token estimate: one per CJK character, one per 3.5 other characters."""
    cjk = len(_CJK.findall(text))
    return cjk + math.ceil((len(text) - cjk) / CHARS_PER_TOKEN)


def usage_of(usage: Any) -> dict[str, int]:
    """The four billed token counts of an SDK ``Usage`` (missing cache fields are 0)."""
    return {name: int(getattr(usage, name, 0) or 0) for name in _USAGE_FIELDS}


def cost_usd(usage: Mapping[str, int], price: Price, factor: float = 1.0) -> float:
    """Dollars for ``usage`` at ``price`` (USD per million tokens); ``factor`` is the batch discount."""
    dollars = (
        usage.get("input_tokens", 0) * price.input
        + usage.get("output_tokens", 0) * price.output
        + usage.get("cache_creation_input_tokens", 0) * price.cache_write
        + usage.get("cache_read_input_tokens", 0) * price.cache_read
    )
    return factor * dollars / 1e6


def _add_usage(total: dict[str, int], usage: Mapping[str, int]) -> None:
    for name in _USAGE_FIELDS:
        total[name] = total.get(name, 0) + int(usage.get(name, 0))


# ---------------------------------------------------------------------------------------------------------------
# Parsing and validating a reply


class InvalidOutput(ValueError):
    """The judge's reply is not a complete, valid judgment (the reason says what is wrong)."""


def parse_judgment(message: Any, rubric: Rubric) -> tuple[dict[str, int], dict[str, str]]:
    """(scores, rationales) from a Messages API reply, or InvalidOutput: never a made-up or clipped score."""
    if getattr(message, "stop_reason", None) == "max_tokens":
        raise InvalidOutput("the reply was cut off at judge.max_tokens")
    call = next((b for b in message.content if getattr(b, "type", None) == "tool_use" and b.name == TOOL_NAME), None)
    if call is None:
        raise InvalidOutput(f"the reply has no {TOOL_NAME} tool call")
    data = call.input if isinstance(call.input, dict) else {}
    scores: dict[str, int] = {}
    rationales: dict[str, str] = {}
    problems: list[str] = []
    lo, hi = rubric.scale.min, rubric.scale.max
    for name in rubric.names:
        item = data.get(name)
        if not isinstance(item, dict):
            problems.append(f"{name}: missing")
            continue
        score, rationale = item.get("score"), item.get("rationale")
        if isinstance(score, bool) or not isinstance(score, int | float) or not float(score).is_integer():
            problems.append(f"{name}.score: {score!r} is not an integer")
        elif not lo <= score <= hi:
            problems.append(f"{name}.score: {score} is outside {lo}..{hi}")
        else:
            scores[name] = int(score)
        if not isinstance(rationale, str) or not rationale.strip():
            problems.append(f"{name}.rationale: missing")
        else:
            rationales[name] = rationale.strip()
    if problems:
        raise InvalidOutput("; ".join(problems))
    return scores, rationales


def reask_messages(user_message: str, message: Any, problem: str, rubric: Rubric) -> list[dict[str, Any]]:
    """The conversation for a re-ask: the invalid tool call answered by an error result naming the problem.

    A reply with no usable tool call (text only, or cut off) is simply asked again.
    """
    first = [{"role": "user", "content": user_message}]
    call = next((b for b in message.content if getattr(b, "type", None) == "tool_use"), None)
    if call is None or getattr(message, "stop_reason", None) == "max_tokens":
        return first
    lo, hi = rubric.scale.min, rubric.scale.max
    feedback = (
        f"Invalid judgment: {problem}. Call {TOOL_NAME} again with a rationale and an integer score from {lo} to "
        f"{hi} for every dimension: {', '.join(rubric.names)}."
    )
    return [
        *first,
        {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "is_error": True, "content": feedback}],
        },
    ]


# ---------------------------------------------------------------------------------------------------------------
# Reference and imported judgments


@dataclass(frozen=True)
class Supplied:
    """A judgment supplied by a file (``judge.reference``), used as it is."""

    scores: dict[str, float]
    rationale: str
    source: str  # "reference" | "import"
    file: str
    model: str | None = None
    prompt_version: str | None = None
    samples: int = 1


@dataclass
class ReferenceIndex:
    """Supplied judgments by content hash (entries carrying the three texts) and by id (entries with only an id)."""

    by_content: dict[str, Supplied] = field(default_factory=dict)
    by_id: dict[str, Supplied] = field(default_factory=dict)

    def lookup(self, record: Mapping[str, Any]) -> Supplied | None:
        return self.by_content.get(content_key(record)) or self.by_id.get(str(record["id"]))


def content_key(record: Mapping[str, Any]) -> str:
    return stable_hash(record["context"], record["student_message"], record["tutor_response"], length=24)


def load_reference(paths: Sequence[Path], rubric: Rubric) -> ReferenceIndex:
    """Read and check every ``judge.reference`` file; the first file supplying a record wins.

    Raises FluentRewardError naming the file and the entry when one is unusable (a missing dimension, a score
    off the scale, no id and no content), so a bad import never turns into silent training targets.
    """
    index = ReferenceIndex()
    for path in paths:
        for key, by_content, supplied in _read_reference_file(Path(path), rubric):
            table = index.by_content if by_content else index.by_id
            table.setdefault(key, supplied)
    return index


def _read_reference_file(path: Path, rubric: Rubric) -> Iterator[tuple[str, bool, Supplied]]:
    if not path.is_file():
        raise FluentRewardError(f"{path}: reference judgments file not found (listed in judge.reference)")
    try:
        data = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FluentRewardError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("judgments"), list):
        raise FluentRewardError(f'{path}: expected an object with a "judgments" list (see docs/ARCHITECTURE.md)')
    _check_file_scale(path, data, rubric)
    # A judgments file written by this stage has no top-level "source": importing it is an import.
    source = data.get("source", "import")
    if source not in ("reference", "import"):
        raise FluentRewardError(f'{path}: "source" must be "reference" or "import", got {source!r}')
    if data.get("rubric_version") not in (None, rubric.version):
        log.warning("%s: made with rubric version %s; the rubric is %s", path, data["rubric_version"], rubric.version)
    for number, entry in enumerate(data["judgments"], start=1):
        where = f"{path}: judgment {number}" + (
            f" (id={entry['id']})" if isinstance(entry, dict) and "id" in entry else ""
        )
        scores = _check_supplied_scores(where, entry, rubric)
        has_content = all(isinstance(entry.get(f), str) for f in ("context", "student_message", "tutor_response"))
        if not has_content and entry.get("id") is None:
            raise FluentRewardError(f"{where}: needs an id or the context, student_message and tutor_response")
        supplied = Supplied(
            scores=scores,
            rationale=str(entry.get("rationale") or ""),
            source=source,
            file=str(path),
            model=entry.get("model") or data.get("model"),
            prompt_version=entry.get("prompt_version") or data.get("prompt_version"),
            samples=int(entry.get("samples") or 1),
        )
        yield (content_key(entry), True, supplied) if has_content else (str(entry["id"]), False, supplied)


def _check_file_scale(path: Path, data: Mapping[str, Any], rubric: Rubric) -> None:
    scale = data.get("scale")
    if isinstance(scale, dict) and (scale.get("min"), scale.get("max")) != (rubric.scale.min, rubric.scale.max):
        raise FluentRewardError(
            f"{path}: scores are on the scale {scale.get('min')}..{scale.get('max')}, but rubric.scale is "
            f"{rubric.scale.min}..{rubric.scale.max}"
        )


def _check_supplied_scores(where: str, entry: Any, rubric: Rubric) -> dict[str, float]:
    if not isinstance(entry, dict) or not isinstance(entry.get("scores"), dict):
        raise FluentRewardError(f'{where}: expected an object with "scores" for every dimension')
    scores = entry["scores"]
    missing = [name for name in rubric.names if name not in scores]
    if missing:
        raise FluentRewardError(
            f"{where}: no score for {', '.join(missing)} (the rubric's dimensions are {', '.join(rubric.names)})"
        )
    lo, hi = rubric.scale.min, rubric.scale.max
    for name in rubric.names:
        value = scores[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise FluentRewardError(f"{where}: score {name}={value!r} is not a number on the scale {lo}..{hi}")
    return {name: float(scores[name]) for name in rubric.names}


# ---------------------------------------------------------------------------------------------------------------
# The cache: append-only JSONL, one fsync'ed line per successful judgment


class JudgeCache:
    """Successful judgments by key. A torn last line (a crash mid-write) is ignored, and repaired before the
    next append; failures are never written, so a rerun retries them."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self._handle: Any = None
        self._torn_at: int | None = None

    def load(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return self.entries
        data = self.path.read_bytes()
        offset = 0
        for line in data.splitlines(keepends=True):
            entry = self._parse(line, offset, complete=line.endswith(b"\n"))
            if entry is not None:
                self.entries.setdefault(entry["key"], entry)
            offset += len(line)
        return self.entries

    def _parse(self, line: bytes, offset: int, *, complete: bool) -> dict[str, Any] | None:
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or "key" not in entry or "scores" not in entry:
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
    lock_path = Path(f"{cache_path}.lock")
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


# ---------------------------------------------------------------------------------------------------------------
# Planning: what is supplied, cached, and still to judge


@dataclass(frozen=True)
class Unit:
    """One judgment to obtain: a record's user message at one sample index."""

    key: str
    sample: int
    record_id: str
    user_message: str


@dataclass
class Plan:
    records: list[dict[str, Any]]
    supplied: dict[str, Supplied]  # record id -> supplied judgment
    keys: dict[str, list[str]]  # record id -> its cache keys, one per sample
    units: list[Unit]  # not supplied, not cached: to judge (unique keys)
    messages: dict[str, str]  # key -> user message

    def records_to_judge(self) -> int:
        pending = {u.key for u in self.units}
        return sum(1 for keys in self.keys.values() if any(k in pending for k in keys))


def judgment_key(user_message: str, model: str, version: str, sample: int) -> str:
    """The cache key: what was asked (the rendered record), of which model, with which prompt, which sample."""
    return stable_hash(user_message, model, version, sample, length=24)


def make_plan(
    records: list[dict[str, Any]], reference: ReferenceIndex, cached: Mapping[str, Any], prompt: Prompt, samples: int
) -> Plan:
    plan = Plan(records=records, supplied={}, keys={}, units=[], messages={})
    queued: set[str] = set()
    for record in records:
        supplied = reference.lookup(record)
        if supplied is not None:
            plan.supplied[record["id"]] = supplied
            continue
        message = render_user_message(record)
        keys = [judgment_key(message, prompt.model, prompt.version, i) for i in range(samples)]
        plan.keys[record["id"]] = keys
        for sample, key in enumerate(keys):
            plan.messages[key] = message
            if key not in cached and key not in queued:
                queued.add(key)
                plan.units.append(Unit(key, sample, record["id"], message))
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Running: shared state of one run


class _Fatal(Exception):
    """The API refused in a way retrying cannot fix (bad key, unknown model, bad request)."""


class _UnitFailed(Exception):
    """One judgment could not be obtained (transient errors past every retry, or invalid output past re-asks)."""


class _OutOfBudget(Exception):
    pass


@dataclass
class Tally:
    """What this run sent and spent (metrics/judge.json)."""

    api_calls: int = 0
    retries: int = 0
    invalid_outputs: int = 0
    batches_submitted: int = 0
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_USAGE_FIELDS, 0))
    cost_usd: float = 0.0


class _Gate:
    """A pause shared by all workers after a rate limit, so they back off together instead of hammering."""

    def __init__(self) -> None:
        self.until = 0.0

    def pause(self, seconds: float) -> None:
        self.until = max(self.until, time.monotonic() + seconds)

    async def wait(self) -> None:
        while (delay := self.until - time.monotonic()) > 0:
            await asyncio.sleep(delay)


class _Budget:
    """judge.max_budget_usd: a call starts only if what was spent, plus an upper bound for every call in flight
    and for this one, stays within the budget. So the run stops before exceeding it, never after."""

    def __init__(self, limit: float | None) -> None:
        self.limit = limit
        self.spent = 0.0
        self.reserved = 0.0
        self.holds = 0  # reservations outstanding (counted, as float sums need not return to exactly 0)
        self._changed = asyncio.Condition()

    def fits(self, amount: float) -> bool:
        return self.limit is None or self.spent + self.reserved + amount <= self.limit

    def hold(self, amount: float) -> None:
        self.reserved += amount
        self.holds += 1

    def release(self, reserved: float, spent: float) -> None:
        self.reserved -= reserved
        self.holds -= 1
        self.spent += spent

    async def reserve(self, amount: float) -> None:
        """Wait until ``amount`` fits (calls in flight may cost less than reserved); _OutOfBudget if it never can."""
        async with self._changed:
            while not self.fits(amount):
                if self.holds == 0:
                    raise _OutOfBudget
                await self._changed.wait()
            self.hold(amount)

    async def settle(self, reserved: float, spent: float) -> None:
        async with self._changed:
            self.release(reserved, spent)
            self._changed.notify_all()


class _Progress:
    """A rich progress bar with records/s, tokens and dollars; silent when disabled (tests, non-terminals)."""

    def __init__(self, enabled: bool) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._start = time.monotonic()
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} rec/s  {task.fields[tokens]:,} tok  ${task.fields[cost]:.2f}"),
                TimeRemainingColumn(),
                transient=False,
            )

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def begin(self, description: str, total: int) -> None:
        self._start = time.monotonic()
        if self._bar is not None:
            self._task = self._bar.add_task(description, total=total, rate=0.0, tokens=0, cost=0.0)

    def update(self, completed: int, tally: Tally, description: str | None = None) -> None:
        if self._bar is None or self._task is None:
            return
        rate = completed / max(time.monotonic() - self._start, 1e-9)
        extra = {"description": description} if description else {}
        tokens = sum(tally.usage.values())
        self._bar.update(self._task, completed=completed, rate=rate, tokens=tokens, cost=tally.cost_usd, **extra)


@dataclass
class _Run:
    cfg: JudgeConfig
    rubric: Rubric
    prompt: Prompt
    price: Price
    cache: JudgeCache
    client: Any
    tally: Tally
    budget: _Budget
    progress: _Progress
    factor: float = 1.0  # price factor: 1 for messages, judge.batch_discount for batches
    gate: _Gate = field(default_factory=_Gate)
    judged: set[str] = field(default_factory=set)  # keys judged by this run
    failures: dict[str, str] = field(default_factory=dict)  # key -> why
    stop_reason: str | None = None
    fatal: str | None = None

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def account(self, usage: Mapping[str, int], factor: float | None = None) -> float:
        _add_usage(self.tally.usage, usage)
        cost = cost_usd(usage, self.price, self.factor if factor is None else factor)
        self.tally.cost_usd += cost
        return cost

    def upper_bound(self, messages: Sequence[Mapping[str, Any]]) -> float:
        """The most one call can cost: a generous input estimate at the dearer input price, max_tokens out."""
        tokens = math.ceil(self.prompt.local_tokens(messages) * 1.25)
        dearest = max(self.price.input, self.price.cache_write)
        return self.factor * (tokens * dearest + self.cfg.max_tokens * self.price.output) / 1e6

    def store(self, unit_key: str, record_id: str, sample: int, parsed: tuple, usage: dict, extra: dict) -> None:
        scores, rationales = parsed
        entry = {
            "key": unit_key,
            "record_id": record_id,
            "sample": sample,
            "model": self.prompt.model,
            "prompt_version": self.prompt.version,
            "scores": scores,
            "rationales": rationales,
            "usage": usage,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        self.cache.append(entry)
        self.judged.add(unit_key)

    def fail(self, key: str, record_id: str, reason: str) -> None:
        self.failures[key] = reason
        log.warning("record %s: judgment failed: %s", record_id, reason)
        if len(self.failures) > self.cfg.max_failures and not self.stopping:
            self.stop_reason = "too_many_failures"
            log.error("more than judge.max_failures=%d failed judgments: stopping", self.cfg.max_failures)

    def stop_fatal(self, message: str) -> None:
        if self.fatal is None:
            self.fatal = message
            self.stop_reason = "api_error"


class _ApiMeter:
    """SDK middleware: counts every HTTP attempt and caps each retry-after the SDK will obey (see
    SDK_RETRY_AFTER_CAP_S); the original value is kept in another header for our own bounded wait."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    async def handle_async(self, request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        self.tally.api_calls += 1
        if request.retries_taken:
            self.tally.retries += 1
        response = await call_next(request)
        headers = response.http_response.headers
        wait = _header_seconds(headers)
        if wait is not None and wait > SDK_RETRY_AFTER_CAP_S:
            headers[_ORIGINAL_RETRY_AFTER] = f"{wait:g}"
            headers["retry-after"] = f"{SDK_RETRY_AFTER_CAP_S:g}"
            headers.pop("retry-after-ms", None)
        return response


def _header_seconds(headers: Any) -> float | None:
    for name, scale in ((_ORIGINAL_RETRY_AFTER, 1.0), ("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        with contextlib.suppress(TypeError, ValueError):
            return float(headers.get(name)) / scale
    return None


def _make_middleware(tally: Tally) -> Any:
    import anthropic

    class ApiMeter(_ApiMeter, anthropic.Middleware):
        pass

    return ApiMeter(tally)


def _api_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"{exc.status_code} {error.get('type', 'error')}: {error.get('message', '')}"
    return f"{getattr(exc, 'status_code', '?')}: {exc}"


def _is_fatal_status(status: int) -> bool:
    # 4xx other than timeout/conflict/rate limit: a bad key, model, request or account; retrying cannot help.
    return 400 <= status < 500 and status not in (408, 409, 429)


async def _call(run: _Run, what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` with the SDK's retries inside, then our own bounded wait on transient errors.

    After the SDK gives up, we wait (honouring retry-after, backing off otherwise) and try again, until the total
    of our waits for this call would pass judge.rate_limit_max_wait_s; then the call fails (_UnitFailed).
    """
    import anthropic

    waited, attempt = 0.0, 0
    while True:
        await run.gate.wait()
        try:
            return await call()
        except anthropic.APIStatusError as exc:
            if _is_fatal_status(exc.status_code):
                raise _Fatal(_refusal_message(exc)) from None
            reason = _api_message(exc)
            delay = _header_seconds(exc.response.headers) or _backoff(attempt)
            shared = exc.status_code in (429, 529)
        except (anthropic.APIConnectionError, anthropic.APIResponseValidationError) as exc:
            reason, delay, shared = f"{type(exc).__name__}: {exc}", _backoff(attempt), False
        remaining = run.cfg.rate_limit_max_wait_s - waited
        if remaining <= 0:
            raise _UnitFailed(f"{reason} (after the SDK's retries and {waited:.0f} s of waiting)")
        delay = min(delay, remaining)
        if shared:
            run.gate.pause(delay)
        log.warning("%s: %s; retrying in %.1f s", what, reason, delay)
        run.tally.retries += 1
        await asyncio.sleep(delay)
        waited += delay
        attempt += 1


def _backoff(attempt: int) -> float:
    return min(2.0 * 2**attempt, 30.0)


# ---------------------------------------------------------------------------------------------------------------
# Messages mode


async def _run_messages(run: _Run, units: list[Unit]) -> None:
    queue = deque(units)
    done = 0

    async def judge_next() -> None:
        nonlocal done
        unit = queue.popleft()
        await _judge_unit(run, unit)
        done += 1
        run.progress.update(done, run.tally)

    run.progress.begin(f"judging ({run.prompt.model})", len(units))
    # One call alone first: the API caches the prompt only once a response exists, so concurrent first calls
    # would each pay the cache write.
    if queue:
        await judge_next()

    async def worker() -> None:
        while queue and not run.stopping:
            await judge_next()

    await asyncio.gather(*(worker() for _ in range(min(run.cfg.max_concurrency, len(queue)))))


async def _judge_unit(run: _Run, unit: Unit) -> None:
    """Obtain one valid judgment (re-asking on invalid output) and cache it; record a failure otherwise."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": unit.user_message}]
    total: dict[str, int] = dict.fromkeys(_USAGE_FIELDS, 0)
    problem = ""
    for attempt in range(run.cfg.invalid_output_retries + 1):
        reservation = run.upper_bound(messages)
        try:
            await run.budget.reserve(reservation)
        except _OutOfBudget:
            run.stop_reason = run.stop_reason or "budget"
            return
        spent = 0.0
        try:
            message = await _call(
                run, f"record {unit.record_id}", lambda m=messages: run.client.messages.create(**run.prompt.request(m))
            )
            usage = usage_of(message.usage)
            spent = run.account(usage)
            _add_usage(total, usage)
            parsed = parse_judgment(message, run.rubric)
        except InvalidOutput as exc:
            run.tally.invalid_outputs += 1
            problem = str(exc)
            log.warning(
                "record %s: invalid judgment (%s); %s",
                unit.record_id,
                problem,
                "asking again" if attempt < run.cfg.invalid_output_retries else "giving up",
            )
            messages = reask_messages(unit.user_message, message, problem, run.rubric)
            continue
        except _UnitFailed as exc:
            run.fail(unit.key, unit.record_id, str(exc))
            return
        except _Fatal as exc:
            run.stop_fatal(str(exc))
            return
        finally:
            await run.budget.settle(reservation, spent)
        run.store(
            unit.key, unit.record_id, unit.sample, parsed, total, {"message_id": message.id, "attempts": attempt + 1}
        )
        return
    run.fail(unit.key, unit.record_id, f"invalid output after {run.cfg.invalid_output_retries + 1} attempts: {problem}")


# ---------------------------------------------------------------------------------------------------------------
# Batch mode


class BatchLedger:
    """``data.judge_batches``: every batch submitted and not yet collected, written atomically.

    A batch id is written before its first poll, so a restart polls the same batch instead of paying again. The
    requests being submitted are written first too: if the process dies between the API accepting a batch and
    the id being saved, the restart finds the batch by its creation time and size.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"batches": [], "submitting": None}
        if self.path.is_file():
            try:
                self.data = read_json(self.path)
            except ValueError as exc:
                raise FluentRewardError(f"{self.path}: unreadable batch ledger ({exc}); fix or delete it") from None

    def save(self) -> None:
        write_json(self.path, self.data)

    def open_batches(self) -> list[dict[str, Any]]:
        return [b for b in self.data["batches"] if not b.get("collected")]

    def open_keys(self) -> set[str]:
        return {key for batch in self.open_batches() for key in batch["requests"]}


@dataclass
class _Pending:
    """A batch request to (re)submit."""

    unit: Unit
    messages: list[dict[str, Any]]
    resubmits: int = 0
    reasks: int = 0


async def _run_batches(run: _Run, units: list[Unit], ledger: BatchLedger, *, submit: bool = True) -> None:
    """Batch mode; with ``submit=False`` only collect the batches already submitted (messages mode after a
    switch from batch mode: what was paid for is collected, the rest is judged by messages)."""
    await _recover_submission(run, ledger)
    by_key = {u.key: u for u in units}
    waiting = ledger.open_keys()
    for batch in ledger.open_batches():  # submitted by an earlier run: their upper bounds count against the budget
        for request in batch["requests"].values():
            run.budget.hold(request.get("reserved_usd", 0.0))
    if waiting:
        log.info("resuming: polling %d batch(es) submitted earlier", len(ledger.open_batches()))
    run.progress.begin(f"batches ({run.prompt.model})", len(set(by_key) | waiting))
    todo = [_Pending(u, [{"role": "user", "content": u.user_message}]) for u in units if u.key not in waiting]
    if submit:
        await _submit(run, ledger, todo)
    while ledger.open_batches() and run.fatal is None:
        resubmit: list[_Pending] = []
        statuses = []
        for batch in ledger.open_batches():
            status = await _call(
                run, f"batch {batch['id']}", lambda b=batch: run.client.messages.batches.retrieve(b["id"])
            )
            statuses.append(status)
            if status.processing_status == "ended":
                resubmit += await _collect(run, ledger, batch, by_key)
        _show_batch_progress(run, statuses)
        if resubmit and submit and not run.stopping:
            await _submit(run, ledger, resubmit)
        if ledger.open_batches():
            await asyncio.sleep(run.cfg.batch_poll_interval_s)


def _show_batch_progress(run: _Run, statuses: list[Any]) -> None:
    processing = sum(s.request_counts.processing for s in statuses)
    running = sum(1 for s in statuses if s.processing_status != "ended")
    description = f"{running} batch(es) processing {processing} requests"
    run.progress.update(len(run.judged) + len(run.failures), run.tally, description)
    log.debug("%s; %d judged, %d failed", description, len(run.judged), len(run.failures))


async def _submit(run: _Run, ledger: BatchLedger, todo: list[_Pending]) -> None:
    """Submit ``todo`` in batches within the API's limits and the budget; each id is saved before polling."""
    affordable = []
    for pending in todo:
        cost = run.upper_bound(pending.messages)
        if not run.budget.fits(cost):
            run.stop_reason = run.stop_reason or "budget"
            break
        run.budget.hold(cost)  # released when the batch's results are collected
        affordable.append((pending, cost))
    for chunk in _chunks(run, affordable):
        await _submit_one(run, ledger, chunk)


def _chunks(run: _Run, items: list[tuple[_Pending, float]]) -> Iterator[list[tuple[_Pending, float]]]:
    chunk: list[tuple[_Pending, float]] = []
    size = 0
    for item in items:
        request_size = len(json.dumps(run.prompt.request(item[0].messages)))
        if chunk and (len(chunk) >= run.cfg.batch_max_requests or size + request_size > BATCH_MAX_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += request_size
    if chunk:
        yield chunk


async def _submit_one(run: _Run, ledger: BatchLedger, chunk: list[tuple[_Pending, float]]) -> None:
    requests = {
        p.unit.key: {
            "record_id": p.unit.record_id,
            "sample": p.unit.sample,
            "resubmits": p.resubmits,
            "reasks": p.reasks,
            "reserved_usd": cost,
        }
        for p, cost in chunk
    }
    intent = _ledger_entry(run, None, requests)
    ledger.data["submitting"] = intent
    ledger.save()
    payload = [{"custom_id": p.unit.key, "params": run.prompt.request(p.messages)} for p, _ in chunk]
    batch = await _call(run, "batch submission", lambda: run.client.messages.batches.create(requests=payload))
    ledger.data["batches"].append({**intent, "id": batch.id})
    ledger.data["submitting"] = None
    ledger.save()
    run.tally.batches_submitted += 1
    log.info("submitted batch %s with %d requests (saved to %s)", batch.id, len(chunk), ledger.path)


def _ledger_entry(run: _Run, batch_id: str | None, requests: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": batch_id,
        "submitted_at": _utc_now(),
        "model": run.prompt.model,
        "prompt_version": run.prompt.version,
        "requests": requests,
        "collected": False,
    }


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


async def _recover_submission(run: _Run, ledger: BatchLedger) -> None:
    """A submission cut off before its id was saved: find the batch the API accepted, if any, and adopt it."""
    intent = ledger.data.get("submitting")
    if not intent:
        return
    known = {b["id"] for b in ledger.data["batches"]}
    since = datetime.fromisoformat(intent["submitted_at"]) - timedelta(minutes=2)
    size = len(intent["requests"])
    found = []
    page = await _call(run, "batch list", lambda: run.client.messages.batches.list(limit=100))
    for batch in page.data:
        counts = batch.request_counts
        total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
        if batch.id not in known and batch.created_at >= since and total == size:
            found.append(batch.id)
    if len(found) == 1:
        log.warning("adopting batch %s, submitted by an interrupted run before its id was saved", found[0])
        ledger.data["batches"].append({**intent, "id": found[0]})
    else:
        log.warning("an interrupted run may have submitted a batch that cannot be identified; submitting again")
    ledger.data["submitting"] = None
    ledger.save()


async def _collect(run: _Run, ledger: BatchLedger, batch: dict[str, Any], by_key: dict[str, Unit]) -> list[_Pending]:
    """Cache every valid result of an ended batch; return the requests to resubmit (errored, expired, invalid)."""

    async def fetch() -> list[Any]:
        return [item async for item in await run.client.messages.batches.results(batch["id"])]

    items = await _call(run, f"batch {batch['id']} results", fetch)
    resubmit: list[_Pending] = []
    for item in items:
        request = batch["requests"].get(item.custom_id)
        if request is None:
            log.warning("batch %s: unknown custom_id %s ignored", batch["id"], item.custom_id)
            continue
        if item.custom_id in run.cache.entries:  # collected (and accounted) before a restart
            run.budget.release(request.get("reserved_usd", 0.0), 0.0)
            continue
        succeeded = item.result.type == "succeeded"
        spent = run.account(usage_of(item.result.message.usage), run.cfg.batch_discount) if succeeded else 0.0
        run.budget.release(request.get("reserved_usd", 0.0), spent)
        again = _collect_one(run, batch, item, request, by_key.get(item.custom_id))
        if again is not None:
            resubmit.append(again)
    batch["collected"] = True
    ledger.save()
    return resubmit


def _collect_one(
    run: _Run, batch: dict[str, Any], item: Any, request: dict[str, Any], unit: Unit | None
) -> _Pending | None:
    key, result = item.custom_id, item.result
    if unit is None and result.type != "succeeded":
        # Not needed by this run (an earlier prompt, or judged another way now): nothing to resubmit or count.
        log.info("batch %s: request %s %s; no longer needed", batch["id"], key, result.type)
        return None
    if result.type == "succeeded":
        message = result.message
        try:
            parsed = parse_judgment(message, run.rubric)
        except InvalidOutput as exc:
            run.tally.invalid_outputs += 1
            if unit is None:
                return None
            if request["reasks"] < run.cfg.invalid_output_retries:
                messages = reask_messages(unit.user_message, message, str(exc), run.rubric)
                return _Pending(unit, messages, request["resubmits"], request["reasks"] + 1)
            run.fail(key, request["record_id"], f"invalid output after {request['reasks'] + 1} attempts: {exc}")
            return None
        # The batch may come from an earlier run with another prompt: its key was made with that prompt.
        extra = {"message_id": message.id, "batch_id": batch["id"], "mode": "batch", "model": batch["model"]}
        extra["prompt_version"] = batch["prompt_version"]
        run.store(key, request["record_id"], request["sample"], parsed, usage_of(message.usage), extra)
        return None
    if result.type == "errored" and result.error.error.type == "invalid_request_error":
        run.fail(key, request["record_id"], f"batch request rejected: {result.error.error.message}")
        return None
    why = f"{result.type}: {result.error.error.message}" if result.type == "errored" else result.type
    if request["resubmits"] < run.cfg.batch_max_resubmits:
        log.info("batch %s: request %s %s; resubmitting", batch["id"], key, why)
        return _Pending(
            unit, [{"role": "user", "content": unit.user_message}], request["resubmits"] + 1, request["reasks"]
        )
    run.fail(key, request["record_id"], f"batch request {why} (resubmitted {request['resubmits']} times)")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Dry run: what judging the rest would cost


@dataclass
class Estimate:
    """The cost of judging what is not supplied or cached, in both modes."""

    records: int
    from_reference: int
    from_cache: int
    records_to_judge: int
    calls: int
    input_tokens: int  # over all calls, cached prefix included
    prefix_tokens: int  # per call: tools + system, cacheable
    output_tokens: int  # estimated
    counted_by: str  # "messages.count_tokens" | "local estimate (...)"
    output_basis: str
    messages_usd: float
    batch_usd: float
    batch_worst_usd: float  # batch with no cache hits at all (caching in batches is best effort)
    model: str = ""

    def table(self) -> str:
        rows = [
            f"judge dry run ({self.model}): {self.records} records: {self.from_reference} from reference/import, "
            f"{self.from_cache} from cache, {self.records_to_judge} to judge ({self.calls} calls)",
            f"input tokens: {self.input_tokens:,} ({self.counted_by}; {self.prefix_tokens:,} per call are the "
            "cacheable rubric prompt)",
            f"output tokens: {self.output_tokens:,} ({self.output_basis})",
            "",
            f"{'mode':<10}{'calls':>10}{'cost (USD)':>14}",
            f"{'messages':<10}{self.calls:>10,}{self.messages_usd:>14.2f}",
            f"{'batch':<10}{self.calls:>10,}{self.batch_usd:>14.2f}   (up to {self.batch_worst_usd:.2f} with no "
            "cache hits; up to 24 h)",
        ]
        return "\n".join(rows)


def _output_estimate(cached: Mapping[str, dict[str, Any]], prompt: Prompt, rubric: Rubric) -> tuple[float, str]:
    seen = [
        e["usage"]["output_tokens"] / max(int(e.get("attempts", 1)), 1)
        for e in cached.values()
        if e.get("prompt_version") == prompt.version and e.get("model") == prompt.model and "usage" in e
    ]
    if len(seen) >= 5:
        return sum(seen) / len(seen), f"mean of {len(seen)} earlier judgments with this prompt"
    per_call = OUTPUT_TOKENS_PER_DIMENSION * len(rubric.names) + OUTPUT_TOKENS_OVERHEAD
    return float(per_call), f"assumed {per_call} per call"


def _estimate(
    plan: Plan, prompt: Prompt, cfg: JudgeConfig, rubric: Rubric, totals: tuple[int, int], how: str, cached: Mapping
) -> Estimate:
    calls = len(plan.units)
    input_total, prefix = totals
    out_per_call, out_basis = _output_estimate(cached, prompt, rubric)
    output = round(out_per_call * calls)
    price = cfg.price()
    cacheable = prefix if prefix >= MIN_CACHEABLE_TOKENS and calls else 0
    cached_usage = {
        "input_tokens": input_total - cacheable * calls,
        "cache_creation_input_tokens": cacheable,
        "cache_read_input_tokens": cacheable * max(calls - 1, 0),
        "output_tokens": output,
    }
    uncached = {"input_tokens": input_total, "output_tokens": output}
    records = len(plan.records)
    to_judge = plan.records_to_judge()
    return Estimate(
        records=records,
        from_reference=len(plan.supplied),
        from_cache=records - len(plan.supplied) - to_judge,
        records_to_judge=to_judge,
        calls=calls,
        input_tokens=input_total,
        prefix_tokens=prefix,
        output_tokens=output,
        counted_by=how,
        output_basis=out_basis,
        messages_usd=cost_usd(cached_usage, price),
        batch_usd=cost_usd(cached_usage, price, cfg.batch_discount),
        batch_worst_usd=cost_usd(uncached, price, cfg.batch_discount),
        model=cfg.model,
    )


def _local_totals(plan: Plan, prompt: Prompt) -> tuple[int, int]:
    prefix = prompt.local_tokens()
    per_message = {key: prompt.local_tokens([{"content": msg}]) for key, msg in plan.messages.items()}
    return sum(per_message[u.key] for u in plan.units), prefix


async def _counted_totals(client: Any, plan: Plan, prompt: Prompt, cfg: JudgeConfig) -> tuple[int, int]:
    """Exact input tokens via count_tokens (free), counting many user messages per request.

    One request with a one-character message measures the fixed part of every call (tools, system, message
    framing); each chunk of messages joined into one user turn measures their own tokens.
    """

    async def count(text: str) -> int:
        request = prompt.request([{"role": "user", "content": text}])
        fields = {k: request[k] for k in ("model", "system", "tools", "tool_choice", "messages")}
        result = await client.messages.count_tokens(**fields)
        return int(result.input_tokens)

    fixed = await count(".")
    repeats: dict[str, int] = {}
    for unit in plan.units:
        repeats[unit.user_message] = repeats.get(unit.user_message, 0) + 1
    chunks: list[list[str]] = [[]]
    for message in repeats:
        if sum(len(m) for m in chunks[-1]) + len(message) > COUNT_CHUNK_CHARS and chunks[-1]:
            chunks.append([])
        chunks[-1].append(message)
    semaphore = asyncio.Semaphore(cfg.max_concurrency)

    async def chunk_tokens(chunk: list[str]) -> int:
        async with semaphore:
            own = await count("\n".join(chunk)) - fixed
        # Tokens of the chunk, spread over its messages by length, times how often each is sent (samples).
        chars = sum(len(m) for m in chunk) or 1
        return round(sum(own * len(m) / chars * repeats[m] for m in chunk))

    own_tokens = sum(await asyncio.gather(*(chunk_tokens(c) for c in chunks if c)))
    return fixed * len(plan.units) + own_tokens, fixed


# ---------------------------------------------------------------------------------------------------------------
# Output


@dataclass
class JudgeSummary:
    """What a run did; ``metrics`` is what went to data.judge_metrics."""

    status: str
    metrics: dict[str, Any]
    estimate: Estimate | None = None


def _assemble(
    plan: Plan, cache: Mapping[str, dict[str, Any]], prompt: Prompt, rubric: Rubric, judged_now: set[str]
) -> tuple[list[dict[str, Any]], list[str], dict[str, int]]:
    """The judgments in the order of the validated file; records with a missing sample are left out and listed."""
    judgments, missing = [], []
    counts = dict.fromkeys(("judged_now", "from_cache", "from_reference", "from_import"), 0)
    for record in plan.records:
        supplied = plan.supplied.get(record["id"])
        if supplied is not None:
            judgments.append(_supplied_judgment(record, supplied))
            counts[f"from_{supplied.source}"] += 1
            continue
        keys = plan.keys[record["id"]]
        entries = [cache.get(k) for k in keys]
        if any(e is None for e in entries):
            missing.append(record["id"])
            continue
        judgments.append(_claude_judgment(record, entries, prompt, rubric))
        counts["judged_now" if any(k in judged_now for k in keys) else "from_cache"] += 1
    return judgments, missing, counts


def _supplied_judgment(record: Mapping[str, Any], supplied: Supplied) -> dict[str, Any]:
    return {
        "id": record["id"],
        "group_id": record["group_id"],
        "scores": supplied.scores,
        "rationale": supplied.rationale,
        "source": supplied.source,
        "model": supplied.model,
        "prompt_version": supplied.prompt_version,
        "usage": {},
        "samples": supplied.samples,
    }


def _claude_judgment(record: Mapping[str, Any], entries: list[Any], prompt: Prompt, rubric: Rubric) -> dict[str, Any]:
    usage: dict[str, int] = {}
    for entry in entries:
        _add_usage(usage, entry.get("usage", {}))
    scores = {n: sum(e["scores"][n] for e in entries) / len(entries) for n in rubric.names}
    if len(entries) == 1:
        scores = {n: int(s) for n, s in scores.items()}
    rationales = entries[0].get("rationales", {})
    return {
        "id": record["id"],
        "group_id": record["group_id"],
        "scores": scores,
        "rationale": " ".join(f"{n}: {rationales[n]}" for n in rubric.names if n in rationales),
        "rationales": rationales,
        "source": "claude",
        "model": prompt.model,
        "prompt_version": prompt.version,
        "usage": usage,
        "samples": len(entries),
    }


def retest_agreement(plan: Plan, cache: Mapping[str, dict[str, Any]], rubric: Rubric) -> dict[str, Any] | None:
    """The judge's agreement with itself: Spearman between its samples of the same records (mean over pairs)."""
    samples = [[cache[k] for k in keys] for keys in plan.keys.values() if all(k in cache for k in keys)]
    if not samples or len(samples[0]) < 2 or len(samples) < 3:
        return None
    from scipy.stats import spearmanr

    def mean_rho(values: list[list[float]]) -> float | None:
        rhos = [
            spearmanr([v[i] for v in values], [v[j] for v in values])[0]
            for i, j in combinations(range(len(values[0])), 2)
        ]
        rhos = [r for r in rhos if r == r]  # constant columns give nan
        return round(float(sum(rhos) / len(rhos)), 4) if rhos else None

    overall = [[rubric.overall(e["scores"]) for e in entries] for entries in samples]
    return {
        "records": len(samples),
        "samples": len(samples[0]),
        "overall_spearman": mean_rho(overall),
        "dimensions_spearman": {n: mean_rho([[e["scores"][n] for e in es] for es in samples]) for n in rubric.names},
    }


def _metrics(
    status: str,
    plan: Plan,
    counts: dict[str, int],
    missing: list[str],
    run: _Run | None,
    cfg: JudgeConfig,
    prompt: Prompt,
    retest: dict[str, Any] | None,
) -> dict[str, Any]:
    tally = run.tally if run is not None else Tally()
    failures = run.failures if run is not None else {}
    failed = [rid for rid in missing if any(k in failures for k in plan.keys.get(rid, ()))]
    metrics: dict[str, Any] = {
        "status": status,
        "mode": cfg.mode,
        "model": cfg.model,
        "prompt_version": prompt.version,
        "samples": cfg.samples,
        "records": len(plan.records),
        "records_judged_now": counts["judged_now"],
        "records_from_cache": counts["from_cache"],
        "records_from_reference": counts["from_reference"],
        "records_from_import": counts["from_import"],
        "records_failed": len(failed),
        "records_not_judged": len(missing) - len(failed),
        "failed_ids": failed[:100],
        "failure_reasons": sorted(set(failures.values()))[:20],
        "api_calls": tally.api_calls,
        "retries": tally.retries,
        "invalid_outputs": tally.invalid_outputs,
        "batches_submitted": tally.batches_submitted,
        **tally.usage,
        "estimated_cost_usd": round(tally.cost_usd, 6),
    }
    if retest is not None:
        metrics["test_retest"] = retest
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# The stage


ClientFactory = Callable[..., Any]


def _default_client_factory(**kwargs: Any) -> Any:
    import anthropic

    return anthropic.AsyncAnthropic(**kwargs)


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        raise FluentRewardError(f"{path}: validated records not found; run `fluent-reward validate` first")
    return list(iter_jsonl(path))


def run_judge(
    params: Params,
    *,
    dry_run: bool = False,
    client_factory: ClientFactory | None = None,
    show_progress: bool = False,
) -> JudgeSummary:
    """Judge every validated record; write data.judgments and data.judge_metrics.

    Args:
        params: the loaded settings (judge, rubric, data paths).
        dry_run: only estimate what judging the remaining records would cost; nothing is sent but free
            count_tokens requests, nothing is written.
        client_factory: builds the async client from keyword arguments (``api_key``, ``max_retries``,
            ``timeout``, ``middleware``, maybe ``base_url``); tests pass one with strict response validation.
        show_progress: draw a progress bar (the CLI does on a terminal).

    Returns:
        A JudgeSummary. Raises FluentRewardError (exit 2) for a missing key with records left, a bad reference
        file or an API refusal (401, 404, 400); StageFailed (exit 1) when the budget or judge.max_failures stopped
        the run. Every judgment obtained is in the cache before any of these is raised.
    """
    cfg, rubric, paths = params.judge, params.rubric, params.data
    price = cfg.price()
    prompt = Prompt.build(rubric, cfg)
    records = _read_records(paths.validated)
    reference = load_reference(cfg.reference, rubric)
    key, base_url = resolve_api_settings()
    factory = client_factory or _default_client_factory
    if dry_run:
        cache = JudgeCache(paths.judge_cache)
        plan = make_plan(records, reference, cache.load(), prompt, cfg.samples)
        require_anchors(rubric, plan.records_to_judge())
        estimate = _dry_run(plan, prompt, cfg, rubric, cache.entries, key, base_url, factory)
        log.info(
            "dry run: %d calls; messages $%.2f, batch $%.2f", estimate.calls, estimate.messages_usd, estimate.batch_usd
        )
        return JudgeSummary(status="dry_run", metrics={}, estimate=estimate)
    with exclusive_lock(paths.judge_cache):
        cache = JudgeCache(paths.judge_cache)
        try:
            return _judge(params, prompt, price, records, reference, cache, key, base_url, factory, show_progress)
        finally:
            cache.close()


def _dry_run(
    plan: Plan,
    prompt: Prompt,
    cfg: JudgeConfig,
    rubric: Rubric,
    cached: Mapping,
    key: str | None,
    base_url: str | None,
    factory: ClientFactory,
) -> Estimate:
    if not plan.units:
        return _estimate(plan, prompt, cfg, rubric, (0, 0), "nothing to count", cached)
    local = f"local estimate, {CHARS_PER_TOKEN} characters per token"
    if key is None:
        return _estimate(
            plan,
            prompt,
            cfg,
            rubric,
            _local_totals(plan, prompt),
            f"{local}; set ANTHROPIC_API_KEY to count exactly",
            cached,
        )
    try:
        totals = asyncio.run(_count_with_api(plan, prompt, cfg, key, base_url, factory))
    except _CountUnavailable as exc:
        log.warning("count_tokens unavailable (%s): using the local estimate", exc)
        return _estimate(
            plan, prompt, cfg, rubric, _local_totals(plan, prompt), f"{local}; count_tokens failed", cached
        )
    return _estimate(plan, prompt, cfg, rubric, totals, "messages.count_tokens", cached)


class _CountUnavailable(Exception):
    pass


async def _count_with_api(
    plan: Plan, prompt: Prompt, cfg: JudgeConfig, key: str, base_url: str | None, factory: ClientFactory
) -> tuple[int, int]:
    """count_tokens through the SDK. A refusal of the key is the refusal a real run would get (exit 2); any other
    failure (an endpoint a gateway lacks, an outage) falls back to the local estimate."""
    import anthropic

    client = factory(**_client_kwargs(cfg, key, base_url, Tally()))
    async with client:
        try:
            return await _counted_totals(client, plan, prompt, cfg)
        except anthropic.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise FluentRewardError(_refusal_message(exc)) from None
            raise _CountUnavailable(_api_message(exc)) from None
        except anthropic.APIError as exc:
            raise _CountUnavailable(f"{type(exc).__name__}: {exc}") from None


def _refusal_message(exc: Any) -> str:
    """The API's own words for a refusal, with a hint at the setting to fix."""
    hints = {401: "check ANTHROPIC_API_KEY", 403: "check the key's permissions", 404: "check judge.model"}
    hint = hints.get(getattr(exc, "status_code", 0))
    return f"the Anthropic API refused the request ({_api_message(exc)})" + (f"; {hint}" if hint else "")


def _client_kwargs(cfg: JudgeConfig, key: str, base_url: str | None, tally: Tally) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "api_key": key,
        "max_retries": cfg.sdk_max_retries,
        "timeout": cfg.timeout_s,
        "middleware": [_make_middleware(tally)],
    }
    if base_url:
        kwargs["base_url"] = base_url
    return kwargs


def _judge(
    params: Params,
    prompt: Prompt,
    price: Price,
    records: list[dict[str, Any]],
    reference: ReferenceIndex,
    cache: JudgeCache,
    key: str | None,
    base_url: str | None,
    factory: ClientFactory,
    show_progress: bool,
) -> JudgeSummary:
    cfg, rubric, paths = params.judge, params.rubric, params.data
    plan = make_plan(records, reference, cache.load(), prompt, cfg.samples)
    require_anchors(rubric, plan.records_to_judge())
    ledger = BatchLedger(paths.judge_batches)
    needs_api = bool(plan.units) or bool(ledger.open_batches() or ledger.data.get("submitting"))
    if needs_api and key is None:
        estimate = _estimate(plan, prompt, cfg, rubric, _local_totals(plan, prompt), "local", cache.entries)
        dollars = estimate.batch_usd if cfg.mode == "batch" else estimate.messages_usd
        waiting = (
            f" ({len(ledger.open_batches())} batches submitted earlier wait to be collected)"
            if ledger.open_batches()
            else ""
        )
        raise FluentRewardError(
            f"{estimate.records_to_judge} records need judging{waiting}; estimated cost ${dollars:.2f}; set "
            "ANTHROPIC_API_KEY (environment or .env), or supply their judgments in judge.reference"
        )
    run = None
    if needs_api:
        log.info(
            "judging %d records (%d calls) with %s in %s mode; %d from reference, %d judgments cached",
            plan.records_to_judge(),
            len(plan.units),
            cfg.model,
            cfg.mode,
            len(plan.supplied),
            sum(len(k) for k in plan.keys.values()) - len(plan.units),
        )
        run = _execute(cfg, rubric, prompt, price, cache, plan, ledger, key, base_url, factory, show_progress)
    return _finish(params, prompt, plan, cache, run)


def _execute(
    cfg: JudgeConfig,
    rubric: Rubric,
    prompt: Prompt,
    price: Price,
    cache: JudgeCache,
    plan: Plan,
    ledger: BatchLedger,
    key: str | None,
    base_url: str | None,
    factory: ClientFactory,
    show_progress: bool,
) -> _Run:
    async def go() -> _Run:
        tally = Tally()
        client = factory(**_client_kwargs(cfg, key or "", base_url, tally))
        async with client:
            with _Progress(show_progress) as progress:
                run = _Run(
                    cfg=cfg,
                    rubric=rubric,
                    prompt=prompt,
                    price=price,
                    cache=cache,
                    client=client,
                    tally=tally,
                    budget=_Budget(cfg.max_budget_usd),
                    progress=progress,
                    factor=cfg.batch_discount if cfg.mode == "batch" else 1.0,
                )
                try:
                    if cfg.mode == "batch":
                        await _run_batches(run, plan.units, ledger)
                    else:
                        if ledger.open_batches() or ledger.data.get("submitting"):
                            await _run_batches(run, [], ledger, submit=False)  # paid for: collect first
                        await _run_messages(run, [u for u in plan.units if u.key not in cache.entries])
                except _Fatal as exc:
                    run.stop_fatal(str(exc))
                except _UnitFailed as exc:  # a batch endpoint failing past every retry
                    run.stop_reason = "api_unavailable"
                    run.failures["*"] = str(exc)
                return run

    return asyncio.run(go())


def _finish(params: Params, prompt: Prompt, plan: Plan, cache: JudgeCache, run: _Run | None) -> JudgeSummary:
    """Write the outputs (judgments only when the run was not stopped) and raise if it was."""
    cfg, rubric, paths = params.judge, params.rubric, params.data
    judged_now = run.judged if run is not None else set()
    judgments, missing, counts = _assemble(plan, cache.entries, prompt, rubric, judged_now)
    retest = retest_agreement(plan, cache.entries, rubric) if cfg.samples >= 2 else None
    status = (run.stop_reason if run is not None else None) or "complete"
    metrics = _metrics(status, plan, counts, missing, run, cfg, prompt, retest)
    write_json(paths.judge_metrics, metrics)
    summary = (
        f"judge: {len(judgments)} of {len(plan.records)} records judged ({counts['judged_now']} now, "
        f"{counts['from_cache']} cached, {counts['from_reference'] + counts['from_import']} supplied, "
        f"{metrics['records_failed']} failed); {metrics['api_calls']} API calls, "
        f"${metrics['estimated_cost_usd']:.4f}"
    )
    if run is not None:
        _raise_if_stopped(run, status, len(missing), summary)
    # Both are stage outputs in dvc.yaml, so they exist after every successful run, even when nothing was sent.
    cache.touch()
    if not paths.judge_batches.exists():
        BatchLedger(paths.judge_batches).save()
    write_json(paths.judgments, _judgments_document(cfg, rubric, prompt, judgments, missing))
    log.info("%s -> %s", summary, paths.judgments)
    return JudgeSummary(status=status, metrics=metrics)


def _raise_if_stopped(run: _Run, status: str, missing: int, summary: str) -> None:
    """A stopped run ends with an error; everything it obtained is already in the cache and the metrics."""
    cfg = run.cfg
    if run.fatal is not None:
        raise FluentRewardError(f"{run.fatal}\n{summary}; rerun to resume")
    if status == "api_unavailable":
        raise StageFailed(f"the Anthropic API stayed unavailable: {run.failures['*']}\n{summary}; rerun to resume")
    if status == "budget":
        raise StageFailed(
            f"stopped before exceeding judge.max_budget_usd=${cfg.max_budget_usd:g} (spent ${run.budget.spent:.4f}); "
            f"{missing} records still need judging: raise the budget and rerun\n{summary}"
        )
    if len(run.failures) > cfg.max_failures:
        raise StageFailed(
            f"{len(run.failures)} judgments failed (judge.max_failures={cfg.max_failures}); successes are cached: "
            f"rerun to retry the rest\n{summary}"
        )


def _judgments_document(
    cfg: JudgeConfig, rubric: Rubric, prompt: Prompt, judgments: list[dict[str, Any]], missing: list[str]
) -> dict[str, Any]:
    return {
        "model": cfg.model,
        "prompt_version": prompt.version,
        "rubric_version": rubric.version,
        "scale": {"min": rubric.scale.min, "max": rubric.scale.max},
        "dimensions": rubric.names,
        "judgments": judgments,
        "failed": missing,
    }
