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
from fluent_reward.judge.estimate import Estimate, dry_run, local_estimate
from fluent_reward.judge.messages import run_messages
from fluent_reward.judge.outputs import (
    Assembled,
    JudgeSummary,
    assemble,
    failure_ratio,
    judgments_document,
    metrics,
)
from fluent_reward.judge.plan import Plan, make_plan
from fluent_reward.judge.progress import Progress
from fluent_reward.judge.reference import ReferenceIndex, load_reference, reference_files
from fluent_reward.rubric import require_anchors

log = logging.getLogger(__name__)


REQUIRED_FIELDS = ("id", "group_id", "context", "student_message", "tutor_response")


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The validated records; a damaged file is named with its line, never a traceback."""
    if not Path(path).is_file():
        raise FluentRewardError(f"{path}: validated records not found; run `fluent-reward validate` first")
    try:
        records = list(iter_jsonl(path))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FluentRewardError(f"{path}: not a validated JSONL file ({exc}); rerun `fluent-reward validate`") from None
    for number, record in enumerate(records, start=1):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(record, dict) or not isinstance(record.get(f), str)]
        if missing:
            raise FluentRewardError(
                f"{path}: record {number}: no text in {', '.join(missing)}; rerun `fluent-reward validate`"
            )
    return records


def _check_outputs(ctx: JudgeContext) -> None:
    """Every path the stage writes must be a file (or not exist yet): a folder there is named, not a traceback."""
    paths = ctx.paths
    for name in ("judgments", "judge_metrics", "judge_cache", "judge_batches"):
        path = getattr(paths, name)
        if path.exists() and not path.is_file():
            raise FluentRewardError(f"{path}: data.{name} must be a file, but it is a folder; move it away")


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
        file, an API refusal (401, 403, 404), an unreachable API, or records left without a judgment beyond
        judge.max_failure_ratio; StageFailed (exit 1) when judge.max_budget_usd stopped the run. Every judgment
        obtained is in the cache, and the outputs are written for it, before any of these is raised.
    """
    ctx = JudgeContext.build(params, client_factory, show_progress)
    records = _read_records(ctx.paths.validated)
    reference = load_reference(reference_files(ctx.cfg.reference_dir), ctx.rubric)
    if dry_run:
        cache = JudgeCache(ctx.paths.judge_cache)
        plan = make_plan(records, reference, cache.load(ctx.rubric, ctx.prompt.version), ctx.prompt, ctx.cfg.samples)
        require_anchors(ctx.rubric, plan.records_to_judge())
        return JudgeSummary(status="dry_run", metrics={}, estimate=_estimate_only(ctx, plan, cache))
    _check_outputs(ctx)
    try:
        with exclusive_lock(ctx.paths.judge_cache):
            cache = JudgeCache(ctx.paths.judge_cache)
            try:
                return _judge(ctx, records, reference, cache)
            finally:
                cache.close()
    except OSError as exc:  # disk full, permissions: one line; every judgment written before is in the cache
        where = exc.filename or ctx.paths.judge_cache
        raise FluentRewardError(f"{where}: cannot write ({exc.strerror or exc}); what was judged is cached") from None


def _estimate_only(ctx: JudgeContext, plan: Plan, cache: JudgeCache) -> Estimate:
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
        "ANTHROPIC_API_KEY (environment or .env), or supply their judgments in judge.reference_dir"
    )


def _judge(
    ctx: JudgeContext, records: list[dict[str, Any]], reference: ReferenceIndex, cache: JudgeCache
) -> JudgeSummary:
    plan = make_plan(records, reference, cache.load(ctx.rubric, ctx.prompt.version), ctx.prompt, ctx.cfg.samples)
    require_anchors(ctx.rubric, plan.records_to_judge())
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
                run.stop_fatal(exc)
            except UnitFailed as exc:  # a batch endpoint failing past every retry
                run.stop_reason = "api_unavailable"
                run.failures["*"] = str(exc)
            return run


def _status(ctx: JudgeContext, plan: Plan, done: Assembled, run: Run | None) -> str:
    """Why the run ended: a stop reason, else complete, failures_tolerated (within judge.max_failure_ratio) or
    failed."""
    if run is not None and run.stop_reason is not None:
        return run.stop_reason
    if not done.missing:
        return "complete"
    return "failures_tolerated" if failure_ratio(plan, done) <= ctx.cfg.max_failure_ratio else "failed"


def _finish(ctx: JudgeContext, plan: Plan, cache: JudgeCache, run: Run | None) -> JudgeSummary:
    """Write every output for what was judged (whatever happened), then raise if records were left unjudged
    beyond what judge.max_failure_ratio tolerates, so DVC never records an incomplete run as done."""
    done = assemble(ctx, plan, cache.entries, run.judged if run is not None else set())
    status = _status(ctx, plan, done, run)
    result = metrics(ctx, status, plan, done, run, cache.entries)
    write_json(ctx.paths.judge_metrics, result)
    # Both are stage outputs in dvc.yaml, so they exist after every run, even when nothing was sent.
    cache.touch()
    if not ctx.paths.judge_batches.exists():
        BatchLedger(ctx.paths.judge_batches).save()
    write_json(ctx.paths.judgments, judgments_document(ctx, done, tolerated=status == "failures_tolerated"))
    counts = done.counts
    log.info(
        "judge: %d of %d records judged (%d now, %d cached, %d supplied, %d failed); %d API calls, $%.4f -> %s",
        len(done.judgments),
        len(plan.records),
        counts["judged_now"],
        counts["from_cache"],
        counts["from_reference"] + counts["from_import"],
        result["records_failed"],
        result["api_calls"],
        result["estimated_cost_usd"],
        ctx.paths.judgments,
    )
    if status == "failures_tolerated":
        log.warning(
            "%s; tolerated by judge.max_failure_ratio=%g", _left_out(plan, done, run), ctx.cfg.max_failure_ratio
        )
    elif status != "complete":
        _raise(ctx, plan, done, run, status)
    return JudgeSummary(status=status, metrics=result)


def _left_out(plan: Plan, done: Assembled, run: Run | None) -> str:
    """``3 of 12 records have no judgment (r0003, r0004, r0005; 500 api_error: ...)``: what and why, one line."""
    first = ", ".join(done.missing[:5]) + (", ..." if len(done.missing) > 5 else "")
    reasons = sorted(set(run.failures.values())) if run is not None else []
    why = (
        f"; {reasons[0]}" + (f" (and {len(reasons) - 1} other reasons)" if len(reasons) > 1 else "") if reasons else ""
    )
    return f"{len(done.missing)} of {len(plan.records)} records have no judgment ({first}{why})"


def _raise(ctx: JudgeContext, plan: Plan, done: Assembled, run: Run | None, status: str) -> None:
    """One line saying what stopped the run or which records are missing; everything judged is cached and written."""
    cfg = ctx.cfg
    resume = "what was judged is cached and written; rerun to judge only the rest"
    if status == "budget":
        assert run is not None
        raise StageFailed(
            f"stopped before exceeding judge.max_budget_usd=${cfg.max_budget_usd:g} (spent ${run.budget.spent:.4f}); "
            f"{len(done.missing)} records still need judging: raise the budget and rerun"
        )
    if run is not None and run.fatal is not None:
        raise FluentRewardError(f"{run.fatal}; {len(done.missing)} records have no judgment; {resume}")
    if status == "api_unavailable":
        assert run is not None
        raise FluentRewardError(f"the Anthropic API stayed unavailable: {run.failures['*']}; {resume}")
    allowed = int(cfg.max_failure_ratio * len(plan.records))
    raise FluentRewardError(
        f"{_left_out(plan, done, run)}; judge.max_failure_ratio={cfg.max_failure_ratio:g} tolerates {allowed}; {resume}"
    )
