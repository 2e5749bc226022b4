"""The judge stage, ``run_judge``: read the validated records and the reference files, plan what still needs a
judgment, run it against the API (messages or batch mode) or only estimate it (dry run), and write the outputs.
Everything judged is in the cache before any error is raised."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fluent_reward.config import Params
from fluent_reward.errors import FluentRewardError, StageFailed
from fluent_reward.io import iter_jsonl, write_json
from fluent_reward.judge.batch import BatchLedger, run_batches
from fluent_reward.judge.cache import JudgeCache, exclusive_lock
from fluent_reward.judge.client import ClientFactory, Fatal, UnitFailed, client_kwargs
from fluent_reward.judge.context import JudgeContext, Run
from fluent_reward.judge.cost import Budget, Tally
from fluent_reward.judge.estimate import dry_run, local_estimate
from fluent_reward.judge.messages import run_messages
from fluent_reward.judge.outputs import JudgeSummary, assemble, judgments_document, metrics
from fluent_reward.judge.plan import Plan, make_plan
from fluent_reward.judge.progress import Progress
from fluent_reward.judge.reference import ReferenceIndex, load_reference

log = logging.getLogger(__name__)


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        raise FluentRewardError(f"{path}: validated records not found; run `fluent-reward validate` first")
    return list(iter_jsonl(path))


def run_judge(
    params: Params,
    *,
    dry_run: bool = False,
    client_factory: ClientFactory | None = None,
    show_progress: bool = False,
) -> JudgeSummary:
    """Judge every validated record; write data.judgments and data.judge_metrics.

    Args:
        params: the loaded settings (judge, rubric, data paths).
        dry_run: only estimate what judging the remaining records would cost; nothing is sent but free
            count_tokens requests, nothing is written.
        client_factory: builds the async client from keyword arguments (``api_key``, ``max_retries``,
            ``timeout``, ``middleware``, maybe ``base_url``); tests pass one with strict response validation.
        show_progress: draw a progress bar (the CLI does on a terminal).

    Returns:
        A JudgeSummary. Raises FluentRewardError (exit 2) for a missing key with records left, a bad reference
        file or an API refusal (401, 404, 400); StageFailed (exit 1) when the budget or judge.max_failures stopped
        the run. Every judgment obtained is in the cache before any of these is raised.
    """
    ctx = JudgeContext.build(params, client_factory, show_progress)
    records = _read_records(ctx.paths.validated)
    reference = load_reference(ctx.cfg.reference, ctx.rubric)
    if dry_run:
        cache = JudgeCache(ctx.paths.judge_cache)
        plan = make_plan(records, reference, cache.load(), ctx.prompt, ctx.cfg.samples)
        return JudgeSummary(status="dry_run", metrics={}, estimate=_estimate_only(ctx, plan, cache))
    with exclusive_lock(ctx.paths.judge_cache):
        cache = JudgeCache(ctx.paths.judge_cache)
        try:
            return _judge(ctx, records, reference, cache)
        finally:
            cache.close()


def _estimate_only(ctx: JudgeContext, plan: Plan, cache: JudgeCache) -> Any:
    estimate = dry_run(ctx, plan, cache.entries)
    log.info(
        "dry run: %d calls; messages $%.2f, batch $%.2f", estimate.calls, estimate.messages_usd, estimate.batch_usd
    )
    return estimate


def _refuse_without_key(ctx: JudgeContext, plan: Plan, cache: JudgeCache, ledger: BatchLedger) -> None:
    estimate = local_estimate(ctx, plan, cache.entries)
    dollars = estimate.batch_usd if ctx.cfg.mode == "batch" else estimate.messages_usd
    open_batches = len(ledger.open_batches())
    waiting = f" ({open_batches} batches submitted earlier wait to be collected)" if open_batches else ""
    raise FluentRewardError(
        f"{estimate.records_to_judge} records need judging{waiting}; estimated cost ${dollars:.2f}; set "
        "ANTHROPIC_API_KEY (environment or .env), or supply their judgments in judge.reference"
    )


def _judge(ctx: JudgeContext, records: list[dict[str, Any]], reference: ReferenceIndex, cache: JudgeCache) -> Any:
    plan = make_plan(records, reference, cache.load(), ctx.prompt, ctx.cfg.samples)
    ledger = BatchLedger(ctx.paths.judge_batches)
    needs_api = bool(plan.units) or ledger.has_work()
    if needs_api and ctx.api_key is None:
        _refuse_without_key(ctx, plan, cache, ledger)
    run = None
    if needs_api:
        log.info(
            "judging %d records (%d calls) with %s in %s mode; %d from reference, %d judgments cached",
            plan.records_to_judge(),
            len(plan.units),
            ctx.cfg.model,
            ctx.cfg.mode,
            len(plan.supplied),
            sum(len(k) for k in plan.keys.values()) - len(plan.units),
        )
        run = asyncio.run(_execute(ctx, cache, plan, ledger))
    return _finish(ctx, plan, cache, run)


async def _execute(ctx: JudgeContext, cache: JudgeCache, plan: Plan, ledger: BatchLedger) -> Run:
    """Run the plan's units against the API in the configured mode; the Run says what happened."""
    tally = Tally()
    client = ctx.client_factory(**client_kwargs(ctx.cfg, ctx.api_key or "", ctx.base_url, tally))
    async with client:
        with Progress(ctx.show_progress) as progress:
            factor = ctx.cfg.batch_discount if ctx.cfg.mode == "batch" else 1.0
            run = Run(ctx, cache, client, tally, Budget(ctx.cfg.max_budget_usd), progress, factor=factor)
            try:
                if ctx.cfg.mode == "batch":
                    await run_batches(run, plan.units, ledger)
                else:
                    if ledger.has_work():
                        await run_batches(run, [], ledger, submit=False)  # paid for: collect first
                    await run_messages(run, [u for u in plan.units if u.key not in cache.entries])
            except Fatal as exc:
                run.stop_fatal(str(exc))
            except UnitFailed as exc:  # a batch endpoint failing past every retry
                run.stop_reason = "api_unavailable"
                run.failures["*"] = str(exc)
            return run


def _finish(ctx: JudgeContext, plan: Plan, cache: JudgeCache, run: Run | None) -> JudgeSummary:
    """Write the outputs (judgments only when the run was not stopped) and raise if it was."""
    done = assemble(ctx, plan, cache.entries, run.judged if run is not None else set())
    status = (run.stop_reason if run is not None else None) or "complete"
    result = metrics(ctx, status, plan, done, run, cache.entries)
    write_json(ctx.paths.judge_metrics, result)
    counts = done.counts
    summary = (
        f"judge: {len(done.judgments)} of {len(plan.records)} records judged ({counts['judged_now']} now, "
        f"{counts['from_cache']} cached, {counts['from_reference'] + counts['from_import']} supplied, "
        f"{result['records_failed']} failed); {result['api_calls']} API calls, "
        f"${result['estimated_cost_usd']:.4f}"
    )
    if run is not None:
        _raise_if_stopped(run, status, len(done.missing), summary)
    # Both are stage outputs in dvc.yaml, so they exist after every successful run, even when nothing was sent.
    cache.touch()
    if not ctx.paths.judge_batches.exists():
        BatchLedger(ctx.paths.judge_batches).save()
    write_json(ctx.paths.judgments, judgments_document(ctx, done))
    log.info("%s -> %s", summary, ctx.paths.judgments)
    return JudgeSummary(status=status, metrics=result)


def _raise_if_stopped(run: Run, status: str, missing: int, summary: str) -> None:
    """A stopped run ends with an error; everything it obtained is already in the cache and the metrics."""
    cfg = run.cfg
    if run.fatal is not None:
        raise FluentRewardError(f"{run.fatal}\n{summary}; rerun to resume")
    if status == "api_unavailable":
        raise StageFailed(f"the Anthropic API stayed unavailable: {run.failures['*']}\n{summary}; rerun to resume")
    if status == "budget":
        raise StageFailed(
            f"stopped before exceeding judge.max_budget_usd=${cfg.max_budget_usd:g} (spent ${run.budget.spent:.4f}); "
            f"{missing} records still need judging: raise the budget and rerun\n{summary}"
        )
    if len(run.failures) > cfg.max_failures:
        raise StageFailed(
            f"{len(run.failures)} judgments failed (judge.max_failures={cfg.max_failures}); successes are cached: "
            f"rerun to retry the rest\n{summary}"
        )
