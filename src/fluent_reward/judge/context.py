"""The two objects every part of the judge passes around instead of long argument lists:

- ``JudgeContext``: the settings and environment of one invocation (config, rubric, paths, prompt, price, API key
  and base URL, the client factory, whether to draw progress). Immutable.
- ``Run``: the state of the part that talks to the API (the cache, the client, what was spent and judged, what
  failed, why the run stopped), with the bookkeeping every mode shares (``account``, ``store``, ``fail``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fluent_reward.config import DataPaths, JudgeConfig, Params, Rubric
from fluent_reward.judge.cache import JudgeCache
from fluent_reward.judge.client import (
    ClientFactory,
    Fatal,
    Gate,
    Unreachable,
    default_client_factory,
    resolve_api_settings,
)
from fluent_reward.judge.cost import Budget, Rates, Tally, add_usage, cost_usd
from fluent_reward.judge.progress import Progress
from fluent_reward.judge.prompt import Prompt

log = logging.getLogger(__name__)

# Judgments failing one after another with no success between them: the API is down (529s for ever, a hung server,
# every reply invalid). The run stops after this many in a row (or twice max_concurrency, if more), keeping
# what it judged, instead of spending a bounded wait on every remaining record.
CONSECUTIVE_FAILURES_LIMIT = 10


@dataclass(frozen=True)
class JudgeContext:
    """The settings and environment of one judge invocation."""

    cfg: JudgeConfig
    rubric: Rubric
    paths: DataPaths
    prompt: Prompt
    price: Rates  # judge.prices of the model, cache writes at the prompt_cache_ttl's price
    api_key: str | None
    base_url: str | None
    client_factory: ClientFactory
    show_progress: bool = False

    @classmethod
    def build(
        cls, params: Params, client_factory: ClientFactory | None = None, show_progress: bool = False
    ) -> JudgeContext:
        key, base_url = resolve_api_settings()
        return cls(
            cfg=params.judge,
            rubric=params.rubric,
            paths=params.data,
            prompt=Prompt.build(params.rubric, params.judge),
            price=Rates.of(params.judge.price(), params.judge.prompt_cache_ttl),
            api_key=key,
            base_url=base_url,
            client_factory=client_factory or default_client_factory,
            show_progress=show_progress,
        )


@dataclass
class Run:
    """The state of one run against the API (messages or batch mode)."""

    ctx: JudgeContext
    cache: JudgeCache
    client: Any
    tally: Tally
    budget: Budget
    progress: Progress
    factor: float = 1.0  # price factor: 1 for messages, judge.batch_discount for batches
    gate: Gate = field(default_factory=Gate)
    judged: set[str] = field(default_factory=set)  # keys judged by this run
    failures: dict[str, str] = field(default_factory=dict)  # key -> why
    stop_reason: str | None = None
    fatal: str | None = None
    reached: bool = False  # the API has answered at least once in this run
    failures_in_a_row: int = 0

    @property
    def cfg(self) -> JudgeConfig:
        return self.ctx.cfg

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def account(self, usage: Mapping[str, int], factor: float | None = None) -> float:
        add_usage(self.tally.usage, usage)
        cost = cost_usd(usage, self.ctx.price, self.factor if factor is None else factor)
        self.tally.cost_usd += cost
        return cost

    def upper_bound(self, messages: Sequence[Mapping[str, Any]]) -> float:
        """The most one call can cost: a generous input estimate at the dearer input price, max_tokens out."""
        price = self.ctx.price
        tokens = math.ceil(self.ctx.prompt.local_tokens(messages) * 1.25)
        dearest = max(price.input, price.cache_write)
        return self.factor * (tokens * dearest + self.cfg.max_tokens * price.output) / 1e6

    def store(self, unit_key: str, record_id: str, sample: int, parsed: tuple, usage: dict, extra: dict) -> None:
        scores, rationales = parsed
        entry = {
            "key": unit_key,
            "record_id": record_id,
            "sample": sample,
            "model": self.ctx.prompt.model,
            "prompt_version": self.ctx.prompt.version,
            "scores": scores,
            "rationales": rationales,
            "usage": usage,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        self.cache.append(entry)
        self.judged.add(unit_key)
        self.failures_in_a_row = 0

    def fail(self, key: str, record_id: str, reason: str) -> None:
        """A judgment that could not be obtained: named in the metrics, never cached, retried by a rerun."""
        self.failures[key] = reason
        self.failures_in_a_row += 1
        log.warning("record %s: judgment failed: %s", record_id, reason)
        limit = max(CONSECUTIVE_FAILURES_LIMIT, 2 * self.cfg.max_concurrency)
        if self.failures_in_a_row >= limit and not self.stopping:
            self.stop_reason = "too_many_failures"
            self.fatal = f"{limit} judgments failed in a row, the last one with: {reason}; stopped early"
            log.error("%s", self.fatal)

    def stop_fatal(self, exc: Fatal) -> None:
        """A refusal of every request (or no API at all): stop; what was judged stays cached."""
        if self.fatal is None:
            self.fatal = str(exc)
            self.stop_reason = "api_unreachable" if isinstance(exc, Unreachable) else "api_error"
