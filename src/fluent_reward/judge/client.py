"""Talking to the Anthropic API: the key and base URL (environment, else ``.env``), the SDK client and its
middleware (counts every HTTP attempt, caps the retry-after the SDK obeys), and ``call``: the SDK's retries, then
our own bounded wait shared by all workers after a rate limit. Refusals become ``Fatal``; a call that never got
through becomes ``UnitFailed``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fluent_reward.config import JudgeConfig
from fluent_reward.judge.cost import Tally

if TYPE_CHECKING:
    from fluent_reward.judge.context import Run

log = logging.getLogger(__name__)
T = TypeVar("T")
ClientFactory = Callable[..., Any]

# Each wait the SDK itself makes is capped at its own longest backoff. It obeys retry-after without an upper bound
# (retry-after: 3600 would sleep an hour inside one call); longer waits are ours, bounded by rate_limit_max_wait_s.
SDK_RETRY_AFTER_CAP_S = 8.0
_ORIGINAL_RETRY_AFTER = "x-fluent-reward-original-retry-after"


DEFAULT_BASE_URL = "https://api.anthropic.com"
# HTTP statuses that refuse one record's request (a malformed or too large request): that record fails, the others go
# on. Other refusals (401 key, 403 permission, 404 model) concern every request and stop the run.
RECORD_REFUSALS = (400, 413)


class Fatal(Exception):
    """The API refused in a way retrying cannot fix (bad key, unknown model, bad request)."""

    def __init__(self, message: str, status: int = 0, api: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.api = api  # the API's own words ("404 not_found_error: ..."), without our hint


class Unreachable(Fatal):
    """The first request of a run could not reach the API at all (connection refused, DNS, timeouts)."""


class UnitFailed(Exception):
    """One judgment could not be obtained (transient errors past every retry, or invalid output past re-asks)."""


class BadBody(Exception):
    """A 200 response whose body is not what the endpoint returns (an HTML page from a proxy, say)."""


def resolve_api_settings(cwd: Path | None = None) -> tuple[str | None, str | None]:
    """(API key, base URL) from the environment, else from ``.env`` in ``cwd``; the environment always wins."""
    key = os.environ.get("ANTHROPIC_API_KEY", "").strip() or None
    base_url = os.environ.get("ANTHROPIC_BASE_URL", "").strip() or None
    env_file = (cwd or Path.cwd()) / ".env"
    if (key is None or base_url is None) and env_file.is_file():
        from dotenv import dotenv_values

        values = dotenv_values(env_file)
        key = key or (values.get("ANTHROPIC_API_KEY") or "").strip() or None
        base_url = base_url or (values.get("ANTHROPIC_BASE_URL") or "").strip() or None
    return key, base_url


def default_client_factory(**kwargs: Any) -> Any:
    """The production client: ``anthropic.AsyncAnthropic(**kwargs)``."""
    import anthropic

    return anthropic.AsyncAnthropic(**kwargs)


def client_kwargs(cfg: JudgeConfig, key: str, base_url: str | None, tally: Tally) -> dict[str, Any]:
    """The keyword arguments every client factory receives."""
    kwargs: dict[str, Any] = {
        "api_key": key,
        "max_retries": cfg.sdk_max_retries,
        "timeout": cfg.timeout_s,
        "middleware": [_make_middleware(tally)],
    }
    if base_url:
        kwargs["base_url"] = base_url
    return kwargs


class _ApiMeter:
    """SDK middleware: counts every HTTP attempt and caps each retry-after the SDK will obey (see
    SDK_RETRY_AFTER_CAP_S); the original value is kept in another header for our own bounded wait."""

    def __init__(self, tally: Tally, cap_s: float = SDK_RETRY_AFTER_CAP_S) -> None:
        self.tally = tally
        self.cap_s = cap_s  # a client factory may lower it (tests), never the stage

    async def handle_async(self, request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        self.tally.api_calls += 1
        if request.retries_taken:
            self.tally.retries += 1
        response = await call_next(request)
        headers = response.http_response.headers
        wait = header_seconds(headers)
        if wait is not None and wait > self.cap_s:
            headers[_ORIGINAL_RETRY_AFTER] = f"{wait:g}"
            headers["retry-after"] = f"{self.cap_s:g}"
            headers.pop("retry-after-ms", None)
        return response


def header_seconds(headers: Any) -> float | None:
    """The server's requested wait (the original one if the middleware capped it), or None."""
    for name, scale in ((_ORIGINAL_RETRY_AFTER, 1.0), ("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        with contextlib.suppress(TypeError, ValueError):
            return float(headers.get(name)) / scale
    return None


def _make_middleware(tally: Tally) -> Any:
    import anthropic

    class ApiMeter(_ApiMeter, anthropic.Middleware):
        pass

    return ApiMeter(tally)


def api_message(exc: Any) -> str:
    """``<status> <error type>: <message>`` from an SDK status error."""
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"{exc.status_code} {error.get('type', 'error')}: {error.get('message', '')}"
    return f"{getattr(exc, 'status_code', '?')}: {exc}"


def is_fatal_status(status: int) -> bool:
    # 4xx other than timeout/conflict/rate limit: a bad key, model, request or account; retrying cannot help.
    return 400 <= status < 500 and status not in (408, 409, 429)


def refusal_message(exc: Any) -> str:
    """The API's own words for a refusal, with a hint at the setting to fix."""
    hints = {401: "check ANTHROPIC_API_KEY", 403: "check the key's permissions", 404: "check judge.model"}
    hint = hints.get(getattr(exc, "status_code", 0))
    return f"the Anthropic API refused the request ({api_message(exc)})" + (f"; {hint}" if hint else "")


class Gate:
    """A pause shared by all workers after a rate limit, so they back off together instead of hammering."""

    def __init__(self) -> None:
        self.until = 0.0

    def pause(self, seconds: float) -> None:
        self.until = max(self.until, time.monotonic() + seconds)

    async def wait(self) -> None:
        while (delay := self.until - time.monotonic()) > 0:
            await asyncio.sleep(delay)


def _classify(run: Run, exc: Exception, attempt: int, record_level: bool) -> tuple[str, float, bool]:
    """(reason, delay, shared pause?) for a transient error; UnitFailed for one record's refusal; Fatal for a
    refusal of every request; Unreachable when the run's first request found no API at all."""
    import anthropic

    if isinstance(exc, anthropic.APIStatusError | anthropic.APIResponseValidationError):
        run.reached = True  # the server answered
    if isinstance(exc, anthropic.APIStatusError):
        if record_level and exc.status_code in RECORD_REFUSALS:
            raise UnitFailed(f"refused by the API ({api_message(exc)})") from None
        if is_fatal_status(exc.status_code):
            raise Fatal(refusal_message(exc), exc.status_code, api_message(exc)) from None
        delay = header_seconds(exc.response.headers) or backoff(attempt)
        return api_message(exc), delay, exc.status_code in (429, 529)
    if isinstance(exc, anthropic.APIConnectionError) and not run.reached:
        url = run.ctx.base_url or DEFAULT_BASE_URL
        raise Unreachable(
            f"cannot reach the Anthropic API at {url} ({type(exc).__name__}: {exc}, after "
            f"{run.ctx.cfg.sdk_max_retries} retries); check the network, a proxy or ANTHROPIC_BASE_URL"
        ) from None
    return f"{type(exc).__name__}: {exc}", backoff(attempt), False


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


async def call(
    run: Run,
    what: str,
    request: Callable[[], Awaitable[T]],
    *,
    expect: type | None = None,
    record_level: bool = False,
) -> T:
    """``request()`` with the SDK's retries inside, then our own bounded wait on transient errors.

    After the SDK gives up, we wait (honouring retry-after, backing off otherwise) and try again, until the total
    of our waits for this call would pass judge.rate_limit_max_wait_s; then the call fails (UnitFailed).
    ``expect``: the type a 200 response must parse to (a proxy's HTML page is a transient error, not a reply).
    ``record_level``: the request is about one record, so a 400/413 fails that record only.
    """
    import anthropic

    waited, attempt = 0.0, 0
    while True:
        await run.gate.wait()
        try:
            result = await request()
            if expect is not None and not isinstance(result, expect):
                raise BadBody(f"the API answered 200 with a body that is not a {expect.__name__}: {_short(result)}")
            run.reached = True
            return result
        except BadBody as exc:
            run.reached = True
            reason, delay, shared = str(exc), backoff(attempt), False
        except (anthropic.APIStatusError, anthropic.APIConnectionError, anthropic.APIResponseValidationError) as exc:
            reason, delay, shared = _classify(run, exc, attempt, record_level)
        remaining = run.ctx.cfg.rate_limit_max_wait_s - waited
        if remaining <= 0:
            raise UnitFailed(f"{reason} (after the SDK's retries and {waited:.0f} s of waiting)")
        delay = min(delay, remaining)
        if shared:
            run.gate.pause(delay)
        log.warning("%s: %s; retrying in %.1f s", what, reason, delay)
        run.tally.retries += 1
        await asyncio.sleep(delay)
        waited += delay
        attempt += 1


def backoff(attempt: int) -> float:
    return min(2.0 * 2**attempt, 30.0)
