"""Judgments supplied by file (every ``*.json`` / ``*.jsonl`` in ``judge.reference_dir``): finding, reading and
checking them, and looking a record up by its content (the three texts) or by its id. Records they cover are never
sent to the API. The folder is a dependency of the judge stage in dvc.yaml, so editing a label re-runs the judge."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluent_reward.config import Rubric
from fluent_reward.errors import FluentRewardError
from fluent_reward.io import read_json, stable_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Supplied:
    """A judgment supplied by a file (``judge.reference_dir``), used as it is."""

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


REFERENCE_SUFFIXES = (".json", ".jsonl")


def reference_files(folder: Path) -> list[Path]:
    """Every ``*.json`` and ``*.jsonl`` file in ``folder`` (not its subfolders), in name order."""
    if not folder.is_dir():
        raise FluentRewardError(
            f"{folder}: reference folder not found (judge.reference_dir); create it (it may be empty) or point "
            "judge.reference_dir at the folder of your reference judgments"
        )
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in REFERENCE_SUFFIXES)


def load_reference(paths: Sequence[Path], rubric: Rubric) -> ReferenceIndex:
    """Read and check every reference file; the first file (in name order) supplying a record wins.

    Raises FluentRewardError naming the file and the entry when one is unusable (a missing dimension, a score
    off the scale, no id and no content), so a bad import never turns into silent training targets.
    """
    index = ReferenceIndex()
    for path in paths:
        for key, by_content, supplied in _read_reference_file(Path(path), rubric):
            table = index.by_content if by_content else index.by_id
            table.setdefault(key, supplied)
    return index


def _read_jsonl(path: Path) -> dict[str, Any]:
    """A ``.jsonl`` reference file: one judgment per line, imported (it has no file-level fields)."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError as exc:
            raise FluentRewardError(f"{path}: line {number}: not valid JSON: {exc}") from None
    return {"source": "import", "judgments": entries}


def _read_document(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FluentRewardError(f"{path}: reference judgments file not found")
    try:
        data = _read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FluentRewardError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("judgments"), list):
        raise FluentRewardError(f'{path}: expected an object with a "judgments" list (see docs/ARCHITECTURE.md)')
    return data


def _read_reference_file(path: Path, rubric: Rubric) -> Iterator[tuple[str, bool, Supplied]]:
    data = _read_document(path)
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
