"""Input records: reading JSON or JSONL (decided by content), checking every record, and normalising it.

The validator streams JSONL line by line, so memory grows only with the small per-record digests kept to find
duplicates. A JSON array is parsed whole (that is the format's nature); use JSONL for very large inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluent_reward.config import Rubric, ValidateConfig
from fluent_reward.errors import FluentRewardError
from fluent_reward.io import atomic_open, iter_jsonl, read_json_file, stable_hash, write_json

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("context", "student_message", "tutor_response")
NON_EMPTY_FIELDS = ("student_message", "tutor_response")
OPTIONAL_FIELDS = ("id", "conversation_id", "language", "metadata")
# metrics/validation.json lists at most this many dropped records (all are counted), to stay small in git.
MAX_DROPPED_LISTED = 1000
KNOWN_FIELDS = frozenset(REQUIRED_FIELDS + OPTIONAL_FIELDS)
# Python's parser recurses once per nesting level; records are objects of strings, so depth is never legitimate.
TOO_DEEP = "JSON nested too deeply to parse (records are objects of strings; is this the right file?)"
# C0 controls other than tab, newline and carriage return, plus DEL: never legitimate in chat text.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, formatted as ``FILE: record N (id=...): field 'X': what is wrong``."""

    kind: str
    file: str
    message: str
    record: int | None = None
    record_id: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.record is not None:
            where.append(f"record {self.record}" + (f" (id={self.record_id})" if self.record_id else ""))
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return ": ".join([*where, self.message])


@dataclass
class ValidationReport:
    """What the validator saw: counts for metrics/validation.json and the problems found."""

    records_read: int = 0
    records_valid: int = 0
    groups: set[str] = field(default_factory=set)
    languages: Counter[str] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    dropped_count: int = 0

    def drop(self, record: int | None, record_id: str | None, kinds: list[str]) -> None:
        self.dropped_count += 1
        if len(self.dropped) < MAX_DROPPED_LISTED:
            self.dropped.append({"record": record, "id": record_id, "kinds": kinds})

    def metrics(self) -> dict[str, Any]:
        return {
            "records_read": self.records_read,
            "records_valid": self.records_valid,
            "records_dropped": self.dropped_count,
            "groups": len(self.groups),
            "languages": dict(sorted(self.languages.items())),
            "problems_by_kind": dict(sorted(Counter(p.kind for p in self.problems).items())),
            "warnings_by_kind": dict(sorted(Counter(w.kind for w in self.warnings).items())),
            "dropped": self.dropped,
        }


def group_key(context: str, student_message: str) -> str:
    """The group of a record without ``conversation_id``: same context and student message, same group."""
    return "g-" + stable_hash(context, student_message)


def content_id(context: str, student_message: str, tutor_response: str) -> str:
    """The stable id of a record without one: a hash of its content."""
    return "r-" + stable_hash(context, student_message, tutor_response)


# ---------------------------------------------------------------------------------------------------------------
# Reading: JSON array or JSONL, decided by content


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _sniff_format(path: Path) -> str:
    """'json' for a top-level JSON value spanning the file, 'jsonl' for one record per line."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    stripped = head.lstrip()
    if stripped.startswith(b"\xef\xbb\xbf"):
        stripped = stripped[3:].lstrip()
    if not stripped.startswith(b"{"):
        return "json"
    # A file whose first line is a complete JSON value is JSONL; a pretty-printed object spans lines.
    first_line = stripped.split(b"\n", 1)[0]
    try:
        json.loads(first_line)
    except ValueError:
        return "json"
    return "jsonl"


def _check_path(path: Path) -> None:
    if not path.exists():
        raise FluentRewardError(f"{path}: input file does not exist")
    if path.is_dir():
        raise FluentRewardError(f"{path}: is a directory; give the path of a .json or .jsonl file")
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if not head.strip() and len(head) < 4096:
        raise FluentRewardError(f"{path}: file is empty; expected a JSON array of records or JSONL")


def iter_raw_records(path: Path, problems: list[Problem]) -> Iterator[tuple[int, Any]]:
    """Yield ``(record number, parsed value)``; unparseable JSONL lines become problems of kind ``not_json``.

    Record numbers are 1-based: the position in a JSON array, the line number in JSONL.
    File-level failures (missing, empty, not JSON, not a list) raise FluentRewardError at once.
    """
    _check_path(path)
    if _sniff_format(path) == "json":
        yield from enumerate(_load_json_array(path), start=1)
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                problems.append(
                    Problem(
                        "invalid_utf8",
                        str(path),
                        f"invalid UTF-8 at byte {exc.start + 1} of the line",
                        number,
                    )
                )
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(
                    Problem("not_json", str(path), f"not valid JSON: {exc.msg} at column {exc.colno}", number)
                )
            except RecursionError:
                problems.append(Problem("not_json", str(path), TOO_DEEP, number))


def _load_json_array(path: Path) -> list[Any]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise FluentRewardError(f"{path}: invalid UTF-8 at byte {exc.start + 1} (line {line})") from None
    if not text.strip():
        raise FluentRewardError(f"{path}: file is empty; expected a JSON array of records or JSONL")
    try:
        value = json.loads(text)
    except RecursionError:
        raise FluentRewardError(f"{path}: {TOO_DEEP}") from None
    except json.JSONDecodeError as exc:
        line, col = _line_col(text, exc.pos)
        hint = " (mixed JSON and JSONL? use one JSON array or one object per line)" if text.lstrip()[:1] == "{" else ""
        raise FluentRewardError(f"{path}: not valid JSON: {exc.msg} at line {line}, column {col}{hint}") from None
    if not isinstance(value, list):
        raise FluentRewardError(
            f"{path}: top-level value is {_type_name(value)}, expected a list of records (or JSONL, one per line)"
        )
    if not value:
        raise FluentRewardError(f"{path}: the list of records is empty")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Checking one record


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def check_record(record: Any, cfg: ValidateConfig) -> list[tuple[str, str | None, str]]:
    """Return the problems of one record as ``(kind, field, message)``; empty when it is valid."""
    if not isinstance(record, dict):
        return [("not_object", None, f"record is {_type_name(record)}, expected an object")]
    found: list[tuple[str, str | None, str]] = []
    for name in REQUIRED_FIELDS:
        if name not in record:
            found.append(("missing_field", name, "required field is missing"))
    for name in (*REQUIRED_FIELDS, "conversation_id", "language"):
        if name not in record or (name not in REQUIRED_FIELDS and record[name] is None):
            continue
        found.extend(_check_text(name, record[name], cfg))
    if "id" in record and (isinstance(record["id"], bool) or not isinstance(record["id"], str | int)):
        found.append(("wrong_type", "id", f"expected a string or an integer, got {_type_name(record['id'])}"))
    elif isinstance(record.get("id"), str) and not record["id"].strip():
        found.append(("empty_string", "id", "must not be empty"))
    if record.get("metadata") is not None and not isinstance(record["metadata"], dict):
        found.append(("wrong_type", "metadata", f"expected an object, got {_type_name(record['metadata'])}"))
    return found


def _check_text(name: str, value: Any, cfg: ValidateConfig) -> list[tuple[str, str | None, str]]:
    if not isinstance(value, str):
        return [("wrong_type", name, f"expected a string, got {_type_name(value)}")]
    if name in NON_EMPTY_FIELDS and not value.strip():
        return [("empty_string", name, "must not be empty or whitespace only")]
    if name in ("conversation_id", "language") and not value.strip():
        return [("empty_string", name, "must not be empty when given")]
    if len(value) > cfg.max_chars:
        return [("too_long", name, f"is {len(value)} characters, over validate.max_chars={cfg.max_chars}")]
    bad = _CONTROL_CHARS.search(value)
    if bad:
        return [
            (
                "control_char",
                name,
                f"contains control character U+{ord(bad.group()):04X} at {bad.start() + 1}",
            )
        ]
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        return [("invalid_utf8", name, "contains an unpaired surrogate (not valid UTF-8 text)")]
    return []


def normalise(record: dict[str, Any], group_by: str = "conversation_id") -> dict[str, Any]:
    """The validated form of a record: stable string ``id``, ``group_id``, and the original fields.

    The group is the ``conversation_id`` when given (``group_by: conversation_id``), else, or always with
    ``group_by: content``, a hash of the context and student message: the replies to one exchange.
    """
    context, student, response = (record[f] for f in REQUIRED_FIELDS)
    record_id = str(record["id"]) if record.get("id") is not None else content_id(context, student, response)
    by_id = group_by == "conversation_id" and record.get("conversation_id")
    group_id = str(record["conversation_id"]) if by_id else group_key(context, student)
    out: dict[str, Any] = {"id": record_id, "group_id": group_id}
    out.update({name: record[name] for name in REQUIRED_FIELDS})
    for name in ("conversation_id", "language", "metadata"):
        if record.get(name) is not None:
            out[name] = record[name]
    return out


def _digest(*parts: Any) -> bytes:
    """8-byte digest used only for duplicate detection: keeps memory small on millions of records."""
    return hashlib.blake2b(json.dumps(parts, ensure_ascii=False).encode(), digest_size=8).digest()


# ---------------------------------------------------------------------------------------------------------------
# The stage


def validate_file(path: Path, cfg: ValidateConfig) -> tuple[Iterator[dict[str, Any]], ValidationReport]:
    """Stream the valid, normalised records of ``path``; problems and counts accumulate in the report.

    The iterator must be consumed before the report is complete.
    """
    report = ValidationReport()
    return _validated(path, cfg, report), report


def _validated(path: Path, cfg: ValidateConfig, report: ValidationReport) -> Iterator[dict[str, Any]]:
    seen = _Seen(cfg.group_by)
    file = str(path)
    for number, record in iter_raw_records(path, report.problems):
        report.records_read += 1
        record_id = _display_id(record)
        found = check_record(record, cfg)
        if not found:
            _warn_unknown_fields(record, number, report, file)
            found = seen.duplicates(record, number)
        if found:
            for kind, field_name, message in found:
                report.problems.append(Problem(kind, file, message, number, record_id, field_name))
            report.drop(number, record_id, sorted({k for k, _, _ in found}))
            continue
        row = normalise(record, cfg.group_by)
        conflict = seen.group_conflict(row, number)
        if conflict:
            report.warnings.append(Problem("group_conflict", file, conflict, number, record_id, "conversation_id"))
        report.records_valid += 1
        report.groups.add(row["group_id"])
        report.languages[row.get("language", "unknown")] += 1
        yield row
    # Unparseable JSONL lines were recorded as problems by the reader; count them as read and dropped too.
    for problem in report.problems:
        if problem.kind in ("not_json", "invalid_utf8") and problem.field is None:
            report.records_read += 1
            report.drop(problem.record, None, [problem.kind])


def _display_id(record: Any) -> str | None:
    if isinstance(record, dict) and isinstance(record.get("id"), str | int) and not isinstance(record["id"], bool):
        return str(record["id"])
    return None


def _warn_unknown_fields(record: dict[str, Any], number: int, report: ValidationReport, file: str) -> None:
    for name in sorted(set(record) - KNOWN_FIELDS):
        report.warnings.append(
            Problem("unknown_field", file, "unknown field, ignored", number, _display_id(record), name)
        )


_GROUP_HINT = (
    "one exchange in two groups can land in both the train and the test split; "
    "set validate.group_by: content to group records by their context and student message"
)


@dataclass
class _Seen:
    """What earlier records looked like, as small digests: duplicate ids and records, and split exchanges."""

    group_by: str
    ids: dict[bytes, int] = field(default_factory=dict)
    records: dict[bytes, tuple[int, str | None]] = field(default_factory=dict)  # -> (record, conversation_id)
    exchanges: dict[bytes, tuple[int, str]] = field(default_factory=dict)  # context + student -> (record, group)

    def duplicates(self, record: dict[str, Any], number: int) -> list[tuple[str, str | None, str]]:
        content = _digest(*(record[f] for f in REQUIRED_FIELDS))
        conversation = record.get("conversation_id")
        if content in self.records:
            first, first_conversation = self.records[content]
            message = f"same context, student_message and tutor_response as record {first}"
            if first_conversation != conversation:
                message += f" but another conversation_id ({first_conversation!r} there, {conversation!r} here): "
                message += _GROUP_HINT if self.group_by == "conversation_id" else "keep one of them"
            return [("duplicate_record", None, message)]
        self.records[content] = (number, conversation)
        row_id = normalise(record)["id"]
        key = _digest(row_id)
        if key in self.ids:
            return [("duplicate_id", "id", f"duplicate id '{row_id}' (first used by record {self.ids[key]})")]
        self.ids[key] = number
        return []

    def group_conflict(self, row: dict[str, Any], number: int) -> str | None:
        """A message when this exchange (context + student message) already appeared in another group."""
        exchange = _digest(row["context"], row["student_message"])
        first, group = self.exchanges.setdefault(exchange, (number, row["group_id"]))
        if group == row["group_id"]:
            return None
        return (
            f"same context and student_message as record {first}, but in group {group!r} there and "
            f"{row['group_id']!r} here: {_GROUP_HINT}"
        )


def run_validate(source: Path, output: Path, metrics_path: Path, cfg: ValidateConfig) -> ValidationReport:
    """Validate ``source`` into normalised JSONL at ``output`` and counts at ``metrics_path``.

    With ``on_error: fail`` any problem raises FluentRewardError listing up to ``max_problems_shown`` of them,
    and neither output is touched. With ``drop`` the valid records are written and the rest counted.
    """
    records, report = validate_file(source, cfg)
    try:
        with atomic_open(output) as handle:
            for row in records:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            if (report.problems and cfg.on_error == "fail") or report.records_valid == 0:
                raise _AbortWrite
    except _AbortWrite:
        raise FluentRewardError(problem_summary(source, report, cfg)) from None
    for warning in report.warnings[: cfg.max_problems_shown]:
        log.warning("%s", warning)
    write_json(metrics_path, report.metrics())
    log.info(
        "validated %s: %d records valid, %d dropped, %d groups, %d languages -> %s",
        source,
        report.records_valid,
        report.dropped_count,
        len(report.groups),
        len(report.languages),
        output,
    )
    return report


class _AbortWrite(Exception):
    """Raised inside the atomic write to discard the temporary file."""


def problem_summary(source: Path, report: ValidationReport, cfg: ValidateConfig) -> str:
    """Up to ``max_problems_shown`` problems, one per line, then a one-line count (shared with ``score``)."""
    shown = report.problems[: cfg.max_problems_shown]
    lines = [str(p) for p in shown]
    more = len(report.problems) - len(shown)
    if more:
        lines.append(f"... and {more} more problems")
    lines.append(
        f"{source}: {len(report.problems)} problems in {report.dropped_count} of {report.records_read} records; "
        + ("no valid records; " if report.records_valid == 0 else "")
        + "nothing written (fix them, or skip bad records with --on-error drop or validate.on_error: drop)"
    )
    return "\n".join(lines)


def load_judged_records(
    validated: Path, judgments: Path, rubric: Rubric, skip_unjudged: bool = False
) -> list[dict[str, Any]]:
    """The validated records, in file order, each with ``scores`` (per dimension) and ``overall`` from the judge.

    Fails with a message saying what to rerun when the judgments were made with other dimensions or another scale
    than ``rubric``, when the file is damaged (not JSON, an entry without id or with a score that is missing,
    not finite or off the scale), or when a record has no judgment; with ``skip_unjudged`` such records are left
    out with a warning instead (the judge may have failed on a few: pairs can do without them, training cannot), and
    so are records the judgments file lists as tolerated failures (``failures_tolerated``: within
    judge.max_failure_ratio).
    """
    for path, stage in ((validated, "validate"), (judgments, "judge")):
        if not Path(path).is_file():
            raise FluentRewardError(f"{path}: not found (run `fluent-reward {stage}` or `dvc repro`)")
    doc = read_json_file(judgments, f"expected the judge stage's judgments ({_RERUN_JUDGE})")
    by_id = _judgment_scores_by_id(doc, Path(judgments), rubric)
    records, missing = [], []
    for row in iter_jsonl(validated):
        scores = by_id.get(str(row.get("id")))
        if scores is None:
            missing.append(row.get("id"))
            continue
        records.append({**row, "scores": scores, "overall": rubric.overall(scores)})
    # The judge exited 0 with these records unjudged only because judge.max_failure_ratio tolerates them.
    tolerated = bool(doc.get("failures_tolerated")) and set(missing) <= set(doc.get("failed") or [])
    if missing and (skip_unjudged or tolerated):
        log.warning("%d validated records have no judgment in %s; left out", len(missing), judgments)
    elif missing:
        raise FluentRewardError(
            f"{judgments}: {len(missing)} validated record(s) have no judgment (first: {missing[:5]}); "
            "rerun `fluent-reward judge`"
        )
    if not records:
        raise FluentRewardError(f"{validated}: no records to train on")
    return records


_RERUN_JUDGE = "rerun `fluent-reward judge`"


def _judgment_scores_by_id(doc: Any, judgments: Path, rubric: Rubric) -> dict[str, dict[str, float]]:
    """Every judgment's scores by record id, checked against the rubric (a damaged file is a clear error)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("judgments"), list):
        raise FluentRewardError(f'{judgments}: expected an object with a "judgments" list ({_RERUN_JUDGE})')
    dims = doc.get("dimensions") or rubric.names
    if list(dims) != rubric.names:
        raise FluentRewardError(
            f"{judgments}: judged on dimensions {list(dims)} but the rubric's dimensions are {rubric.names}; "
            + _RERUN_JUDGE
        )
    scale = doc.get("scale")
    if isinstance(scale, dict) and (scale.get("min"), scale.get("max")) != (rubric.scale.min, rubric.scale.max):
        raise FluentRewardError(
            f"{judgments}: judged on scale {scale} but rubric.scale is {rubric.scale.model_dump()}; {_RERUN_JUDGE}"
        )
    by_id = {}
    for number, entry in enumerate(doc["judgments"], start=1):
        where = f"{judgments}: judgment {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str | int) or isinstance(entry["id"], bool):
            raise FluentRewardError(f'{where}: expected an object with an "id" and "scores" ({_RERUN_JUDGE})')
        by_id[str(entry["id"])] = _checked_scores(f"{where} (id={entry['id']})", entry.get("scores"), rubric)
    return by_id


def _checked_scores(where: str, scores: Any, rubric: Rubric) -> dict[str, float]:
    lo, hi = rubric.scale.min, rubric.scale.max
    if not isinstance(scores, dict):
        raise FluentRewardError(f'{where}: "scores" must be an object with a score per dimension ({_RERUN_JUDGE})')
    for name in rubric.names:
        value = scores.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise FluentRewardError(
                f"{where}: score {name}={value!r} is not a number on the scale {lo}..{hi} ({_RERUN_JUDGE})"
            )
    return {name: float(scores[name]) for name in rubric.names}
