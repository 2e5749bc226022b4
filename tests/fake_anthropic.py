"""A faithful fake of the Anthropic API for offline tests: a real HTTP server on 127.0.0.1 (random port, threads).

It serves what the judge uses, with the response shapes of ``shared/reference/anthropic-sdk.md`` (checked by the
SDK's strict response validation in the tests):

- ``POST /v1/messages``: judges with the forced tool, deterministically from the reply's text (samples of the same
  request differ by at most one point), with realistic token usage and prompt caching of the ``tools + system``
  prefix (a cache entry only exists once a response has been produced, as on the real API);
- ``POST /v1/messages/count_tokens``;
- Message Batches: create, retrieve, list, cancel and JSONL results; a batch ends ``batch_latency_s`` after it was
  created, its results in an order unrelated to the requests.

Fault injection (``add_fault``): HTTP errors with ``retry-after`` (429, 529, 500, 401, 400, 404), a connection
dropped mid-response, slow responses, malformed tool output (missing dimension, out-of-range or non-integer score,
text instead of the tool, truncated by ``max_tokens``), a 200 whose body is an HTML page (a proxy's), a valid reply
with impossible usage counts (``bad_usage``, ``usage={...}``), and batch results that are errored, expired or
canceled.

Every request is recorded (``requests``), with whether its response was delivered, so tests can assert what was paid.

    with FakeAnthropic(latency_s=0.05) as fake:
        os.environ["ANTHROPIC_BASE_URL"] = fake.url
        fake.add_fault("429", times=2, retry_after=0.01)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_KEY = "sk-ant-api03-FAKE-test-key-0123456789abcdef"
MODELS = ("claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-6")
MESSAGE_FAULTS = {"429", "529", "500", "401", "400", "404", "drop", "slow", "malformed", "html200", "bad_usage"}
BATCH_RESULT_FAULTS = {"errored", "expired", "canceled"}
MALFORMED_KINDS = ("missing_dimension", "out_of_range", "not_integer", "text_only", "max_tokens")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# A crude tokenizer, about 3.6 characters per token on English, one token per CJK character: close enough to the
# real one that a client-side estimate of "characters / 3.5" is near, but not equal, to what the fake reports.
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|[^\W\d_]+|\d|[^\w\s]+")
_RATIONALE_TEXT = (
    "the reply explains the point correctly and gives the student a clear and natural example to follow while "
    "keeping the level right and inviting another attempt in the target language with a warm tone overall"
)
_RATIONALE_WORDS = _RATIONALE_TEXT.split()


def count_tokens(text: str) -> int:
    """Letter runs: one token per 4 letters; punctuation runs: one per 2 characters; a digit or CJK character: 1."""
    total = 0
    for tok in _TOKEN.findall(text):
        size = 4 if tok[0].isalpha() else 2 if not tok[0].isalnum() else 1
        total += -(-len(tok) // size)
    return total


def _now_iso(offset_s: float = 0.0) -> str:
    moment = datetime.now(timezone.utc) + timedelta(seconds=offset_s)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Fault:
    """One injected fault, applied to the next ``times`` requests it matches (``match``: substring of the body)."""

    kind: str
    times: int = 1
    match: str | None = None
    path: str = "/v1/messages"
    retry_after: float | None = None
    delay_s: float = 0.0
    malformed: str = "missing_dimension"
    error_type: str = "api_error"
    usage: dict[str, Any] | None = None


@dataclass
class Recorded:
    """One HTTP request the fake received and what it did with it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    started: float
    status: int = 0
    fault: str | None = None
    delivered: bool = False
    ended: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def user_text(self) -> str:
        """The first user turn's text of a Messages request ('' for other requests)."""
        if not isinstance(self.body, dict) or not self.body.get("messages"):
            return ""
        return _text_of(self.body["messages"][0].get("content"))


@dataclass
class _Batch:
    id: str
    created: float
    created_at: str
    expires_at: str
    requests: list[dict[str, Any]]
    results: list[dict[str, Any]] | None = None
    canceled: bool = False


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if block.get("type") == "text":
            parts.append(block["text"])
        elif block.get("type") == "tool_use":
            parts.append(json.dumps(block.get("input"), ensure_ascii=False))
        elif block.get("type") == "tool_result":
            parts.append(_text_of(block.get("content")))
    return "\n".join(parts)


class _ApiError(Exception):
    def __init__(self, status: int, message: str, error_type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.error_type = error_type or _ERROR_TYPES.get(status, "api_error")
        self.headers = headers or {}


class FakeAnthropic:
    """The fake server. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        api_key: str = API_KEY,
        models: tuple[str, ...] = MODELS,
        min_cacheable_tokens: int = 1024,
        batch_latency_s: float = 0.2,
        seed: int = 0,
    ) -> None:
        self.latency_s = latency_s
        self.api_key = api_key
        self.models = set(models)
        self.min_cacheable_tokens = min_cacheable_tokens
        self.batch_latency_s = batch_latency_s
        self.requests: list[Recorded] = []
        self.batches: dict[str, _Batch] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: list[Fault] = []
        self._batch_faults: list[Fault] = []
        self._prompt_cache: dict[str, float] = {}
        self._samples: dict[str, int] = {}
        self._counter = 0
        self._lock = threading.Lock()
        self._batch_lock = threading.Lock()  # one thread computes a batch's results (it takes self._lock inside)
        self._rng = random.Random(seed)
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> FakeAnthropic:
        handler = type("Handler", (_Handler,), {"fake": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
        server.daemon_threads = True
        server.block_on_close = False  # a handler sleeping on a slow response must not hold up stop()
        server.request_queue_size = 256  # many concurrent connects (benchmark at concurrency 64)
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- fault injection ----------------------------------------------------------------------------------------

    def add_fault(self, kind: str, *, times: int = 1, match: str | None = None, **options: Any) -> None:
        """Inject a fault into the next ``times`` matching requests (see the module docstring for the kinds).

        HTTP-level kinds: "429", "529", "500", "401", "400", "404" (``retry_after`` seconds adds the header),
        "drop" (headers and half the body, then the connection is closed), "slow" (``delay_s``), "html200" (a 200
        with an HTML body), "bad_usage" (the reply's usage updated with ``usage``), "malformed"
        (``malformed`` = one of MALFORMED_KINDS; also applies to batch results). ``path`` picks the endpoint.
        Batch-result kinds: "errored" (``error_type``), "expired", "canceled".
        """
        fault = Fault(kind=kind, times=times, match=match, **options)
        if kind in BATCH_RESULT_FAULTS:
            self._batch_faults.append(fault)
        elif kind in MESSAGE_FAULTS:
            self._faults.append(fault)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    def _take(self, faults: list[Fault], path: str, text: str, kinds: set[str] | None = None) -> Fault | None:
        with self._lock:
            for fault in faults:
                if fault.times <= 0 or (kinds is not None and fault.kind not in kinds):
                    continue
                if fault.path != path and fault.kind not in BATCH_RESULT_FAULTS:
                    continue
                if fault.match is not None and fault.match not in text:
                    continue
                fault.times -= 1
                return fault
        return None

    # -- what tests look at -------------------------------------------------------------------------------------

    def messages_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/v1/messages"]

    def billed(self) -> list[Recorded]:
        """Messages requests that produced a judgment and delivered it (what a client could have paid for)."""
        return [r for r in self.messages_requests() if r.status == 200 and r.delivered and r.usage]

    def batch_creations(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/v1/messages/batches"]

    # -- judging ------------------------------------------------------------------------------------------------

    def _next_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}_{self._counter:06d}"

    def judge(self, params: dict[str, Any], *, tier: str = "standard", fault: Fault | None = None) -> dict:
        """A Messages API response for ``params`` (already validated)."""
        tool = next(t for t in params["tools"] if t["name"] == params["tool_choice"]["name"])
        dimensions = list(tool["input_schema"]["properties"])
        lo, hi = _scale_of(tool)
        user = _text_of(params["messages"][0]["content"])
        reply = _between(user, "<tutor_response>", "</tutor_response>") or user
        with self._lock:
            sample = self._samples.get(user, 0)
            self._samples[user] = sample + 1
        judgment = {}
        for dim in dimensions:
            digest = int(hashlib.sha256(f"{dim}|{reply}".encode()).hexdigest(), 16)
            base = lo + digest % (hi - lo + 1)
            jitter = (0, 1, -1)[sample % 3] if sample else 0
            words = _RATIONALE_WORDS[digest % 7 :][: 14 + digest % 9]
            judgment[dim] = {"rationale": " ".join(words).capitalize() + ".", "score": min(hi, max(lo, base + jitter))}
        content: list[dict[str, Any]] = [{"type": "tool_use", "id": self._next_id("toolu"), "name": tool["name"]}]
        content[0]["input"] = judgment
        stop_reason = "tool_use"
        if fault is not None and fault.kind == "malformed":
            content, stop_reason = _malform(content, fault.malformed, dimensions, hi)
        usage = self._usage(params, content, tier)
        return {
            "id": self._next_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": params["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }

    def input_tokens(self, params: dict[str, Any]) -> tuple[int, int]:
        """(total input tokens, tokens of the cacheable prefix or 0)."""
        tools = json.dumps(params.get("tools", []), ensure_ascii=False)
        system = params.get("system") or ""
        system_text = system if isinstance(system, str) else "\n".join(b["text"] for b in system)
        messages = "\n".join(_text_of(m["content"]) for m in params["messages"])
        prefix = count_tokens(tools) + count_tokens(system_text)
        total = prefix + count_tokens(messages) + 4 * len(params["messages"])
        cached = not isinstance(system, str) and any(b.get("cache_control") for b in system)
        return total, prefix if cached and prefix >= self.min_cacheable_tokens else 0

    def _usage(self, params: dict[str, Any], content: list[dict], tier: str) -> dict[str, Any]:
        total, prefix = self.input_tokens(params)
        creation = read = 0
        if prefix:
            key = hashlib.sha256(json.dumps([params.get("tools"), params.get("system")]).encode()).hexdigest()
            ttl = 3600.0 if any((b.get("cache_control") or {}).get("ttl") == "1h" for b in params["system"]) else 300.0
            with self._lock:
                if self._prompt_cache.get(key, 0.0) > time.monotonic():
                    read = prefix
                else:
                    creation = prefix
                self._prompt_cache[key] = time.monotonic() + ttl
        output = sum(count_tokens(_text_of([block])) for block in content) + 8
        return {
            "input_tokens": total - creation - read,
            "output_tokens": output,
            "cache_creation_input_tokens": creation,
            "cache_read_input_tokens": read,
            "service_tier": tier,
        }

    # -- request validation (what the real API rejects with 400) -----------------------------------------------

    def check_message_params(self, params: Any) -> None:
        if not isinstance(params, dict):
            raise _ApiError(400, "request body must be a JSON object")
        for name in ("model", "max_tokens", "messages"):
            if name not in params:
                raise _ApiError(400, f"{name}: Field required")
        unknown = set(params) - {
            "model",
            "max_tokens",
            "messages",
            "system",
            "tools",
            "tool_choice",
            "metadata",
            "stop_sequences",
            "cache_control",
            "service_tier",
            "thinking",
            "output_config",
        }
        if unknown:
            raise _ApiError(400, f"{sorted(unknown)[0]}: Extra inputs are not permitted")
        if params["model"] not in self.models:
            raise _ApiError(404, f"model: {params['model']}")
        if not isinstance(params["max_tokens"], int) or params["max_tokens"] < 1:
            raise _ApiError(400, "max_tokens: must be a positive integer")
        messages = params["messages"]
        if not messages or messages[0].get("role") != "user":
            raise _ApiError(400, "messages: first message must use the user role")
        for before, after in itertools.pairwise(messages):
            if before.get("role") == after.get("role"):
                raise _ApiError(400, "messages: roles must alternate between user and assistant")
        tools = {t.get("name"): t for t in params.get("tools", [])}
        choice = params.get("tool_choice") or {}
        if choice.get("type") != "tool" or choice.get("name") not in tools:
            raise _ApiError(400, "tool_choice: this fake only serves forced tool calls")
        for block in params.get("system") or []:
            ttl = (block.get("cache_control") or {}).get("ttl", "5m")
            if ttl not in ("5m", "1h"):
                raise _ApiError(400, "system.cache_control.ttl: must be '5m' or '1h'")

    # -- batches ------------------------------------------------------------------------------------------------

    def create_batch(self, body: Any) -> dict:
        requests = body.get("requests") if isinstance(body, dict) else None
        if not requests:
            raise _ApiError(400, "requests: must be a non-empty list")
        ids = [r.get("custom_id", "") for r in requests]
        if len(set(ids)) != len(ids) or not all(_CUSTOM_ID.match(i) for i in ids):
            raise _ApiError(400, "requests: custom_id values must be unique and match ^[a-zA-Z0-9_-]{1,64}$")
        for request in requests:
            self.check_message_params(request.get("params"))
        batch = _Batch(
            id=self._next_id("msgbatch"),
            created=time.monotonic(),
            created_at=_now_iso(),
            expires_at=_now_iso(86400),
            requests=requests,
        )
        with self._lock:
            self.batches[batch.id] = batch
        return self.batch_view(batch)

    def _finish(self, batch: _Batch) -> None:
        with self._batch_lock:
            if batch.results is None and (batch.canceled or time.monotonic() - batch.created >= self.batch_latency_s):
                batch.results = self._results(batch)

    def _results(self, batch: _Batch) -> list[dict[str, Any]]:
        results = []
        for request in batch.requests:
            text = json.dumps(request["params"], ensure_ascii=False)
            fault = self._take(self._batch_faults, "", text)
            if batch.canceled:
                result: dict[str, Any] = {"type": "canceled"}
            elif fault is not None and fault.kind == "errored":
                error = {"type": fault.error_type, "message": f"fake {fault.error_type}"}
                result = {"type": "errored", "error": {"type": "error", "error": error}}
            elif fault is not None:
                result = {"type": fault.kind}
            else:
                malformed = self._take(self._faults, "/v1/messages", text, kinds={"malformed"})
                message = self.judge(request["params"], tier="batch", fault=malformed)
                result = {"type": "succeeded", "message": message}
            results.append({"custom_id": request["custom_id"], "result": result})
        self._rng.shuffle(results)  # the API returns results in any order
        return results

    def batch_view(self, batch: _Batch) -> dict:
        self._finish(batch)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if batch.results is None:
            counts["processing"] = len(batch.requests)
        else:
            for item in batch.results:
                counts[item["result"]["type"]] += 1
        ended = batch.results is not None
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": "ended" if ended else ("canceling" if batch.canceled else "in_progress"),
            "request_counts": counts,
            "created_at": batch.created_at,
            "expires_at": batch.expires_at,
            "ended_at": _now_iso() if ended else None,
            "cancel_initiated_at": _now_iso() if batch.canceled else None,
            "archived_at": None,
            "results_url": f"{self.url}/v1/messages/batches/{batch.id}/results" if ended else None,
        }


def _scale_of(tool: dict[str, Any]) -> tuple[int, int]:
    first = next(iter(tool["input_schema"]["properties"].values()))
    if first["properties"]["score"].get("enum"):
        return min(first["properties"]["score"]["enum"]), max(first["properties"]["score"]["enum"])
    found = re.search(r"(-?\d+)\D+?(-?\d+)", first["properties"]["score"].get("description", ""))
    return (int(found.group(1)), int(found.group(2))) if found else (1, 10)


def _between(text: str, start: str, end: str) -> str | None:
    i, j = text.find(start), text.rfind(end)
    return text[i + len(start) : j].strip() if i >= 0 and j > i else None


def _malform(content: list[dict], kind: str, dimensions: list[str], hi: int) -> tuple[list[dict], str]:
    judgment = content[0]["input"]
    if kind == "missing_dimension":
        judgment.pop(dimensions[-1])
    elif kind == "out_of_range":
        judgment[dimensions[0]]["score"] = hi + 5
    elif kind == "not_integer":
        judgment[dimensions[0]]["score"] = "seven"
    elif kind == "text_only":
        return [{"type": "text", "text": "I would rate this reply highly overall."}], "end_turn"
    elif kind == "max_tokens":
        judgment.clear()
        return content, "max_tokens"
    else:
        raise ValueError(f"unknown malformed kind {kind!r}")
    return content, "tool_use"


class _Handler(BaseHTTPRequestHandler):
    fake: FakeAnthropic
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        fake = self.fake
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = self.path.split("?", 1)[0]
        record = Recorded(method, path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
        with fake._lock:
            fake.requests.append(record)
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            self._respond(record, raw)
        finally:
            with fake._lock:
                fake.in_flight -= 1
            record.ended = time.monotonic()

    def _respond(self, record: Recorded, raw: bytes) -> None:
        fake = self.fake
        fault = fake._take(
            fake._faults, record.path, raw.decode("utf-8", "replace"), kinds=MESSAGE_FAULTS - {"malformed"}
        )
        record.fault = fault.kind if fault else None
        time.sleep(fake.latency_s + (fault.delay_s if fault and fault.kind == "slow" else 0.0))
        try:
            if fault is not None and fault.kind.isdigit():
                headers = {"retry-after": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                raise _ApiError(int(fault.kind), f"fake {fault.kind}", headers=headers)
            self._authenticate()
            status, payload, content_type = self._route(record)
        except _ApiError as exc:
            error = {"type": "error", "error": {"type": exc.error_type, "message": exc.message}}
            self._send(record, exc.status, json.dumps(error).encode(), "application/json", exc.headers)
            return
        data = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
        if fault is not None and fault.kind == "html200":
            self._send(record, 200, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
            return
        if isinstance(payload, dict) and "usage" in payload:
            if fault is not None and fault.kind == "bad_usage":
                payload["usage"].update(fault.usage or {})
                data = json.dumps(payload, ensure_ascii=False).encode()
            record.usage = payload["usage"]
        if fault is not None and fault.kind == "drop":
            self._send_torn(record, status, data, content_type)
        else:
            self._send(record, status, data, content_type)

    def _authenticate(self) -> None:
        key = self.headers.get("x-api-key") or ""
        bearer = self.headers.get("authorization") or ""
        if bearer.lower().startswith("bearer "):
            key = key or bearer[7:].strip()
        if key != self.fake.api_key:
            raise _ApiError(401, "invalid x-api-key")

    def _route(self, record: Recorded) -> tuple[int, Any, str]:
        fake, path, body = self.fake, record.path, record.body
        if record.method == "POST" and path == "/v1/messages":
            fake.check_message_params(body)
            malformed = fake._take(fake._faults, path, json.dumps(body, ensure_ascii=False), kinds={"malformed"})
            return 200, fake.judge(body, fault=malformed), "application/json"
        if record.method == "POST" and path == "/v1/messages/count_tokens":
            if not isinstance(body, dict) or "messages" not in body or "model" not in body:
                raise _ApiError(400, "model and messages are required")
            if body["model"] not in fake.models:
                raise _ApiError(404, f"model: {body['model']}")
            return 200, {"input_tokens": fake.input_tokens(body)[0]}, "application/json"
        if record.method == "POST" and path == "/v1/messages/batches":
            return 200, fake.create_batch(body), "application/json"
        if record.method == "GET" and path == "/v1/messages/batches":
            views = [fake.batch_view(b) for b in sorted(fake.batches.values(), key=lambda b: -b.created)]
            first, last = (views[0]["id"], views[-1]["id"]) if views else (None, None)
            return 200, {"data": views, "has_more": False, "first_id": first, "last_id": last}, "application/json"
        found = re.fullmatch(r"/v1/messages/batches/([\w-]+)(/results|/cancel)?", path)
        if found and found.group(1) in fake.batches:
            batch = fake.batches[found.group(1)]
            if found.group(2) == "/cancel" and record.method == "POST":
                batch.canceled = True
                return 200, fake.batch_view(batch), "application/json"
            if found.group(2) == "/results" and record.method == "GET":
                if fake.batch_view(batch)["processing_status"] != "ended":
                    raise _ApiError(400, f"batch {batch.id} is still processing; results are not available yet")
                lines = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in batch.results or [])
                return 200, lines.encode(), "application/binary"
            if found.group(2) is None and record.method == "GET":
                return 200, fake.batch_view(batch), "application/json"
        raise _ApiError(404, f"no route {record.method} {path}")

    def _send(self, record: Recorded, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        record.status = status
        try:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.send_header("request-id", f"req_{id(record):x}")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
            record.delivered = True
        except OSError:  # the client went away (killed mid-request): nothing was delivered
            self.close_connection = True

    def _send_torn(self, record: Recorded, status: int, data: bytes, content_type: str) -> None:
        """Announce the whole body, send half of it, and drop the connection."""
        record.status = status
        try:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True
