"""What a run costs: the billed token counts of a reply (``usage_of``), dollars from ``judge.prices``
(``cost_usd``), the run's ``Tally`` for the metrics, and the ``Budget`` that stops a run before it exceeds
``judge.max_budget_usd``."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fluent_reward.config import Price

log = logging.getLogger(__name__)

USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# No single call can bill more tokens than this (the largest context window is 1M tokens, output is far less): a
# larger or negative count from a server or gateway is a bug there, never a cost to add to the run.
MAX_TOKENS_PER_CALL = 2_000_000


def usage_of(usage: Any, what: str = "a reply") -> dict[str, int]:
    """The four billed token counts of an SDK ``Usage`` (missing cache fields are 0). A negative, absurd or
    non-numeric count is clamped into 0..MAX_TOKENS_PER_CALL with a warning, so the cost can never go negative."""
    counts = {}
    for name in USAGE_FIELDS:
        raw = getattr(usage, name, 0) or 0
        number = isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw)
        value = int(raw) if number else -1
        if not 0 <= value <= MAX_TOKENS_PER_CALL:
            clamped = min(max(value, 0), MAX_TOKENS_PER_CALL)
            log.warning("%s: the API reported usage %s=%r; counted as %d", what, name, raw, clamped)
            value = clamped
        counts[name] = value
    return counts


@dataclass(frozen=True)
class Rates:
    """USD per million tokens for one run: ``judge.prices`` of the model, with the cache-write price of the
    configured ``prompt_cache_ttl`` (1-hour writes cost more than 5-minute ones)."""

    input: float
    output: float
    cache_write: float
    cache_read: float

    @classmethod
    def of(cls, price: Price, ttl: str) -> Rates:
        return cls(price.input, price.output, price.cache_write(ttl), price.cache_read)


def cost_usd(usage: Mapping[str, int], price: Rates, factor: float = 1.0) -> float:
    """Dollars for ``usage`` at ``price`` (USD per million tokens); ``factor`` is the batch discount."""
    dollars = (
        usage.get("input_tokens", 0) * price.input
        + usage.get("output_tokens", 0) * price.output
        + usage.get("cache_creation_input_tokens", 0) * price.cache_write
        + usage.get("cache_read_input_tokens", 0) * price.cache_read
    )
    return factor * dollars / 1e6


def add_usage(total: dict[str, int], usage: Mapping[str, int]) -> None:
    for name in USAGE_FIELDS:
        total[name] = total.get(name, 0) + int(usage.get(name, 0))


@dataclass
class Tally:
    """What this run sent and spent (metrics/judge.json)."""

    api_calls: int = 0
    retries: int = 0
    invalid_outputs: int = 0
    batches_submitted: int = 0
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USAGE_FIELDS, 0))
    cost_usd: float = 0.0


class OutOfBudget(Exception):
    """No call fits in what is left of judge.max_budget_usd, and none in flight can free any of it."""


class Budget:
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
        """Wait until ``amount`` fits (calls in flight may cost less than reserved); OutOfBudget if it never can."""
        async with self._changed:
            while not self.fits(amount):
                if self.holds == 0:
                    raise OutOfBudget
                await self._changed.wait()
            self.hold(amount)

    async def settle(self, reserved: float, spent: float) -> None:
        async with self._changed:
            self.release(reserved, spent)
            self._changed.notify_all()
