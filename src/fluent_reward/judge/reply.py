"""Reading the judge's reply: ``parse_judgment`` validates it against the rubric (never a made-up or clipped
score) and ``reask_messages`` builds the conversation that asks again, naming the problem."""

from __future__ import annotations

from typing import Any

from fluent_reward.config import Rubric
from fluent_reward.rubric import TOOL_NAME


class InvalidOutput(ValueError):
    """The judge's reply is not a complete, valid judgment (the reason says what is wrong)."""


def score_problem(name: str, score: Any, lo: int, hi: int) -> str | None:
    """Why ``score`` is not a judge's score for dimension ``name`` (an integer from lo to hi), or None. Used for
    replies and for cache entries alike: a cached judgment is a training target too."""
    if isinstance(score, bool) or not isinstance(score, int | float) or not float(score).is_integer():
        return f"{name}.score: {score!r} is not an integer"
    if not lo <= score <= hi:
        return f"{name}.score: {score!r} is outside {lo}..{hi}"
    return None


def _check_dimension(name: str, item: Any, lo: int, hi: int) -> tuple[int | None, str | None, list[str]]:
    if not isinstance(item, dict):
        return None, None, [f"{name}: missing"]
    score, rationale = item.get("score"), item.get("rationale")
    problem = score_problem(name, score, lo, hi)
    problems = [problem] if problem else []
    good_score = None if problem else int(score)
    if not isinstance(rationale, str) or not rationale.strip():
        problems.append(f"{name}.rationale: missing")
        rationale = None
    return good_score, rationale.strip() if rationale else None, problems


def parse_judgment(message: Any, rubric: Rubric) -> tuple[dict[str, int], dict[str, str]]:
    """(scores, rationales) from a Messages API reply, or InvalidOutput: never a made-up or clipped score."""
    if getattr(message, "stop_reason", None) == "max_tokens":
        raise InvalidOutput("the reply was cut off at judge.max_tokens")
    content = getattr(message, "content", None) or []
    call = next((b for b in content if getattr(b, "type", None) == "tool_use" and b.name == TOOL_NAME), None)
    if call is None:
        raise InvalidOutput(f"the reply has no {TOOL_NAME} tool call")
    data = call.input if isinstance(call.input, dict) else {}
    scores: dict[str, int] = {}
    rationales: dict[str, str] = {}
    problems: list[str] = []
    for name in rubric.names:
        score, rationale, found = _check_dimension(name, data.get(name), rubric.scale.min, rubric.scale.max)
        problems += found
        if score is not None:
            scores[name] = score
        if rationale is not None:
            rationales[name] = rationale
    if problems:
        raise InvalidOutput("; ".join(problems))
    return scores, rationales


def reask_messages(user_message: str, message: Any, problem: str, rubric: Rubric) -> list[dict[str, Any]]:
    """The conversation for a re-ask: the invalid tool call answered by an error result naming the problem.

    A reply with no usable tool call (text only, or cut off) is simply asked again.
    """
    first = [{"role": "user", "content": user_message}]
    call = next((b for b in getattr(message, "content", None) or [] if getattr(b, "type", None) == "tool_use"), None)
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
