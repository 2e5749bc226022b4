"""The judge's progress display: a rich bar with records/s, tokens and dollars so far; silent when disabled
(tests, non-terminals)."""

from __future__ import annotations

import time
from typing import Any

from fluent_reward.judge.cost import Tally


class Progress:
    """A rich progress bar with records/s, tokens and dollars; silent when disabled."""

    def __init__(self, enabled: bool) -> None:
        self._bar: Any = None
        self._task: Any = None
        self._start = time.monotonic()
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} rec/s  {task.fields[tokens]:,} tok  ${task.fields[cost]:.2f}"),
                TimeRemainingColumn(),
                transient=False,
            )

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def begin(self, description: str, total: int) -> None:
        self._start = time.monotonic()
        if self._bar is not None:
            self._task = self._bar.add_task(description, total=total, rate=0.0, tokens=0, cost=0.0)

    def update(self, completed: int, tally: Tally, description: str | None = None) -> None:
        if self._bar is None or self._task is None:
            return
        rate = completed / max(time.monotonic() - self._start, 1e-9)
        extra = {"description": description} if description else {}
        tokens = sum(tally.usage.values())
        self._bar.update(self._task, completed=completed, rate=rate, tokens=tokens, cost=tally.cost_usd, **extra)
