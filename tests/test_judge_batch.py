"""Batch mode (Message Batches) against the fake: end to end, resubmission, budget, and recovery of a lost id."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.fake_anthropic import API_KEY


def custom_id_of(fake, record_id: str) -> str:
    for creation in fake.batch_creations():
        for request in creation.body["requests"]:
            if f"(respuesta {record_id})" in request["params"]["messages"][0]["content"]:
                return request["custom_id"]
    raise AssertionError(record_id)


@pytest.fixture
def batch_project(judge_project):
    judge_project.set_judge(mode="batch", batch_max_requests=5)
    return judge_project


def test_batch_end_to_end_with_errored_and_expired_resubmitted(batch_project, fake_api):
    fake_api.add_fault("errored", error_type="overloaded_error", match="respuesta r0003")
    fake_api.add_fault("expired", match="respuesta r0005")
    fake_api.add_fault("errored", error_type="invalid_request_error", match="respuesta r0007")
    fake_api.add_fault("malformed", malformed="missing_dimension", match="respuesta r0009")
    assert batch_project.run() == 2  # r0007 was rejected: named, and the run is not a success
    creations = fake_api.batch_creations()
    assert [len(c.body["requests"]) for c in creations] == [5, 5, 2, 3]  # 12 split by 5, then 3 resubmitted
    resubmitted = creations[3].body["requests"]
    assert {r["custom_id"] for r in resubmitted} == {custom_id_of(fake_api, r) for r in ("r0003", "r0005", "r0009")}
    reask = next(r for r in resubmitted if len(r["params"]["messages"]) == 3)
    assert reask["params"]["messages"][2]["content"][0]["is_error"] is True
    assert fake_api.messages_requests() == []  # everything went through batches
    doc = batch_project.judgments()
    assert len(doc["judgments"]) == 11 and doc["failed"] == ["r0007"]
    metrics = batch_project.metrics()
    assert metrics["batches_submitted"] == 4 and metrics["records_failed"] == 1 and metrics["invalid_outputs"] == 1
    assert "invalid_request_error" not in json.dumps(doc) and "batch request rejected" in metrics["failure_reasons"][0]
    ledger = json.loads(batch_project.data["judge_batches"].read_text())
    assert len(ledger["batches"]) == 4 and all(b["collected"] for b in ledger["batches"])
    assert ledger["submitting"] is None
    assert {e["mode"] for e in batch_project.cache_lines()} == {"batch"}
    # billed at the batch discount
    usage = {k: metrics[k] for k in ("input_tokens", "output_tokens")}
    standard = (
        usage["input_tokens"] * 3
        + usage["output_tokens"] * 15
        + metrics["cache_creation_input_tokens"] * 3.75
        + metrics["cache_read_input_tokens"] * 0.3
    ) / 1e6
    assert metrics["estimated_cost_usd"] == pytest.approx(0.5 * standard, abs=1e-6)


def test_expired_past_the_resubmit_limit_is_a_failure(batch_project, fake_api):
    batch_project.set_judge(batch_max_resubmits=1)
    fake_api.add_fault("expired", times=5, match="respuesta r0002")
    assert batch_project.run() == 2
    assert batch_project.judgments()["failed"] == ["r0002"]
    assert len(fake_api.batch_creations()) == 4  # 5 + 5 + 2, then one resubmission
    assert "expired (resubmitted 1 times)" in batch_project.metrics()["failure_reasons"][0]


def test_batch_budget_submits_only_what_fits(batch_project, fake_api, capsys):
    batch_project.set_judge(max_budget_usd=0.05)
    assert batch_project.run() == 1
    assert "max_budget_usd" in capsys.readouterr().err
    submitted = sum(len(c.body["requests"]) for c in fake_api.batch_creations())
    assert 1 <= submitted < 12 and len(batch_project.cache_lines()) == submitted
    assert batch_project.metrics()["estimated_cost_usd"] <= 0.05


def test_batch_accepted_but_id_not_saved_is_found_not_paid_again(batch_project, fake_api):
    """Killed after the API accepted a batch but before its id was saved: the restart adopts that batch."""
    import anthropic

    assert batch_project.run() == 0
    first = len(fake_api.batch_creations())
    # An interrupted run: the ledger holds a submitted, uncollected batch for new records.
    from tests.support import judge_records

    batch_project.write_records(judge_records(14))
    ledger_path = batch_project.data["judge_batches"]
    ledger = json.loads(ledger_path.read_text())
    assert first == 3 and all(b["collected"] for b in ledger["batches"])

    async def submit_directly() -> str:
        # What the interrupted run had sent: the two new records, with the exact params a run would send.
        from fluent_reward.config import load_params
        from fluent_reward.judge import JudgeCache, Prompt, load_reference, make_plan

        params = load_params(batch_project.params_path)
        prompt = Prompt.build(params.rubric, params.judge)
        records = [json.loads(x) for x in batch_project.data["validated"].read_text().splitlines()]
        cache = JudgeCache(batch_project.data["judge_cache"])
        plan = make_plan(
            records, load_reference([], params.rubric), cache.load(params.rubric, prompt.version), prompt, 1
        )
        assert len(plan.units) == 2
        client = anthropic.AsyncAnthropic(api_key=API_KEY, base_url=fake_api.url, _strict_response_validation=True)
        requests = [
            {"custom_id": u.key, "params": prompt.request([{"role": "user", "content": u.user_message}])}
            for u in plan.units
        ]
        batch = await client.messages.batches.create(requests=requests)
        ledger["submitting"] = {  # written before the submission, as a run does
            **ledger["batches"][-1],
            "id": None,
            "collected": False,
            "requests": {
                u.key: {"record_id": u.record_id, "sample": 0, "resubmits": 0, "reasks": 0} for u in plan.units
            },
        }
        return batch.id

    lost_id = asyncio.run(submit_directly())
    ledger_path.write_text(json.dumps(ledger))  # ...and the batch id never reached the ledger
    assert batch_project.run() == 0
    assert len(fake_api.batch_creations()) == first + 1  # only the direct submission: nothing paid twice
    ledger = json.loads(ledger_path.read_text())
    assert ledger["batches"][-1]["id"] == lost_id and ledger["batches"][-1]["collected"]
    assert len(batch_project.judgments()["judgments"]) == 14


def test_a_stale_batch_id_in_the_ledger_says_so_and_what_to_do(batch_project, fake_api, capsys):
    ledger_path = batch_project.data["judge_batches"]
    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    stale = {
        "id": "msgbatch_gone",
        "submitted_at": "2026-01-01T00:00:00+00:00",
        "model": "claude-sonnet-4-6",
        "prompt_version": "p-old",
        "requests": {"k1": {"record_id": "r0000", "sample": 0, "resubmits": 0, "reasks": 0}},
        "collected": False,
    }
    ledger_path.write_text(json.dumps({"batches": [stale], "submitting": None}))
    assert batch_project.run() == 2
    err = capsys.readouterr().err
    assert (
        f"error: batch msgbatch_gone in {ledger_path} is unknown to the API (404 not_found_error: no route GET "
        "/v1/messages/batches/msgbatch_gone): it was submitted with another key or workspace, or was deleted; its 1 "
        f"requests cannot be collected. Remove that entry from {ledger_path} (or the file, if no other batch is "
        "open) and rerun"
    ) in err
    assert "check judge.model" not in err and len(err.strip().splitlines()) == 1
    ledger_path.unlink()
    assert batch_project.run() == 0
