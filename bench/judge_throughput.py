"""Judge throughput and token accounting against the fake API (300 ms per call), offline.

    .venv/bin/python bench/judge_throughput.py [--latency 0.3] [--seconds 2.5]

Part 1: records/s in messages mode at concurrency 1, 4, 16 and 64 (each run sized to take a few seconds).
Part 2: tokens and dollars for the same records with and without prompt caching of the rubric system prompt.

The fake runs in its own process, so its work does not compete with the judge for the GIL.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fluent_reward.config import load_params  # noqa: E402
from fluent_reward.io import write_jsonl  # noqa: E402
from fluent_reward.judge import prompt as judge_prompt  # noqa: E402
from fluent_reward.judge import run_judge  # noqa: E402
from tests.fake_anthropic import API_KEY, FakeAnthropic  # noqa: E402
from tests.support import judge_records  # noqa: E402


def make_project(folder: Path, records: int, concurrency: int) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["rubric"] = yaml.safe_load((ROOT / params["rubric"]).read_text())  # the rubric file, inlined
    params["data"] = {key: str(folder / value) for key, value in params["data"].items()}
    (folder / "reference").mkdir()
    params["judge"].update(reference_dir=str(folder / "reference"), max_concurrency=concurrency)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    write_jsonl(params["data"]["validated"], judge_records(records))
    return path


class FakeProcess:
    """The fake API in a child process, driven through a pipe."""

    def __init__(self, latency: float) -> None:
        self._conn, child = multiprocessing.Pipe()
        self._proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(child, latency), daemon=True)
        self._proc.start()
        self.url = self._conn.recv()

    def ask(self, command: str, value: float = 0.0) -> Any:
        self._conn.send((command, value))
        return self._conn.recv()

    def stop(self) -> None:
        self.ask("stop")
        self._proc.join(timeout=5)


def _serve(conn: Any, latency: float) -> None:
    with FakeAnthropic(latency_s=latency) as fake:
        conn.send(fake.url)
        while True:
            command, value = conn.recv()
            if command == "stop":
                conn.send(None)
                return
            if command == "latency":
                fake.latency_s = value
            elif command == "forget_prompt_cache":
                fake._prompt_cache.clear()
            conn.send(fake.max_in_flight)
            fake.max_in_flight = 0


def run_once(fake: FakeProcess, records: int, concurrency: int) -> tuple[float, dict[str, Any], int]:
    """(seconds, metrics, the fake's peak of requests in flight) for one judge run on fresh records."""
    fake.ask("reset_peak")
    with tempfile.TemporaryDirectory() as tmp:
        params = load_params(make_project(Path(tmp), records, concurrency))
        started = time.perf_counter()
        summary = run_judge(params)
        return time.perf_counter() - started, summary.metrics, fake.ask("reset_peak")


def throughput(fake: FakeProcess, latency: float, seconds: float) -> None:
    print(f"\nmessages mode, fake API latency {latency * 1000:.0f} ms per call")
    print(f"{'concurrency':>11} {'records':>8} {'seconds':>8} {'records/s':>10} {'speed-up':>9} {'peak in flight':>15}")
    run_once(fake, 2, 1)  # warm-up: imports, first connection
    base = None
    for concurrency in (1, 4, 16, 64):
        # Enough records for a few rounds of `concurrency` calls, so the one warm-up call is a small part.
        records = max(8, round(seconds * concurrency / latency))
        elapsed, metrics, peak = run_once(fake, records, concurrency)
        assert metrics["records_judged_now"] == records, metrics
        rate = records / elapsed
        base = base or rate
        print(f"{concurrency:>11} {records:>8} {elapsed:>8.2f} {rate:>10.1f} {rate / base:>8.1f}x {peak:>15}")


def caching(fake: FakeProcess, records: int) -> None:
    print(f"\ntoken accounting for {records} records (claude-sonnet-4-6 prices from params.yaml)")
    print(f"{'prompt caching':>14} {'input':>9} {'cache write':>12} {'cache read':>11} {'output':>8} {'cost USD':>9}")
    rows = {}
    original = judge_prompt.Prompt.system_blocks
    for label in ("on", "off"):
        if label == "off":
            judge_prompt.Prompt.system_blocks = lambda self: [{"type": "text", "text": self.system}]
        fake.ask("forget_prompt_cache")  # each run starts cold, as a first run would
        try:
            _, m, _ = run_once(fake, records, 8)
        finally:
            judge_prompt.Prompt.system_blocks = original
        rows[label] = m
        print(
            f"{label:>14} {m['input_tokens']:>9,} {m['cache_creation_input_tokens']:>12,} "
            f"{m['cache_read_input_tokens']:>11,} {m['output_tokens']:>8,} {m['estimated_cost_usd']:>9.4f}"
        )
    saved = 1 - rows["on"]["estimated_cost_usd"] / rows["off"]["estimated_cost_usd"]
    print(f"prompt caching saves {saved:.0%} of the cost; the first call runs alone so only it writes the cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.3, help="fake API seconds per call")
    parser.add_argument("--seconds", type=float, default=2.5, help="target duration of each throughput run")
    parser.add_argument("--records", type=int, default=100, help="records in the caching comparison")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    fake = FakeProcess(args.latency)
    os.environ["ANTHROPIC_BASE_URL"] = fake.url
    os.environ["ANTHROPIC_API_KEY"] = API_KEY
    try:
        throughput(fake, args.latency, args.seconds)
        fake.ask("latency", 0.0)
        caching(fake, args.records)
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
