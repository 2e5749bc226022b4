"""DPO preference pairs in TRL's format, from the judge's scores or from the reward model's.

Every pair compares two replies to the SAME turn (same ``group_id``): never across contexts, where a score gap says
nothing about which reply is better. A pair is kept when the two overall scores differ by at least ``min_gap``; the
higher-scored reply is ``chosen``. Output rows (JSONL), loadable with ``datasets.load_dataset("json", ...)`` and used
as they are by ``trl.DPOTrainer`` (extra columns are dropped by its ``remove_unused_columns``):

- ``format="plain"``: ``prompt`` is the conversation as ``Tutor: ...`` / ``Student: ...`` lines ending with a
  ``Tutor:`` cue; ``chosen`` / ``rejected`` are the replies, each starting with a space;
- ``format="conversational"``: ``prompt`` is a list of messages (student turns ``user``, tutor turns ``assistant``,
  an optional ``system`` first); ``chosen`` / ``rejected`` are one ``assistant`` message each. Most conversations
  start with the tutor, and strict chat templates reject a prompt whose first turn is the assistant's: with
  ``user_first="system"`` the tutor turns before the first student turn are folded into the system message, with
  ``user_first="user"`` into the first user message, so every prompt starts with ``system`` or ``user``;

plus ``group_id``, ``chosen_id``, ``rejected_id``, ``score_chosen``, ``score_rejected`` and ``margin`` (their gap,
which TRL's ``RewardTrainer`` uses as a margin in its loss). Order is deterministic: groups in order of first
appearance, pairs within a group in record order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fluent_reward.config import Rubric
from fluent_reward.data import load_judged_records
from fluent_reward.errors import FluentRewardError
from fluent_reward.io import atomic_open, write_json
from fluent_reward.model import split_turns

log = logging.getLogger(__name__)

Format = Literal["plain", "conversational"]
Strategy = Literal["all", "best-vs-rest"]
UserFirst = Literal["system", "user"] | None
FORMATS = ("plain", "conversational")
STRATEGIES = ("all", "best-vs-rest")
USER_FIRST = ("system", "user")
EARLIER_TUTOR = "Earlier in this conversation, the tutor said:"


@dataclass(frozen=True)
class Candidate:
    """One scored reply: the record's text and its overall score (judge's or model's)."""

    id: str
    group_id: str
    context: str
    student_message: str
    tutor_response: str
    overall: float


@dataclass
class GroupSummary:
    group_id: str
    candidates: int = 0
    pairs: int = 0
    below_gap: int = 0
    gaps: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id,
            "candidates": self.candidates,
            "pairs": self.pairs,
            "skipped_below_min_gap": self.below_gap,
            "mean_gap": round(sum(self.gaps) / len(self.gaps), 4) if self.gaps else None,
        }


# ----------------------------------------------------------------------------------------------------------------
# Formatting


def plain_prompt(context: str, student_message: str) -> str:
    """The conversation so far as turn lines, ending with the ``Tutor:`` cue the reply continues."""
    turns = split_turns(context)
    return "\n".join([*turns, f"Student: {student_message.strip()}", "Tutor:"])


def conversational_prompt(
    context: str, student_message: str, system_prompt: str | None = None, user_first: UserFirst = None
) -> list[dict[str, str]]:
    """The conversation so far as chat messages: ``Student:`` turns are ``user``, ``Tutor:`` turns ``assistant``.

    Consecutive turns of the same role are merged (chat templates expect alternating roles). ``user_first``:
    fold the tutor turns before the first student turn into the system message (``"system"``) or into the first
    user message (``"user"``), under the line ``EARLIER_TUTOR``, so that the prompt starts with ``system`` / ``user``.
    """
    if user_first not in (None, *USER_FIRST):
        raise ValueError(f"user_first must be one of {list(USER_FIRST)} or None, got {user_first!r}")
    messages: list[dict[str, str]] = []
    for turn in [*split_turns(context), f"Student: {student_message.strip()}"]:
        if turn.startswith("Student:"):
            role, text = "user", turn[len("Student:") :].strip()
        elif turn.startswith("Tutor:"):
            role, text = "assistant", turn[len("Tutor:") :].strip()
        else:  # context text without a turn prefix: shown to the model as earlier tutor-side context
            role, text = "assistant", turn.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    system = system_prompt or ""
    if user_first and messages[0]["role"] == "assistant":
        earlier = f"{EARLIER_TUTOR}\n{messages.pop(0)['content']}"
        if user_first == "system":
            system = f"{system}\n\n{earlier}" if system else earlier
        else:
            messages[0]["content"] = f"{earlier}\n\n{messages[0]['content']}"
    return ([{"role": "system", "content": system}] if system else []) + messages


def make_row(
    chosen: Candidate,
    rejected: Candidate,
    fmt: Format,
    system_prompt: str | None = None,
    user_first: UserFirst = None,
) -> dict[str, Any]:
    if fmt == "plain":
        row: dict[str, Any] = {
            "prompt": plain_prompt(chosen.context, chosen.student_message),
            "chosen": " " + chosen.tutor_response.strip(),
            "rejected": " " + rejected.tutor_response.strip(),
        }
    elif fmt == "conversational":
        row = {
            "prompt": conversational_prompt(chosen.context, chosen.student_message, system_prompt, user_first),
            "chosen": [{"role": "assistant", "content": chosen.tutor_response.strip()}],
            "rejected": [{"role": "assistant", "content": rejected.tutor_response.strip()}],
        }
    else:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    row.update(
        group_id=chosen.group_id,
        chosen_id=chosen.id,
        rejected_id=rejected.id,
        score_chosen=round(chosen.overall, 4),
        score_rejected=round(rejected.overall, 4),
        margin=round(chosen.overall - rejected.overall, 4),
    )
    return row


# ----------------------------------------------------------------------------------------------------------------
# Pairing


def build_pairs(
    candidates: Iterable[Candidate],
    min_gap: float,
    fmt: Format = "plain",
    strategy: Strategy = "all",
    system_prompt: str | None = None,
    user_first: UserFirst = None,
) -> tuple[list[dict[str, Any]], list[GroupSummary]]:
    """Preference pairs within each group, and a summary per group.

    ``strategy="all"``: every two replies of a group whose scores differ by ``>= min_gap``; ``"best-vs-rest"``: the
    group's best reply (first one on ties) against each other reply ``min_gap`` below it (one pair per rejected
    reply, so a group with many candidates does not dominate the dataset quadratically).
    """
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    groups: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.group_id, []).append(candidate)
    rows: list[dict[str, Any]] = []
    summaries: list[GroupSummary] = []
    for group_id, members in groups.items():
        summary = GroupSummary(group_id, candidates=len(members))
        for a, b in _pairings(members, strategy):
            gap = abs(a.overall - b.overall)
            # a zero gap is never a preference, whatever min_gap says
            if gap < min_gap or gap == 0:
                summary.below_gap += 1
                continue
            chosen, rejected = (a, b) if a.overall > b.overall else (b, a)
            rows.append(make_row(chosen, rejected, fmt, system_prompt, user_first))
            summary.pairs += 1
            summary.gaps.append(gap)
        summaries.append(summary)
    return rows, summaries


def _pairings(members: Sequence[Candidate], strategy: Strategy) -> Iterable[tuple[Candidate, Candidate]]:
    if strategy == "all":
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                yield members[i], members[j]
        return
    best = max(range(len(members)), key=lambda i: (members[i].overall, -i))
    for i, other in enumerate(members):
        if i != best:
            yield members[best], other


# ----------------------------------------------------------------------------------------------------------------
# Sources


def judged_candidates(validated: Path, judgments: Path, rubric: Rubric) -> list[Candidate]:
    """The validated records with the judge's overall (``rubric.overall`` of its dimension scores).

    Records without a judgment are skipped with a warning (the judge may have failed on a few); judgments made on
    other dimensions or another scale than the rubric's are an error.
    """
    records = load_judged_records(validated, judgments, rubric, skip_unjudged=True)
    return [_candidate(row, row["overall"]) for row in records]


def model_candidates(source: Path, scorer: Any, cfg: Any, show_progress: bool = False) -> list[Candidate]:
    """The records of an input file, read through the validator as ``validate`` and ``score`` read it, scored by
    the reward model's overall head.

    With ``cfg.on_error == "fail"`` any invalid record is an error listing the problems (nothing is written); with
    ``drop`` invalid records are skipped, each reported in a warning.
    """
    from fluent_reward.data import problem_summary, validate_file

    rows, checks = validate_file(source, cfg)
    rows = list(rows)
    if (cfg.on_error == "fail" and checks.problems) or not rows:
        raise FluentRewardError(problem_summary(source, checks, cfg))
    for problem in checks.problems[: cfg.max_problems_shown]:
        log.warning("%s (skipped)", problem)
    scores = scorer.score_batch(
        [r["context"] for r in rows],
        [r["tutor_response"] for r in rows],
        [r["student_message"] for r in rows],
        show_progress=show_progress,
    )
    return [_candidate(row, score) for row, score in zip(rows, scores, strict=True)]


def _candidate(row: dict[str, Any], overall: float) -> Candidate:
    return Candidate(
        id=str(row["id"]),
        group_id=str(row["group_id"]),
        context=row["context"],
        student_message=row["student_message"],
        tutor_response=row["tutor_response"],
        overall=float(overall),
    )


# ----------------------------------------------------------------------------------------------------------------
# The command


def summary_path(output: Path) -> Path:
    """Where the per-group summary goes: beside the pairs, ``<name>.summary.json``."""
    return output.with_name(output.name.removesuffix(".jsonl") + ".summary.json")


def write_pairs(
    candidates: Sequence[Candidate],
    output: Path,
    min_gap: float,
    fmt: Format,
    strategy: Strategy = "all",
    system_prompt: str | None = None,
    source: str = "judgments",
    user_first: UserFirst = None,
) -> dict[str, Any]:
    """Build the pairs, write them (JSONL, atomically) and their summary; return the summary."""
    rows, groups = build_pairs(candidates, min_gap, fmt, strategy, system_prompt, user_first)
    with atomic_open(output) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {
        "source": source,
        "format": fmt,
        "strategy": strategy,
        "user_first": user_first,
        "min_gap": min_gap,
        "candidates": len(candidates),
        "groups": len(groups),
        "groups_with_pairs": sum(1 for g in groups if g.pairs),
        "pairs": len(rows),
        "per_group": [g.as_dict() for g in groups],
    }
    write_json(summary_path(output), summary)
    log.info(
        "%d DPO pairs (%s, min gap %.2f) from %d candidates in %d groups (%d with pairs) -> %s",
        len(rows),
        fmt,
        min_gap,
        len(candidates),
        len(groups),
        summary["groups_with_pairs"],
        output,
    )
    if not rows:
        log.warning("no pairs: no two replies of the same group differ by at least %.2f", min_gap)
    return summary
