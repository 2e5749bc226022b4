"""The judge stage: Claude scores every validated record against the rubric; cached, resumable, cost-aware.

What gets sent where, and why:

- Records covered by the files in ``judge.reference_dir`` (by content, else by id) are taken as they are: never sent.
- Every other record needs ``judge.samples`` judgments. Each is keyed by a hash of (the rendered user message, the
  model, ``prompt_version``, the sample index) and looked up in the append-only JSONL cache (``data.judge_cache``),
  which is fsync'ed after every judgment: a run killed at any moment loses at most the calls in flight.
- What remains is judged with ``messages`` (concurrent requests) or ``batch`` (Message Batches, half price); every
  reply is validated client-side (all dimensions, integer scores on the scale) and re-asked when invalid.
- ``data.judgments`` (one entry per record, in the order of the validated file) and ``data.judge_metrics`` are
  written from the reference files and the cache only, so what was paid for is never lost and never paid twice.

The API key is read from the environment or ``.env`` and handed to the SDK; it is never logged nor written.

One module per concern:

| module | owns |
|---|---|
| ``prompt`` | the ``Prompt`` (system blocks, forced tool, request params) and the local token estimate |
| ``reply`` | validating a reply (``parse_judgment``) and the re-ask conversation |
| ``reference`` | judgments supplied by file (``judge.reference_dir``) |
| ``cache`` | the append-only JSONL cache, its keys, the one-judge-per-cache lock |
| ``plan`` | what is supplied, cached, and still to judge |
| ``cost`` | usage, prices, the run's tally, the budget |
| ``client`` | key and base URL, the SDK client and middleware, retries and the shared rate-limit pause |
| ``context`` | ``JudgeContext`` (settings of one invocation) and ``Run`` (state of one run against the API) |
| ``progress`` | the progress bar |
| ``messages`` | messages mode |
| ``batch`` | batch mode and its ledger |
| ``estimate`` | the dry run |
| ``outputs`` | ``data.judgments``, ``data.judge_metrics``, test-retest agreement |
| ``stage`` | ``run_judge``: the stage from start to end |
"""

from fluent_reward.judge.cache import JudgeCache, exclusive_lock, judgment_key
from fluent_reward.judge.client import ClientFactory, default_client_factory, resolve_api_settings
from fluent_reward.judge.estimate import Estimate
from fluent_reward.judge.outputs import JudgeSummary
from fluent_reward.judge.plan import Plan, Unit, make_plan
from fluent_reward.judge.prompt import Prompt
from fluent_reward.judge.reference import load_reference, reference_files
from fluent_reward.judge.reply import InvalidOutput, parse_judgment
from fluent_reward.judge.stage import run_judge

__all__ = [
    "ClientFactory",
    "Estimate",
    "InvalidOutput",
    "JudgeCache",
    "JudgeSummary",
    "Plan",
    "Prompt",
    "Unit",
    "default_client_factory",
    "exclusive_lock",
    "judgment_key",
    "load_reference",
    "make_plan",
    "parse_judgment",
    "reference_files",
    "resolve_api_settings",
    "run_judge",
]
