"""The reward model as a TRL reward function (RLAIF): ``GRPOTrainer(reward_funcs=make_reward_function(scorer))``.

TRL calls a reward function as ``f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` and
expects one float per completion. Both of TRL's dataset formats are handled:

- **conversational**: a prompt is a list of messages (``{"role", "content"}``); the student's message is the LAST
  ``user`` turn, the earlier ``user`` / ``assistant`` turns become the context (``Student: ...`` / ``Tutor: ...``
  lines, oldest first; ``system`` messages are skipped); the completion is a list of ``assistant`` messages, joined.
- **plain**: a prompt is a string in this project's layout (``Tutor: ...`` / ``Student: ...`` lines, the last
  ``Student:`` turn being the message to answer, an optional trailing ``Tutor:`` cue), as ``fluent-reward pairs
  --format plain`` writes it; a prompt with no ``Student:`` line is taken whole as the student's message.

When the dataset has ``context`` and ``student_message`` columns, they are used as they are instead of parsing the
prompt.

An empty (or whitespace-only) completion, which a policy can produce by stopping at once, gets the bottom of the
judge's scale without a model call: the scorer refuses empty replies (as ``validate`` does), and a training loop must
not stop on one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fluent_reward.model import split_turns

log = logging.getLogger(__name__)

ROLE_PREFIX = {"user": "Student: ", "assistant": "Tutor: "}


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or the ``text`` parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def from_messages(messages: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """``(context, student_message)`` from a conversational prompt: the last user turn is the message."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise ValueError("conversational prompt has no 'user' message: nothing for the tutor to answer")
    lines = [
        ROLE_PREFIX[m["role"]] + message_text(m.get("content", "")).strip()
        for m in messages[:last_user]
        if m.get("role") in ROLE_PREFIX
    ]
    return "\n".join(lines), message_text(messages[last_user].get("content", "")).strip()


def from_plain(prompt: str) -> tuple[str, str]:
    """``(context, student_message)`` from a plain prompt (see the module docstring)."""
    turns = split_turns(prompt)
    if turns and turns[-1].rstrip() == "Tutor:":  # the generation cue written by `pairs --format plain`
        turns = turns[:-1]
    last_student = max((i for i, t in enumerate(turns) if t.startswith("Student:")), default=None)
    if last_student is None:
        return "", prompt.strip()
    return "\n".join(turns[:last_student]), turns[last_student][len("Student:") :].strip()


def completion_text(completion: Any) -> str:
    """A plain completion, or the joined text of the assistant messages of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence):
        return "\n".join(
            message_text(m.get("content", "")) for m in completion if m.get("role", "assistant") == "assistant"
        )
    raise ValueError(f"completion must be a string or a list of messages, got {type(completion).__name__}")


class TutorReward:
    """A TRL reward function backed by a ``RewardModelScorer``: ``(prompts, completions, **kwargs) -> list[float]``.

    Args:
        scorer: the scorer (tip: ``fast=True`` for CPU training loops).
        weights: rank by the weighted mean of the predicted dimensions with these weights instead of the overall head.
        center: subtract the scale's midpoint, so rewards are centred near 0 (GRPO normalises within groups anyway;
            other trainers may prefer centred rewards).
    """

    def __init__(self, scorer: Any, weights: Mapping[str, float] | None = None, center: bool = False) -> None:
        self.scorer = scorer
        self.weights = dict(weights) if weights is not None else None
        low, high = scorer.scale
        self.offset = (low + high) / 2 if center else 0.0
        self.__name__ = "fluent_reward"  # TRL logs rewards under the function's name

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        context: Sequence[str] | None = None,
        student_message: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; they must match")
        if not completions:
            return []
        if context is not None and student_message is not None:
            contexts, students = list(context), list(student_message)
        else:
            parsed = [from_plain(p) if isinstance(p, str) else from_messages(p) for p in prompts]
            contexts, students = [c for c, _ in parsed], [s for _, s in parsed]
        responses = [completion_text(c) for c in completions]
        scored = [i for i, text in enumerate(responses) if text.strip()]
        rewards = [float(self.scorer.scale[0]) - self.offset] * len(responses)  # empty replies: the scale's bottom
        if scored:
            pick = [(contexts[i], responses[i], students[i]) for i in scored]
            values = self.scorer.score_batch(*map(list, zip(*pick, strict=True)), weights=self.weights)
            for i, value in zip(scored, values, strict=True):
                rewards[i] = float(value) - self.offset
        return rewards


def make_reward_function(scorer: Any, weights: Mapping[str, float] | None = None, center: bool = False) -> TutorReward:
    """The scorer as a TRL reward function; see ``TutorReward``.

    Example::

        from trl import GRPOConfig, GRPOTrainer
        reward = make_reward_function(RewardModelScorer(fast=True))
        trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=GRPOConfig(...), train_dataset=prompts)
    """
    return TutorReward(scorer, weights=weights, center=center)
