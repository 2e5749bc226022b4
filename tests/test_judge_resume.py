"""Resume after kill -9: the CLI runs in a subprocess against the fake, is killed mid-run, and is run again."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.support import judge_records, record_of


def _complete_lines(path) -> list[dict]:
    """The cache's complete entries (a kill can leave a torn last line)."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def _wait_for(condition, proc, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the judge exited early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the judge")
        time.sleep(0.01)


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    proc.communicate()


def test_sigkill_mid_run_then_rerun_judges_every_record_once(judge_project, fake_api):
    fake_api.latency_s = 0.25
    judge_project.write_records(judge_records(40))
    cache = judge_project.data["judge_cache"]
    proc = judge_project.spawn()
    _wait_for(lambda: len(_complete_lines(cache)) >= 6, proc)
    _kill(proc)
    paid_before = {e["record_id"] for e in _complete_lines(cache)}
    sent_before = len(fake_api.messages_requests())
    assert 6 <= len(paid_before) < 40

    fake_api.latency_s = 0.0
    assert judge_project.run() == 0
    second_run = {record_of(r) for r in fake_api.messages_requests()[sent_before:]}
    assert not second_run & paid_before  # no completed judgment paid twice
    entries = judge_project.cache_lines()
    assert sorted(e["record_id"] for e in entries) == [f"r{i:04d}" for i in range(40)]  # each exactly once
    assert len(judge_project.judgments()["judgments"]) == 40
    # At most the calls in flight at the kill (max_concurrency=4) were answered and lost.
    assert len(fake_api.billed()) <= 40 + 4


@pytest.mark.parametrize("rerun_mode", ["batch", "messages"])
def test_sigkill_while_a_batch_is_in_progress_polls_the_same_batch(judge_project, fake_api, rerun_mode):
    """Rerun in batch mode, or after switching to messages mode: the batch paid for is collected either way."""
    judge_project.set_judge(mode="batch")
    fake_api.batch_latency_s = 60.0
    ledger_path = judge_project.data["judge_batches"]

    def batch_saved() -> bool:
        return ledger_path.exists() and bool(json.loads(ledger_path.read_text())["batches"])

    proc = judge_project.spawn()
    _wait_for(batch_saved, proc)
    time.sleep(0.2)  # it is polling now
    _kill(proc)
    assert len(fake_api.batch_creations()) == 1
    saved = json.loads(ledger_path.read_text())["batches"][0]
    assert saved["id"] in fake_api.batches and not saved["collected"]

    fake_api.batch_latency_s = 0.1
    judge_project.set_judge(mode=rerun_mode)
    assert judge_project.run() == 0
    assert len(fake_api.batch_creations()) == 1  # no second batch submitted
    assert fake_api.messages_requests() == []  # and nothing judged again by messages
    assert len(judge_project.judgments()["judgments"]) == 12
    assert {e["batch_id"] for e in judge_project.cache_lines()} == {saved["id"]}
    assert json.loads(ledger_path.read_text())["batches"][0]["collected"] is True


def test_ctrl_c_exits_130_and_the_rerun_resumes(judge_project, fake_api):
    # Slow enough (about 5 s of judging at concurrency 8) that the interrupt lands mid-run even on a loaded machine.
    fake_api.latency_s = 0.5
    judge_project.write_records(judge_records(80))
    cache = judge_project.data["judge_cache"]
    proc = judge_project.spawn()
    _wait_for(lambda: len(_complete_lines(cache)) >= 3, proc)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "interrupted: work done so far is saved" in err
    assert "Traceback" not in err
    saved = {e["record_id"] for e in _complete_lines(cache)}
    sent_before = len(fake_api.messages_requests())
    fake_api.latency_s = 0.0
    assert judge_project.run() == 0
    assert not {record_of(r) for r in fake_api.messages_requests()[sent_before:]} & saved
    assert len(judge_project.cache_lines()) == 80
