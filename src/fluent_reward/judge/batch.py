"""Batch mode (Message Batches, half price) and its ledger ``data.judge_batches``: submit within the API's limits
and the budget, save every batch id before the first poll, poll, collect results by ``custom_id``, resubmit what
errored or expired, re-ask invalid replies, and adopt a batch whose id an interrupted run never saved."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from fluent_reward.errors import FluentRewardError
from fluent_reward.io import read_json, write_json
from fluent_reward.judge.client import Fatal, call
from fluent_reward.judge.context import Run
from fluent_reward.judge.cost import usage_of
from fluent_reward.judge.plan import Unit
from fluent_reward.judge.reply import InvalidOutput, parse_judgment, reask_messages

log = logging.getLogger(__name__)

# Batch requests are also limited to 256 MB per batch; stay well below.
BATCH_MAX_BYTES = 200_000_000


class BatchLedger:
    """``data.judge_batches``: every batch submitted and not yet collected, written atomically.

    A batch id is written before its first poll, so a restart polls the same batch instead of paying again. The
    requests being submitted are written first too: if the process dies between the API accepting a batch and
    the id being saved, the restart finds the batch by its creation time and size.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"batches": [], "submitting": None}
        if self.path.is_file():
            try:
                self.data = read_json(self.path)
            except ValueError as exc:
                raise FluentRewardError(f"{self.path}: unreadable batch ledger ({exc}); fix or delete it") from None
            self._check()

    def _check(self) -> None:
        """The ledger's shape, so a hand edit is one clear error instead of a KeyError mid-run."""
        data = self.data
        shaped = isinstance(data, dict) and isinstance(data.get("batches"), list)
        entries = [*data["batches"], *([data["submitting"]] if data.get("submitting") else [])] if shaped else []
        if not shaped or not all(_ledger_entry_ok(e) for e in entries):
            raise FluentRewardError(
                f'{self.path}: not a batch ledger (expected {{"batches": [{{"id", "submitted_at", "requests", ...}}], '
                '"submitting"}); fix or delete it (batches listed in it are then not collected)'
            )

    def save(self) -> None:
        write_json(self.path, self.data)

    def open_batches(self) -> list[dict[str, Any]]:
        return [b for b in self.data["batches"] if not b.get("collected")]

    def open_keys(self) -> set[str]:
        return {key for batch in self.open_batches() for key in batch["requests"]}

    def has_work(self) -> bool:
        """Batches to collect, or a submission an interrupted run may have made."""
        return bool(self.open_batches() or self.data.get("submitting"))


_REQUEST_FIELDS = ("record_id", "sample", "resubmits", "reasks")


def _ledger_entry_ok(entry: Any) -> bool:
    if not isinstance(entry, dict) or not all(k in entry for k in ("id", "model", "prompt_version")):
        return False
    if not isinstance(entry.get("submitted_at"), str):
        return False
    requests = entry.get("requests")
    return isinstance(requests, dict) and all(
        isinstance(r, dict) and all(f in r for f in _REQUEST_FIELDS) for r in requests.values()
    )


@dataclass
class Pending:
    """A batch request to (re)submit."""

    unit: Unit
    messages: list[dict[str, Any]]
    resubmits: int = 0
    reasks: int = 0


async def run_batches(run: Run, units: list[Unit], ledger: BatchLedger, *, submit: bool = True) -> None:
    """Batch mode; with ``submit=False`` only collect the batches already submitted (messages mode after a
    switch from batch mode: what was paid for is collected, the rest is judged by messages)."""
    await _recover_submission(run, ledger)
    by_key = {u.key: u for u in units}
    waiting = ledger.open_keys()
    for batch in ledger.open_batches():  # submitted by an earlier run: their upper bounds count against the budget
        for request in batch["requests"].values():
            run.budget.hold(request.get("reserved_usd", 0.0))
    if waiting:
        log.info("resuming: polling %d batch(es) submitted earlier", len(ledger.open_batches()))
    run.progress.begin(f"batches ({run.ctx.prompt.model})", len(set(by_key) | waiting))
    if submit:
        await _submit(run, ledger, [Pending(u, _first_turn(u)) for u in units if u.key not in waiting])
    while ledger.open_batches() and run.fatal is None:
        resubmit = await _poll_once(run, ledger, by_key)
        if resubmit and submit and not run.stopping:
            await _submit(run, ledger, resubmit)
        if ledger.open_batches():
            await asyncio.sleep(run.cfg.batch_poll_interval_s)


def _first_turn(unit: Unit) -> list[dict[str, Any]]:
    return [{"role": "user", "content": unit.user_message}]


async def _poll_once(run: Run, ledger: BatchLedger, by_key: dict[str, Unit]) -> list[Pending]:
    """Retrieve every open batch; collect the ended ones; return what to resubmit."""
    resubmit: list[Pending] = []
    statuses = []
    for batch in ledger.open_batches():
        status = await _retrieve(run, ledger, batch)
        statuses.append(status)
        if status.processing_status == "ended":
            resubmit += await _collect(run, ledger, batch, by_key)
    _show_batch_progress(run, statuses)
    return resubmit


async def _retrieve(run: Run, ledger: BatchLedger, batch: dict[str, Any]) -> Any:
    """The batch's status; a batch the API does not know (404) is named with what to do, not blamed on the model."""
    try:
        return await call(run, f"batch {batch['id']}", lambda: run.client.messages.batches.retrieve(batch["id"]))
    except Fatal as exc:
        if exc.status != 404:
            raise
        raise Fatal(
            f"batch {batch['id']} in {ledger.path} is unknown to the API ({exc.api}): it was submitted with another "
            f"key or workspace, or was deleted; its {len(batch['requests'])} requests cannot be collected. Remove that "
            f"entry from {ledger.path} (or the file, if no other batch is open) and rerun: those records are then "
            "judged again",
            404,
        ) from None


def _show_batch_progress(run: Run, statuses: list[Any]) -> None:
    processing = sum(s.request_counts.processing for s in statuses)
    running = sum(1 for s in statuses if s.processing_status != "ended")
    description = f"{running} batch(es) processing {processing} requests"
    run.progress.update(len(run.judged) + len(run.failures), run.tally, description)
    log.debug("%s; %d judged, %d failed", description, len(run.judged), len(run.failures))


async def _submit(run: Run, ledger: BatchLedger, todo: list[Pending]) -> None:
    """Submit ``todo`` in batches within the API's limits and the budget; each id is saved before polling."""
    affordable = []
    for pending in todo:
        cost = run.upper_bound(pending.messages)
        if not run.budget.fits(cost):
            run.stop_reason = run.stop_reason or "budget"
            break
        run.budget.hold(cost)  # released when the batch's results are collected
        affordable.append((pending, cost))
    for chunk in _chunks(run, affordable):
        await _submit_one(run, ledger, chunk)


def _chunks(run: Run, items: list[tuple[Pending, float]]) -> Iterator[list[tuple[Pending, float]]]:
    chunk: list[tuple[Pending, float]] = []
    size = 0
    for item in items:
        request_size = len(json.dumps(run.ctx.prompt.request(item[0].messages)))
        if chunk and (len(chunk) >= run.cfg.batch_max_requests or size + request_size > BATCH_MAX_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += request_size
    if chunk:
        yield chunk


async def _submit_one(run: Run, ledger: BatchLedger, chunk: list[tuple[Pending, float]]) -> None:
    requests = {
        p.unit.key: {
            "record_id": p.unit.record_id,
            "sample": p.unit.sample,
            "resubmits": p.resubmits,
            "reasks": p.reasks,
            "reserved_usd": cost,
        }
        for p, cost in chunk
    }
    intent = _ledger_entry(run, None, requests)
    ledger.data["submitting"] = intent
    ledger.save()
    payload = [{"custom_id": p.unit.key, "params": run.ctx.prompt.request(p.messages)} for p, _ in chunk]
    batch = await call(run, "batch submission", lambda: run.client.messages.batches.create(requests=payload))
    ledger.data["batches"].append({**intent, "id": batch.id})
    ledger.data["submitting"] = None
    ledger.save()
    run.tally.batches_submitted += 1
    log.info("submitted batch %s with %d requests (saved to %s)", batch.id, len(chunk), ledger.path)


def _ledger_entry(run: Run, batch_id: str | None, requests: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": batch_id,
        "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": run.ctx.prompt.model,
        "prompt_version": run.ctx.prompt.version,
        "requests": requests,
        "collected": False,
    }


async def _recover_submission(run: Run, ledger: BatchLedger) -> None:
    """A submission cut off before its id was saved: find the batch the API accepted, if any, and adopt it."""
    intent = ledger.data.get("submitting")
    if not intent:
        return
    known = {b["id"] for b in ledger.data["batches"]}
    since = datetime.fromisoformat(intent["submitted_at"]) - timedelta(minutes=2)
    size = len(intent["requests"])
    found = []
    page = await call(run, "batch list", lambda: run.client.messages.batches.list(limit=100))
    for batch in page.data:
        counts = batch.request_counts
        total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
        if batch.id not in known and batch.created_at >= since and total == size:
            found.append(batch.id)
    if len(found) == 1:
        log.warning("adopting batch %s, submitted by an interrupted run before its id was saved", found[0])
        ledger.data["batches"].append({**intent, "id": found[0]})
    else:
        log.warning("an interrupted run may have submitted a batch that cannot be identified; submitting again")
    ledger.data["submitting"] = None
    ledger.save()


async def _collect(run: Run, ledger: BatchLedger, batch: dict[str, Any], by_key: dict[str, Unit]) -> list[Pending]:
    """Cache every valid result of an ended batch; return the requests to resubmit (errored, expired, invalid)."""

    async def fetch() -> list[Any]:
        return [item async for item in await run.client.messages.batches.results(batch["id"])]

    items = await call(run, f"batch {batch['id']} results", fetch)
    resubmit: list[Pending] = []
    for item in items:
        request = batch["requests"].get(item.custom_id)
        if request is None:
            log.warning("batch %s: unknown custom_id %s ignored", batch["id"], item.custom_id)
            continue
        if item.custom_id in run.cache.entries:  # collected (and accounted) before a restart
            run.budget.release(request.get("reserved_usd", 0.0), 0.0)
            continue
        succeeded = item.result.type == "succeeded"
        usage = usage_of(item.result.message.usage, f"batch {batch['id']}") if succeeded else {}
        spent = run.account(usage, run.cfg.batch_discount) if succeeded else 0.0
        run.budget.release(request.get("reserved_usd", 0.0), spent)
        again = _collect_one(run, batch, item, request, by_key.get(item.custom_id))
        if again is not None:
            resubmit.append(again)
    batch["collected"] = True
    ledger.save()
    return resubmit


def _collect_one(run: Run, batch: dict[str, Any], item: Any, request: dict[str, Any], unit: Unit | None) -> Any:
    """What to do with one result: cache it, re-ask, resubmit (returned as a Pending) or record a failure."""
    key, result = item.custom_id, item.result
    if unit is None and result.type != "succeeded":
        # Not needed by this run (an earlier prompt, or judged another way now): nothing to resubmit or count.
        log.info("batch %s: request %s %s; no longer needed", batch["id"], key, result.type)
        return None
    if result.type == "succeeded":
        return _collect_success(run, batch, item, request, unit)
    if result.type == "errored" and result.error.error.type == "invalid_request_error":
        run.fail(key, request["record_id"], f"batch request rejected: {result.error.error.message}")
        return None
    why = f"{result.type}: {result.error.error.message}" if result.type == "errored" else result.type
    if request["resubmits"] < run.cfg.batch_max_resubmits:
        log.info("batch %s: request %s %s; resubmitting", batch["id"], key, why)
        return Pending(unit, _first_turn(unit), request["resubmits"] + 1, request["reasks"])
    run.fail(key, request["record_id"], f"batch request {why} (resubmitted {request['resubmits']} times)")
    return None


def _collect_success(
    run: Run, batch: dict[str, Any], item: Any, request: dict[str, Any], unit: Unit | None
) -> Pending | None:
    key, message = item.custom_id, item.result.message
    try:
        parsed = parse_judgment(message, run.ctx.rubric)
    except InvalidOutput as exc:
        run.tally.invalid_outputs += 1
        if unit is None:
            return None
        if request["reasks"] < run.cfg.invalid_output_retries:
            messages = reask_messages(unit.user_message, message, str(exc), run.ctx.rubric)
            return Pending(unit, messages, request["resubmits"], request["reasks"] + 1)
        run.fail(key, request["record_id"], f"invalid output after {request['reasks'] + 1} attempts: {exc}")
        return None
    # The batch may come from an earlier run with another prompt: its key was made with that prompt.
    extra = {"message_id": message.id, "batch_id": batch["id"], "mode": "batch", "model": batch["model"]}
    extra["prompt_version"] = batch["prompt_version"]
    usage = usage_of(message.usage, f"batch {batch['id']}")
    run.store(key, request["record_id"], request["sample"], parsed, usage, extra)
    return None
