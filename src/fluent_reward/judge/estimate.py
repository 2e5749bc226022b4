"""The dry run: what judging the records neither supplied nor cached would cost, in both modes. Input tokens are
counted with ``messages.count_tokens`` (free, many records per request) when a key is set, else estimated locally;
output tokens come from earlier judgments with the same prompt, else from a stated assumption."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fluent_reward.errors import FluentRewardError
from fluent_reward.judge.client import api_message, client_kwargs, refusal_message
from fluent_reward.judge.context import JudgeContext
from fluent_reward.judge.cost import Tally, cost_usd
from fluent_reward.judge.plan import Plan
from fluent_reward.judge.prompt import CHARS_PER_TOKEN

log = logging.getLogger(__name__)

# Output estimate before any judgment has been seen: a one-or-two-sentence rationale plus JSON keys per dimension.
OUTPUT_TOKENS_PER_DIMENSION = 55
OUTPUT_TOKENS_OVERHEAD = 20
# Smallest prefix the API caches (Sonnet's threshold; some models need more): below it the estimate assumes no cache.
MIN_CACHEABLE_TOKENS = 1024
# count_tokens in dry-run: many user messages are counted in one request, up to this many characters.
COUNT_CHUNK_CHARS = 200_000


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


def _output_estimate(ctx: JudgeContext, cached: Mapping[str, dict[str, Any]]) -> tuple[float, str]:
    prompt = ctx.prompt
    seen = [
        e["usage"].get("output_tokens", 0) / (e["attempts"] if isinstance(e.get("attempts"), int) else 1)
        for e in cached.values()
        if e.get("prompt_version") == prompt.version and e.get("model") == prompt.model and "usage" in e
    ]
    if len(seen) >= 5:
        return sum(seen) / len(seen), f"mean of {len(seen)} earlier judgments with this prompt"
    per_call = OUTPUT_TOKENS_PER_DIMENSION * len(ctx.rubric.names) + OUTPUT_TOKENS_OVERHEAD
    return float(per_call), f"assumed {per_call} per call"


def estimate(ctx: JudgeContext, plan: Plan, totals: tuple[int, int], how: str, cached: Mapping) -> Estimate:
    """The Estimate for ``plan`` given (input tokens over all calls, cacheable prefix tokens per call)."""
    calls = len(plan.units)
    input_total, prefix = totals
    out_per_call, out_basis = _output_estimate(ctx, cached)
    output = round(out_per_call * calls)
    cacheable = prefix if prefix >= MIN_CACHEABLE_TOKENS and calls else 0
    cached_usage = {
        "input_tokens": input_total - cacheable * calls,
        "cache_creation_input_tokens": cacheable,
        "cache_read_input_tokens": cacheable * max(calls - 1, 0),
        "output_tokens": output,
    }
    uncached = {"input_tokens": input_total, "output_tokens": output}
    to_judge = plan.records_to_judge()
    return Estimate(
        records=len(plan.records),
        from_reference=len(plan.supplied),
        from_cache=len(plan.records) - len(plan.supplied) - to_judge,
        records_to_judge=to_judge,
        calls=calls,
        input_tokens=input_total,
        prefix_tokens=prefix,
        output_tokens=output,
        counted_by=how,
        output_basis=out_basis,
        messages_usd=cost_usd(cached_usage, ctx.price),
        batch_usd=cost_usd(cached_usage, ctx.price, ctx.cfg.batch_discount),
        batch_worst_usd=cost_usd(uncached, ctx.price, ctx.cfg.batch_discount),
        model=ctx.cfg.model,
    )


def local_totals(ctx: JudgeContext, plan: Plan) -> tuple[int, int]:
    """(input tokens over all calls, prefix tokens per call), estimated locally."""
    prefix = ctx.prompt.local_tokens()
    per_message = {key: ctx.prompt.local_tokens([{"content": msg}]) for key, msg in plan.messages.items()}
    return sum(per_message[u.key] for u in plan.units), prefix


def local_estimate(ctx: JudgeContext, plan: Plan, cached: Mapping, why: str = "") -> Estimate:
    how = f"local estimate, {CHARS_PER_TOKEN} characters per token" + (f"; {why}" if why else "")
    return estimate(ctx, plan, local_totals(ctx, plan), how, cached)


def _chunk_messages(plan: Plan) -> tuple[dict[str, int], list[list[str]]]:
    """(how often each distinct user message is sent, the messages in chunks of at most COUNT_CHUNK_CHARS)."""
    repeats: dict[str, int] = {}
    for unit in plan.units:
        repeats[unit.user_message] = repeats.get(unit.user_message, 0) + 1
    chunks: list[list[str]] = [[]]
    for message in repeats:
        if sum(len(m) for m in chunks[-1]) + len(message) > COUNT_CHUNK_CHARS and chunks[-1]:
            chunks.append([])
        chunks[-1].append(message)
    return repeats, [c for c in chunks if c]


async def _counted_totals(ctx: JudgeContext, client: Any, plan: Plan) -> tuple[int, int]:
    """Exact input tokens via count_tokens (free), counting many user messages per request.

    One request with a one-character message measures the fixed part of every call (tools, system, message
    framing); each chunk of messages joined into one user turn measures their own tokens.
    """

    async def count(text: str) -> int:
        request = ctx.prompt.request([{"role": "user", "content": text}])
        fields = {k: request[k] for k in ("model", "system", "tools", "tool_choice", "messages")}
        result = await client.messages.count_tokens(**fields)
        return int(result.input_tokens)

    fixed = await count(".")
    repeats, chunks = _chunk_messages(plan)
    semaphore = asyncio.Semaphore(ctx.cfg.max_concurrency)

    async def chunk_tokens(chunk: list[str]) -> int:
        async with semaphore:
            own = await count("\n".join(chunk)) - fixed
        # Tokens of the chunk, spread over its messages by length, times how often each is sent (samples).
        chars = sum(len(m) for m in chunk) or 1
        return round(sum(own * len(m) / chars * repeats[m] for m in chunk))

    own_tokens = sum(await asyncio.gather(*(chunk_tokens(c) for c in chunks)))
    return fixed * len(plan.units) + own_tokens, fixed


class _CountUnavailable(Exception):
    pass


async def _count_with_api(ctx: JudgeContext, plan: Plan) -> tuple[int, int]:
    """count_tokens through the SDK. A refusal of the key is the refusal a real run would get (exit 2); any other
    failure (an endpoint a gateway lacks, an outage) falls back to the local estimate."""
    import anthropic

    client = ctx.client_factory(**client_kwargs(ctx.cfg, ctx.api_key or "", ctx.base_url, Tally()))
    async with client:
        try:
            return await _counted_totals(ctx, client, plan)
        except anthropic.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise FluentRewardError(refusal_message(exc)) from None
            raise _CountUnavailable(api_message(exc)) from None
        except anthropic.APIError as exc:
            raise _CountUnavailable(f"{type(exc).__name__}: {exc}") from None


def dry_run(ctx: JudgeContext, plan: Plan, cached: Mapping) -> Estimate:
    """What judging ``plan.units`` would cost; sends nothing but free count_tokens requests."""
    if not plan.units:
        return estimate(ctx, plan, (0, 0), "nothing to count", cached)
    if ctx.api_key is None:
        return local_estimate(ctx, plan, cached, "set ANTHROPIC_API_KEY to count exactly")
    try:
        totals = asyncio.run(_count_with_api(ctx, plan))
    except _CountUnavailable as exc:
        log.warning("count_tokens unavailable (%s): using the local estimate", exc)
        return local_estimate(ctx, plan, cached, "count_tokens failed")
    return estimate(ctx, plan, totals, "messages.count_tokens", cached)
