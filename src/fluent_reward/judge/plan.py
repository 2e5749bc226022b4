"""The plan of a run: for every validated record, whether a file supplies its judgment, which cache keys it needs
(one per sample), and the ``Unit``s still to judge (neither supplied nor cached)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fluent_reward.judge.cache import judgment_key
from fluent_reward.judge.prompt import Prompt
from fluent_reward.judge.reference import ReferenceIndex, Supplied
from fluent_reward.rubric import render_user_message


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
