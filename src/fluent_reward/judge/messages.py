"""Messages mode: ``judge.max_concurrency`` concurrent requests; each record's judgment is validated, re-asked
when invalid, and cached the moment it is valid. The first call runs alone so that only it writes the prompt
cache."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from fluent_reward.judge.client import Fatal, UnitFailed, call
from fluent_reward.judge.context import Run
from fluent_reward.judge.cost import USAGE_FIELDS, OutOfBudget, add_usage, usage_of
from fluent_reward.judge.plan import Unit
from fluent_reward.judge.reply import InvalidOutput, parse_judgment, reask_messages

log = logging.getLogger(__name__)


async def run_messages(run: Run, units: list[Unit]) -> None:
    """Judge ``units`` concurrently (the first alone), until done or the run stops."""
    import asyncio

    queue = deque(units)
    done = 0

    async def judge_next() -> None:
        nonlocal done
        unit = queue.popleft()
        await judge_unit(run, unit)
        done += 1
        run.progress.update(done, run.tally)

    run.progress.begin(f"judging ({run.ctx.prompt.model})", len(units))
    # One call alone first: the API caches the prompt only once a response exists, so concurrent first calls
    # would each pay the cache write.
    if queue:
        await judge_next()

    async def worker() -> None:
        while queue and not run.stopping:
            await judge_next()

    await asyncio.gather(*(worker() for _ in range(min(run.cfg.max_concurrency, len(queue)))))


async def _ask(run: Run, unit: Unit, messages: list[dict[str, Any]], total: dict[str, int]) -> Any:
    """One call within the budget; its usage is accounted and added to ``total``. OutOfBudget if it cannot fit."""
    reservation = run.upper_bound(messages)
    await run.budget.reserve(reservation)
    spent = 0.0
    try:
        from anthropic.types import Message

        request = run.ctx.prompt.request(messages)
        what = f"record {unit.record_id}"
        create = run.client.messages.create
        message = await call(run, what, lambda: create(**request), expect=Message, record_level=True)
        usage = usage_of(message.usage, f"record {unit.record_id}")
        spent = run.account(usage)
        add_usage(total, usage)
        return message
    finally:
        await run.budget.settle(reservation, spent)


async def judge_unit(run: Run, unit: Unit) -> None:
    """Obtain one valid judgment (re-asking on invalid output) and cache it; record a failure otherwise."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": unit.user_message}]
    total: dict[str, int] = dict.fromkeys(USAGE_FIELDS, 0)
    retries = run.cfg.invalid_output_retries
    problem = ""
    for attempt in range(retries + 1):
        try:
            message = await _ask(run, unit, messages, total)
            parsed = parse_judgment(message, run.ctx.rubric)
        except InvalidOutput as exc:
            run.tally.invalid_outputs += 1
            problem = str(exc)
            verdict = "asking again" if attempt < retries else "giving up"
            log.warning("record %s: invalid judgment (%s); %s", unit.record_id, problem, verdict)
            messages = reask_messages(unit.user_message, message, problem, run.ctx.rubric)
            continue
        except OutOfBudget:
            run.stop_reason = run.stop_reason or "budget"
            return
        except UnitFailed as exc:
            run.fail(unit.key, unit.record_id, str(exc))
            return
        except Fatal as exc:
            run.stop_fatal(exc)
            return
        extra = {"message_id": message.id, "attempts": attempt + 1}
        run.store(unit.key, unit.record_id, unit.sample, parsed, total, extra)
        return
    run.fail(unit.key, unit.record_id, f"invalid output after {retries + 1} attempts: {problem}")
