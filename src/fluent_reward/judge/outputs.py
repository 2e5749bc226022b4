"""What the stage writes: ``data.judgments`` (one entry per record, in the order of the validated file, built from
the reference files and the cache only) and ``data.judge_metrics`` (what was judged, paid, retried and failed),
plus the judge's test-retest agreement when ``judge.samples >= 2``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

from fluent_reward.config import Rubric
from fluent_reward.judge.context import JudgeContext, Run
from fluent_reward.judge.cost import Tally, add_usage
from fluent_reward.judge.plan import Plan
from fluent_reward.judge.reference import Supplied

if TYPE_CHECKING:
    from fluent_reward.judge.estimate import Estimate


@dataclass
class JudgeSummary:
    """What a run did; ``metrics`` is what went to data.judge_metrics."""

    status: str
    metrics: dict[str, Any]
    estimate: Estimate | None = None


@dataclass
class Assembled:
    """The judgments in file order, the records without one, and where each judgment came from."""

    judgments: list[dict[str, Any]]
    missing: list[str]
    counts: dict[str, int]


def assemble(ctx: JudgeContext, plan: Plan, cache: Mapping[str, dict[str, Any]], judged_now: set[str]) -> Assembled:
    """The judgments in the order of the validated file; records with a missing sample are left out and listed."""
    result = Assembled([], [], dict.fromkeys(("judged_now", "from_cache", "from_reference", "from_import"), 0))
    for record in plan.records:
        supplied = plan.supplied.get(record["id"])
        if supplied is not None:
            result.judgments.append(_supplied_judgment(record, supplied))
            result.counts[f"from_{supplied.source}"] += 1
            continue
        keys = plan.keys[record["id"]]
        entries = [cache.get(k) for k in keys]
        if any(e is None for e in entries):
            result.missing.append(record["id"])
            continue
        result.judgments.append(_claude_judgment(ctx, record, entries))
        result.counts["judged_now" if any(k in judged_now for k in keys) else "from_cache"] += 1
    return result


def _supplied_judgment(record: Mapping[str, Any], supplied: Supplied) -> dict[str, Any]:
    return {
        "id": record["id"],
        "group_id": record["group_id"],
        "scores": supplied.scores,
        "rationale": supplied.rationale,
        "source": supplied.source,
        "model": supplied.model,
        "prompt_version": supplied.prompt_version,
        "usage": {},
        "samples": supplied.samples,
    }


def _claude_judgment(ctx: JudgeContext, record: Mapping[str, Any], entries: list[Any]) -> dict[str, Any]:
    names = ctx.rubric.names
    usage: dict[str, int] = {}
    for entry in entries:
        add_usage(usage, entry.get("usage", {}))
    scores = {n: sum(e["scores"][n] for e in entries) / len(entries) for n in names}
    if len(entries) == 1:
        scores = {n: int(s) for n, s in scores.items()}
    rationales = entries[0].get("rationales", {})
    return {
        "id": record["id"],
        "group_id": record["group_id"],
        "scores": scores,
        "rationale": " ".join(f"{n}: {rationales[n]}" for n in names if n in rationales),
        "rationales": rationales,
        "source": "claude",
        "model": ctx.prompt.model,
        "prompt_version": ctx.prompt.version,
        "usage": usage,
        "samples": len(entries),
    }


def retest_agreement(plan: Plan, cache: Mapping[str, dict[str, Any]], rubric: Rubric) -> dict[str, Any] | None:
    """The judge's agreement with itself: Spearman between its samples of the same records (mean over pairs)."""
    samples = [[cache[k] for k in keys] for keys in plan.keys.values() if all(k in cache for k in keys)]
    if not samples or len(samples[0]) < 2 or len(samples) < 3:
        return None
    from scipy.stats import spearmanr

    def mean_rho(values: list[list[float]]) -> float | None:
        rhos = [
            spearmanr([v[i] for v in values], [v[j] for v in values])[0]
            for i, j in combinations(range(len(values[0])), 2)
        ]
        rhos = [r for r in rhos if r == r]  # constant columns give nan
        return round(float(sum(rhos) / len(rhos)), 4) if rhos else None

    overall = [[rubric.overall(e["scores"]) for e in entries] for entries in samples]
    return {
        "records": len(samples),
        "samples": len(samples[0]),
        "overall_spearman": mean_rho(overall),
        "dimensions_spearman": {n: mean_rho([[e["scores"][n] for e in es] for es in samples]) for n in rubric.names},
    }


def failed_records(plan: Plan, missing: list[str], run: Run | None) -> list[str]:
    """The records left without a judgment because one of their judgments failed in this run."""
    failures = run.failures if run is not None else {}
    return [rid for rid in missing if any(k in failures for k in plan.keys.get(rid, ()))]


def failure_ratio(plan: Plan, done: Assembled) -> float:
    """The share of the validated records left without a judgment."""
    return len(done.missing) / len(plan.records) if plan.records else 0.0


def metrics(
    ctx: JudgeContext, status: str, plan: Plan, done: Assembled, run: Run | None, cache: Mapping[str, Any]
) -> dict[str, Any]:
    """The content of data.judge_metrics (``cache``: every judgment held, for the test-retest agreement)."""
    tally = run.tally if run is not None else Tally()
    failures = run.failures if run is not None else {}
    failed = failed_records(plan, done.missing, run)
    result: dict[str, Any] = {
        "status": status,
        "mode": ctx.cfg.mode,
        "model": ctx.cfg.model,
        "prompt_version": ctx.prompt.version,
        "samples": ctx.cfg.samples,
        "records": len(plan.records),
        "records_judged_now": done.counts["judged_now"],
        "records_from_cache": done.counts["from_cache"],
        "records_from_reference": done.counts["from_reference"],
        "records_from_import": done.counts["from_import"],
        "records_failed": len(failed),
        "records_not_judged": len(done.missing) - len(failed),
        "failed_ids": failed[:100],
        "failure_ratio": round(failure_ratio(plan, done), 6),
        "max_failure_ratio": ctx.cfg.max_failure_ratio,
        "failure_reasons": sorted(set(failures.values()))[:20],
        "api_calls": tally.api_calls,
        "retries": tally.retries,
        "invalid_outputs": tally.invalid_outputs,
        "batches_submitted": tally.batches_submitted,
        **tally.usage,
        "estimated_cost_usd": round(tally.cost_usd, 6),
    }
    if ctx.cfg.samples >= 2:
        retest = retest_agreement(plan, cache, ctx.rubric)
        if retest is not None:
            result["test_retest"] = retest
    return result


def judgments_document(ctx: JudgeContext, done: Assembled, *, tolerated: bool) -> dict[str, Any]:
    """The content of data.judgments (contract in docs/ARCHITECTURE.md). ``failures_tolerated``: the records in
    ``failed`` are within judge.max_failure_ratio, so training leaves them out instead of refusing."""
    rubric = ctx.rubric
    return {
        "model": ctx.cfg.model,
        "prompt_version": ctx.prompt.version,
        "rubric_version": rubric.version,
        "scale": {"min": rubric.scale.min, "max": rubric.scale.max},
        "dimensions": rubric.names,
        "judgments": done.judgments,
        "failed": done.missing,
        "failures_tolerated": tolerated and bool(done.missing),
    }
