"""One progress reporter for every long step (training, scoring): a rich bar on a terminal, log lines elsewhere.

A bar that nobody sees is no progress at all: under ``nohup``, CI, ``dvc repro > log`` or a notebook's captured
stderr, the reporter writes a log line every ``log_every_s`` seconds instead (done / total, rate, elapsed, ETA), so a
long run is never silent. Library code logs; the bar goes to stderr only when it is a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0


def format_duration(seconds: float) -> str:
    """``1h02m``, ``4m05s``, ``12s``: short and sortable by eye."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class _LogLines:
    """Periodic log lines: the first after ``every_s`` seconds, then every ``every_s`` seconds, and one at the end."""

    def __init__(
        self, description: str, total: int | None, unit: str, every_s: float, clock: Callable[[], float]
    ) -> None:
        self.description, self.total, self.unit, self.every_s, self.clock = description, total, unit, every_s, clock
        self.start = self.last = clock()
        self.done = 0
        self.info = ""

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        self.info = info or self.info
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.emit(now)

    def emit(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.description}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:.2f} {self.unit}/s, elapsed {format_duration(elapsed)}")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {format_duration((self.total - self.done) / rate)}")
        if self.info:
            parts.append(self.info)
        log.info(", ".join(parts))


@contextlib.contextmanager
def progress(
    description: str,
    total: int | None,
    *,
    bar: bool = True,
    unit: str = "steps",
    log_every_s: float = LOG_EVERY_S,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Callable[..., None]]:
    """Report progress of a loop; yields ``advance(n=1, info="")``.

    Args:
        description: what is being done (``train``, ``scoring``).
        total: how many units the loop will take (None: unknown; no percentage nor ETA).
        bar: draw a rich bar when stderr is a terminal; otherwise (or with ``bar=False``) log a line every
            ``log_every_s`` seconds and one at the end.
        unit: the name of one unit in the log lines.
        clock: seconds, monotonic (tests pass a fake one).
    """
    if bar and sys.stderr.isatty():
        with _rich_bar(description, total) as advance:
            yield advance
        return
    lines = _LogLines(description, total, unit, log_every_s, clock)
    yield lines.advance
    if lines.done:
        lines.emit(clock())


@contextlib.contextmanager
def _rich_bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "") -> None:
            bar.update(task, advance=n, **({"info": info} if info else {}))

        yield advance
