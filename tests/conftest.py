"""Shared pytest fixtures. Each owner keeps their fixtures in their own marked block."""

from __future__ import annotations

# ================================================================================================================
# judge fixtures (owner: judge stage): the fake Anthropic API and small temporary judge projects
# ================================================================================================================
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fake_anthropic import API_KEY, FakeAnthropic
from tests.support import judge_records, strict_client, write_project_params

# Runs the real CLI in a subprocess with the SDK's strict response validation on, as the in-process tests do.
JUDGE_LAUNCHER = (
    "import signal, sys, anthropic\n"
    # Ctrl-C as at a terminal, even when the test run itself was started in the background (`cmd &` in a script
    # starts it with SIGINT ignored, and children inherit that): the Ctrl-C test must not depend on how pytest ran.
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "from fluent_reward.cli import main\n"
    "factory = lambda **kw: anthropic.AsyncAnthropic(_strict_response_validation=True, **kw)\n"
    "sys.exit(main(sys.argv[1:], judge_client_factory=factory))\n"
)


@dataclass
class JudgeProject:
    """A temporary project: params.yaml (repo copy, paths under ``root``) and validated records."""

    root: Path
    params_path: Path
    data: dict[str, Path]

    def set_judge(self, **overrides: Any) -> None:
        params = yaml.safe_load(self.params_path.read_text())
        params["judge"].update(overrides)
        self.params_path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))

    def write_records(self, records: list[dict[str, Any]]) -> None:
        path = self.data["validated"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    def run(self, *args: str, verbose: bool = False) -> int:
        """The CLI in-process (``fluent-reward --params ... judge ...``); returns the exit code."""
        from fluent_reward.cli import main

        flags = ["-v"] if verbose else []
        argv = ["--params", str(self.params_path), *flags, "judge", "--no-progress", *args]
        return main(argv, judge_client_factory=strict_client)

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """The CLI in a subprocess (for kill -9 tests)."""
        command = [sys.executable, "-c", JUDGE_LAUNCHER, "--params", str(self.params_path), "judge", "--no-progress"]
        return subprocess.Popen(
            [*command, *args],
            cwd=self.root,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def judgments(self) -> dict[str, Any]:
        return json.loads(self.data["judgments"].read_text(encoding="utf-8"))

    def metrics(self) -> dict[str, Any]:
        return json.loads(self.data["judge_metrics"].read_text(encoding="utf-8"))

    def cache_lines(self) -> list[dict[str, Any]]:
        path = self.data["judge_cache"]
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def fake_api(monkeypatch):
    """The fake Anthropic API on 127.0.0.1; the SDK is pointed at it and given the fake's key."""
    with FakeAnthropic() as fake:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
        yield fake


@pytest.fixture
def judge_project(tmp_path, monkeypatch) -> JudgeProject:
    """A project in tmp_path with 12 validated records, an empty reference folder and fast test settings.

    The environment starts with no key and no base URL; ``fake_api`` sets both.
    """
    import anthropic  # noqa: F401 (imported here, so a test that times a run does not time the import)

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    judge = {
        "reference_dir": str(tmp_path / "reference"),
        "max_concurrency": 4,
        "sdk_max_retries": 3,
        "rate_limit_max_wait_s": 2,
        "timeout_s": 10,
        "batch_poll_interval_s": 0.05,
    }
    params_path = write_project_params(tmp_path, judge=judge)
    (tmp_path / "reference").mkdir()  # no reference judgments unless a test writes some
    data = {key: Path(value) for key, value in yaml.safe_load(params_path.read_text(encoding="utf-8"))["data"].items()}
    project = JudgeProject(tmp_path, params_path, data)
    project.write_records(judge_records(12))
    return project


# ================================================================================================================
# end of judge fixtures
# ================================================================================================================


# ---- shared: test isolation ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state; a TRL trainer in one test must not fix another test's precision."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
