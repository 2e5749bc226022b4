"""The ``fluent-reward`` command: one thin subcommand per stage.

Each subcommand loads ``params.yaml`` (or ``--params PATH``), calls the stage's pure function, and turns a
FluentRewardError into a message on stderr and an exit code, never a traceback. Heavy imports (torch, the SDK)
happen inside the commands so ``fluent-reward --help`` and ``validate`` start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fluent_reward.config import DEFAULT_PARAMS, Params, load_params
from fluent_reward.errors import FluentRewardError

log = logging.getLogger("fluent_reward")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, show_time=False, markup=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler])
    for noisy in ("httpx", "httpx2", "anthropic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------------------------
# validate


def cmd_validate(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.data import run_validate

    cfg = params.validate_
    if args.on_error:
        cfg = cfg.model_copy(update={"on_error": args.on_error})
    run_validate(
        Path(args.input or params.data.conversations),
        Path(args.output or params.data.validated),
        params.data.validation_metrics,
        cfg,
    )


def add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check the input records and write them normalised (JSONL)")
    p.add_argument("--input", help="input file (default: data.conversations)")
    p.add_argument("--output", help="normalised JSONL (default: data.validated)")
    p.add_argument("--on-error", choices=["fail", "drop"], help="override validate.on_error")
    p.set_defaults(func=cmd_validate)


# ----------------------------------------------------------------------------------------------------------------
# outputs: where everything is (printed at the end of `make repro`)

HEADLINE_METRICS = ("overall.spearman", "pairwise_accuracy", "best_of_n_agreement", "baseline.tfidf_ridge.spearman")


def cmd_outputs(params: Params, args: argparse.Namespace) -> None:
    import json

    for key, path in params.data.model_dump().items():
        mark = "ok " if Path(path).exists() else "-- "
        print(f"{mark} {key:<20} {path}")
    metrics_path = params.data.eval_metrics
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in HEADLINE_METRICS if isinstance(metrics.get(k), float))
        print(f"test split: {shown}  (all: {metrics_path}, report: {params.data.report})")


def add_outputs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("outputs", help="list the pipeline's outputs and the headline metrics")
    p.set_defaults(func=cmd_outputs)


# ----------------------------------------------------------------------------------------------------------------
# Subcommands of later stages register here, each in its own block: add_<name>(sub) + cmd_<name>(params, args).

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [add_validate, add_outputs]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluent-reward", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="settings file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        params = load_params(args.params)
        args.func(params, args)
    except FluentRewardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: work done so far is saved; rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
