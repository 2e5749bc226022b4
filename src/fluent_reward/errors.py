"""Errors the CLI turns into a clear message and an exit code, never a traceback."""

from __future__ import annotations


class FluentRewardError(Exception):
    """A problem the user can fix (bad input, missing key, bad settings). Exit code 2 by default."""

    exit_code = 2


class StageFailed(FluentRewardError):
    """A stage ran but could not finish its work (e.g. too many failed API calls); partial work was kept."""

    exit_code = 1
