"""Every fenced block of README.md and docs/*.md shows what the code really does (issue 11, item 12).

One test per block, by kind:

- ``python``: executed, in file order with one namespace per file (as a reader follows a page), in a temporary
  project whose ``data.model_dir`` holds a tiny model with the rubric's dimensions (tests/support.py), with the
  bundled sample validated, judged (from its reference folder) and paired there. Names a page uses without defining
  them are the reader's own data, preset from the sample (``presets``). A statement commented ``# -> TYPE ...``
  must produce a TYPE (``float``, ``list[float]``, ...); a comment that shows a bare number fails (the tiny model
  cannot reproduce the real model's numbers: show the type, not a value).
- ``bash`` (and ``$ `` lines of plain blocks): every command is checked against the real tool: ``fluent-reward``
  (also under ``accelerate launch`` / ``torchrun`` / ``python -m``) parses with ``cli.build_parser()``; ``dvc``
  parses with DVC's own parser and names stages, files, params keys and artifacts that exist (``-S`` values are
  loaded through ``config.load_params``); ``make`` targets, ``pip`` extras, scripts and their ``--options`` exist.
- ``json`` / ``yaml``: parse; ``<!-- doc-test: valid-record -->`` passes the real validator and
  ``<!-- doc-test: validated-output -->`` equals its normalised output (``"..."`` stands for any value);
  ``<!-- doc-test: score-row -->`` has exactly the keys of a row ``fluent-reward score`` writes.
- ``<!-- doc-test: tree -->``: a repository tree; every path and file it names exists, and it names every module.
- ``<!-- doc-test: skip (reason) -->`` right before a block skips it, visibly (``pytest -rs`` lists the reasons).
  A block of any other kind fails until it is marked.

Besides the blocks: commands quoted inline in the prose parse the same way (their required options may be left out),
and docs/ARCHITECTURE.md's module table has a row for every module.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fluent_reward import cli
from fluent_reward.config import load_params, read_yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*([\w-]+)\s*(?:\((.+)\))?\s*-->\s*$")
TYPE_COMMENT = re.compile(r"#\s*->\s*([A-Za-z_][\w\[\], ]*?)(?::|\s|$)")
NUMBER_COMMENT = re.compile(r"#\s*(?:->\s*)?[-+]?\d+(?:\.\d+)?\s*$")
MARKERS = {"skip", "valid-record", "validated-output", "score-row", "tree"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None
    reason: str | None

    @property
    def name(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"


def collect_blocks(page: Path) -> list[Block]:
    """Fenced blocks of a Markdown page, each with the ``doc-test`` marker on the last non-blank line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, end = len(fence.group(1)), i + 1
        while not lines[end].strip().startswith("```"):
            end += 1
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        marker = MARKER.match(before)
        body = "\n".join(line[indent:] for line in lines[i + 1 : end])
        blocks.append(Block(page, i + 1, fence.group(2), body, marker and marker.group(1), marker and marker.group(2)))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in collect_blocks(page)]


# ----------------------------------------------------------------------------------------------------------------
# The temporary project (python blocks, score rows)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project like a user's clone after ``make repro``, with a tiny model: params, sample, judgments, pairs."""
    from fluent_reward.inference import DEFAULT_MODEL_DIR
    from tests.support import make_tiny_model_folder

    root = tmp_path_factory.mktemp("doc_project")
    for name in ("params.yaml", "rubric.yaml"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "data" / "sample", root / "data" / "sample")
    params = load_params(root / "params.yaml")
    assert str(params.data.model_dir) == DEFAULT_MODEL_DIR  # the scorer's default is the pipeline's model folder
    rubric = params.rubric
    make_tiny_model_folder(
        root / params.data.model_dir, list(rubric.dimensions), weights=dict(rubric.weights), max_length=256
    )
    with working_dir(root):
        for command in (["validate"], ["judge", "--no-progress"], ["pairs", "--no-progress"]):
            assert cli.main(command) == 0, command
    return root


@pytest.fixture(scope="module")
def exported(project) -> Path:
    """What the page's ``fluent-reward export --output models/export`` writes, in the project."""
    pytest.importorskip("onnxruntime")
    with working_dir(project):
        assert cli.main(["export", "--output", "models/export"]) == 0
    return project / "models" / "export"


def presets(root: Path) -> dict[str, Any]:
    """The reader's own data, which the pages use without defining it: records of the bundled sample."""
    rows = [json.loads(line) for line in (root / "data" / "validated.jsonl").read_text(encoding="utf-8").splitlines()]
    group = [r for r in rows if r["group_id"] == rows[0]["group_id"]]
    replies = iter([r["tutor_response"] for r in rows] * 10)
    return {
        "contexts": [r["context"] for r in rows[:6]],
        "responses": [r["tutor_response"] for r in rows[:6]],
        "student_messages": [r["student_message"] for r in rows[:6]],
        "students": [r["student_message"] for r in rows[:6]],
        "context": group[0]["context"],
        "student_message": group[0]["student_message"],
        "candidates": [r["tutor_response"] for r in group],
        "llm_reply": lambda context, student: next(replies),
    }


@pytest.fixture(scope="module")
def trl_presets(project, tmp_path_factory) -> dict[str, Any]:
    """A tiny local policy, its tokenizer and a prompt dataset, for the pages' TRL trainer calls."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.support import make_tiny_causal_lm

    folder = make_tiny_causal_lm(tmp_path_factory.mktemp("policy"))
    data = presets(project)
    prompts = [[{"role": "user", "content": m}] for m in data["student_messages"]]
    return {
        "policy": AutoModelForCausalLM.from_pretrained(folder),
        "tokenizer": AutoTokenizer.from_pretrained(folder),
        "prompts": Dataset.from_dict({"prompt": prompts}),
    }


@contextlib.contextmanager
def working_dir(path: Path):
    """``contextlib.chdir`` (Python 3.11+) for 3.10."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


NAMESPACES: dict[Path, dict[str, Any]] = {}
DONE: dict[Path, set[int]] = {}


def check_type(value: Any, spec: str, where: str) -> None:
    spec = spec.strip()
    outer, _, inner = spec.partition("[")
    assert type(value).__name__ == outer, f"{where}: shows `-> {spec}`, the code returned {type(value).__name__}"
    if inner:
        item = inner.rstrip("]")
        for element in value:
            check_type(element, item, where)


def run_python(block: Block, namespace: dict[str, Any]) -> None:
    """Execute a block statement by statement; check each ``# -> TYPE`` comment against the value produced."""
    source_lines = block.text.splitlines()
    for number, line in enumerate(source_lines, block.line + 1):
        assert not NUMBER_COMMENT.search(line), (
            f"{block.page.name}:{number}: a comment shows a number ({line.strip()}); show the type (`# -> float`)"
        )
    tree = ast.parse(block.text, filename=block.name)
    for stmt in tree.body:
        where = f"{block.page.name}:{block.line + stmt.lineno}"
        if isinstance(stmt, ast.Expr):
            value = eval(compile(ast.Expression(stmt.value), where, "eval"), namespace)
            shown = TYPE_COMMENT.search(source_lines[stmt.end_lineno - 1])
            if shown:
                check_type(value, shown.group(1), where)
        else:
            exec(compile(ast.Module([stmt], type_ignores=[]), where, "exec"), namespace)


def run_python_page_upto(block: Block, root: Path, extra: dict[str, Any]) -> None:
    """Run the page's earlier python blocks first (once), then this one: a page is read top to bottom."""
    namespace = NAMESPACES.setdefault(block.page, {"__name__": "__doc__", **presets(root)})
    namespace.update({k: v for k, v in extra.items() if k not in namespace})
    done = DONE.setdefault(block.page, set())
    for earlier in BLOCKS:
        same_page_before = earlier.page == block.page and earlier.lang == "python" and earlier.line < block.line
        if same_page_before and earlier.line not in done and earlier.marker != "skip":
            run_python(earlier, namespace)
            done.add(earlier.line)
    run_python(block, namespace)
    done.add(block.line)


# ----------------------------------------------------------------------------------------------------------------
# Commands


def relax(parser: argparse.ArgumentParser) -> None:
    """No argument required, in the parser and its subcommands: a command named in prose (`dvc artifacts get`)."""
    for action in parser._actions:
        action.required = False
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                relax(subparser)


def parse_fluent_reward(args: list[str], where: str, partial: bool = False) -> None:
    """Parse with the real parser; ``partial``: a command named in prose may leave out its required options."""
    parser = cli.build_parser()
    if partial:
        relax(parser)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            assert exc.code == 0, f"{where}: `fluent-reward {' '.join(args)}`: {stderr.getvalue().strip()}"


def parse_dvc(args: list[str], where: str, partial: bool = False) -> Any:
    from dvc.cli import DvcParserError
    from dvc.cli.parser import get_main_parser

    parser = get_main_parser()
    if partial:
        relax(parser)
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(args)
        except (SystemExit, DvcParserError):
            pytest.fail(f"{where}: `dvc {' '.join(args)}` is not a valid dvc command: {err.getvalue().strip()[-300:]}")


def pipeline_files() -> dict[str, Any]:
    return {"dvc.yaml": yaml.safe_load((ROOT / "dvc.yaml").read_text()), **_cv_pipeline()}


def _cv_pipeline() -> dict[str, Any]:
    return {"cv/dvc.yaml": yaml.safe_load((ROOT / "cv" / "dvc.yaml").read_text())}


def check_dvc(args: list[str], where: str, tmp_path: Path, partial: bool = False) -> None:
    parsed = parse_dvc(args, where, partial)
    pipelines = pipeline_files()
    stages = set(pipelines["dvc.yaml"]["stages"])
    if parsed.cmd in ("repro", "status") or args[:1] == ["repro"]:
        for target in getattr(parsed, "targets", []) or []:
            file, _, stage = target.rpartition(":")
            ok = target in stages or target in pipelines or (file in pipelines and stage in pipelines[file]["stages"])
            assert ok, f"{where}: `dvc {' '.join(args)}`: no stage or pipeline file {target!r}"
    if getattr(parsed, "set_param", None):
        check_set_params(parsed.set_param, where, tmp_path)
    if args[:2] == ["artifacts", "get"] and parsed.name is not None:
        assert parsed.name in pipelines["dvc.yaml"]["artifacts"], f"{where}: no artifact {parsed.name!r} in dvc.yaml"


def check_set_params(assignments: list[str], where: str, tmp_path: Path) -> None:
    """``dvc exp run -S`` values: applied to a copy of params.yaml / rubric.yaml and loaded by the real loader."""
    files = {name: read_yaml(ROOT / name) for name in ("params.yaml", "rubric.yaml")}
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        file, _, key = key.rpartition(":")
        node = files[file or "params.yaml"]
        *parents, last = key.split(".")
        for part in parents:
            assert isinstance(node, dict) and part in node, f"{where}: -S {assignment}: no key {key!r} in {file}"
            node = node[part]
        assert last in node, f"{where}: -S {assignment}: no key {key!r} in {file or 'params.yaml'}"
        node[last] = yaml.safe_load(value)
    for name, content in files.items():
        (tmp_path / name).write_text(yaml.safe_dump(content, allow_unicode=True), encoding="utf-8")
    load_params(tmp_path / "params.yaml")


def check_script(argv: list[str], where: str) -> None:
    script = ROOT / argv[0]
    assert script.is_file(), f"{where}: {argv[0]} does not exist"
    text = script.read_text(encoding="utf-8")
    for option in (a.split("=")[0] for a in argv[1:] if a.startswith("--")):
        assert f'"{option}"' in text, f"{where}: {argv[0]} has no option {option}"


def check_pip(argv: list[str], where: str) -> None:
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = re.findall(r"^([\w-]+) = \[", section, re.M)
    for arg in argv:
        wanted = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
        for extra in wanted.group(1).split(",") if wanted else []:
            assert extra in extras, f"{where}: pip extra {extra!r} is not in pyproject.toml"


def check_command(argv: list[str], where: str, tmp_path: Path, partial: bool = False) -> None:
    program = Path(argv[0]).name
    if program == "fluent-reward":
        parse_fluent_reward(argv[1:], where, partial)
    elif "fluent_reward.cli" in argv and program in ("accelerate", "torchrun", "python"):
        parse_fluent_reward(argv[argv.index("fluent_reward.cli") + 1 :], where)
    elif program == "dvc":
        check_dvc(argv[1:], where, tmp_path, partial)
    elif program == "python":
        check_script(argv[1:], where)
    elif program == "pip":
        check_pip(argv, where)
    elif program == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in argv[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{where}: no make target {target!r}"
    elif program == "cp":
        assert (ROOT / argv[1]).exists(), f"{where}: {argv[1]} is not in the repository"
    elif program == "gto":
        artifacts = pipeline_files()["dvc.yaml"]["artifacts"]
        assert argv[2] in artifacts, f"{where}: no artifact {argv[2]!r} in dvc.yaml"
    elif program == "time":
        check_command(argv[1 + (argv[1] == "-v") :], where, tmp_path)
    elif program not in ("export", "git"):
        pytest.fail(f"{where}: no check for `{program}` commands: check it here or mark the block doc-test: skip")


def split_commands(line: str) -> list[list[str]]:
    """One shell line -> its simple commands (split at && || | ;), redirections dropped, $VARS as placeholders."""
    line = re.sub(r"\$\{?\w+\}?", "PLACEHOLDER", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current, tokens = [], [], list(lexer)
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
        elif token in (">", ">>", "<", "2>"):
            skip_next = True
        elif set(token) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def shell_lines(text: str, prompt_only: bool) -> list[tuple[int, str]]:
    """(offset, command line) pairs; with prompt_only, only ``$ `` lines (a transcript's commands)."""
    out, pending, start = [], "", 0
    for offset, raw in enumerate(text.splitlines(), 1):
        line = raw
        if prompt_only and not pending:
            if not raw.startswith("$ "):
                continue
            line = raw[2:]
        if not pending:
            start = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def check_shell(block: Block, tmp_path: Path, prompt_only: bool) -> int:
    checked = 0
    for offset, line in shell_lines(block.text, prompt_only):
        for argv in split_commands(line):
            check_command(argv, f"{block.page.name}:{block.line + offset}", tmp_path)
            checked += 1
    return checked


# ----------------------------------------------------------------------------------------------------------------
# Data blocks


def parse_json(block: Block) -> Any:
    try:
        return json.loads(block.text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in block.text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            pytest.fail(f"{block.name}: not JSON or JSONL ({exc}); fix it or mark it doc-test: skip (reason)")


def previous_block(block: Block, marker: str) -> Block:
    return next(b for b in reversed(BLOCKS) if b.page == block.page and b.line < block.line and b.marker == marker)


def check_valid_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    from fluent_reward.data import check_record, normalise

    cfg = load_params(ROOT / "params.yaml").validate_
    problems = check_record(record, cfg)
    assert not problems, f"{where}: the record shown as valid is not: {problems}"
    return normalise(record, cfg.group_by)


def matches(shown: Any, real: Any) -> bool:
    """Equal, where ``"..."`` in the doc stands for any value."""
    if shown == "...":
        return True
    if isinstance(shown, dict) and isinstance(real, dict):
        return shown.keys() == real.keys() and all(matches(shown[k], real[k]) for k in shown)
    return shown == real


def check_score_row(shown: Any, root: Path, where: str) -> None:
    """The row shown has the keys (and nested keys) of a row ``fluent-reward score`` really writes."""
    shown = shown[0] if isinstance(shown, list) else shown
    with working_dir(root):
        out = Path("scores.jsonl")
        if not out.exists():
            assert cli.main(["score", "--input", "data/validated.jsonl", "--output", str(out), "--no-progress"]) == 0
        real = json.loads(out.read_text(encoding="utf-8").splitlines()[0])

    def shape(value: Any) -> Any:
        return {k: shape(v) for k, v in value.items()} if isinstance(value, dict) else type(value).__name__

    real_shape = {k: shape(v) for k, v in real.items()}
    shown_shape = {k: shape(v) for k, v in shown.items()}
    shown_shape = json.loads(json.dumps(shown_shape).replace('"int"', '"float"'))
    assert shown_shape == real_shape, f"{where}: the row shown is not shaped like a real one: {real}"
    # weighted_overall is the weighted mean of the row's dimension scores (the model's weights: the rubric's), in the
    # real row and so in the one shown (to the 2 decimals it shows)
    weights = load_params(root / "params.yaml").rubric.weights
    for row, tolerance in ((real, 1e-3), (shown, 0.006)):
        mean = sum(weights[d] * row["scores"][d] for d in weights) / sum(weights.values())
        assert abs(row["weighted_overall"] - mean) <= tolerance, (
            f"{where}: weighted_overall {row['weighted_overall']} but the weighted mean of its scores is {mean:.4f}"
        )


def tree_paths(text: str) -> list[str]:
    """The paths a repository tree names: its entries (indented under a folder entry) and the files its notes name."""
    paths, folder = [], ""
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if indent >= 4:  # a note's continuation line: only the file names in it
            paths += [folder + name for name in re.findall(r"\b([\w-]+\.py)\b", line)]
            continue
        entry, _, note = line.strip().partition(" ")
        if indent == 0:
            folder = entry if entry.endswith("/") else ""
            paths.append(entry)
        else:
            paths.append(folder + entry)
        for name in re.findall(r"\b([\w-]+\.py)\b", note):
            paths.append((folder if indent else entry if entry.endswith("/") else "") + name)
    return paths


def check_tree(block: Block) -> None:
    paths = tree_paths(block.text)
    # a folder the pipeline writes (models/) is absent from a clone: its note says it is gitignored
    outputs = {line.split()[0] for line in block.text.splitlines() if line and "gitignored)" in line}
    missing = [p for p in paths if not (ROOT / p).exists() and p not in outputs]
    assert not missing, f"{block.name}: the tree names paths that do not exist: {missing}"
    package = ROOT / "src" / "fluent_reward"
    modules = [
        p for p in package.iterdir() if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").exists())
    ]
    named = {p.rstrip("/") for p in paths}
    unnamed = [m.name for m in modules if str(m.relative_to(ROOT)) not in named]
    assert not unnamed, f"{block.name}: the tree does not name these modules: {sorted(unnamed)}"


# ----------------------------------------------------------------------------------------------------------------
# The tests


def test_blocks_found_and_markers_known():
    assert len(BLOCKS) > 30
    for block in BLOCKS:
        assert block.marker in MARKERS | {None}, f"{block.name}: unknown doc-test marker {block.marker!r}"
        if block.marker == "skip":
            assert block.reason, f"{block.name}: doc-test: skip needs a reason in parentheses"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block(block: Block, request, tmp_path, monkeypatch):
    if block.marker == "skip":
        pytest.skip(f"{block.name}: {block.reason}")
    lang = block.lang.lower()
    if lang == "python":
        root = request.getfixturevalue("project")
        # what this block and the page's earlier python blocks (run first when this one runs alone) need
        code = "\n".join(b.text for b in BLOCKS if b.page == block.page and b.lang == "python" and b.line <= block.line)
        extra = request.getfixturevalue("trl_presets") if "trl" in code else {}
        if "models/export" in code:
            request.getfixturevalue("exported")
        monkeypatch.chdir(root)
        run_python_page_upto(block, root, extra)
    elif lang in ("bash", "sh", "shell"):
        assert check_shell(block, tmp_path, prompt_only=False), f"{block.name}: no command in a bash block"
    elif block.marker == "tree":
        check_tree(block)
    elif lang in ("", "text"):
        check_shell(block, tmp_path, prompt_only=True)  # a figure or a transcript: its `$ ` lines are commands
    elif lang == "json":
        shown = parse_json(block)
        if block.marker == "valid-record":
            check_valid_record(shown, block.name)
        elif block.marker == "validated-output":
            real = check_valid_record(parse_json(previous_block(block, "valid-record")), block.name)
            shown = shown[0] if isinstance(shown, list) else shown
            assert matches(shown, real), f"{block.name}: the normalised record is really {json.dumps(real)}"
        elif block.marker == "score-row":
            check_score_row(shown, request.getfixturevalue("project"), block.name)
    elif lang == "yaml":
        yaml.safe_load(block.text)
    else:
        pytest.fail(f"{block.name}: no doc-test for ```{block.lang} blocks: add one, or mark it doc-test: skip")


def test_commands_are_checked():
    """The checks themselves fail on what they are there to catch."""
    tmp = Path("/nonexistent")
    with pytest.raises(AssertionError, match="unrecognized arguments: --bogus"):
        check_command(["fluent-reward", "score", "--input", "a", "--output", "b", "--bogus"], "x", tmp)
    with pytest.raises(AssertionError, match="no stage or pipeline file 'trian'"):
        check_command(["dvc", "repro", "trian"], "x", tmp)
    with pytest.raises(pytest.fail.Exception, match="not a valid dvc command"):
        check_command(["dvc", "repro", "--bogus"], "x", tmp)
    with pytest.raises(AssertionError, match=r"no key 'train\.nope'"):
        check_command(["dvc", "exp", "run", "-S", "train.nope=1"], "x", tmp)
    with pytest.raises(AssertionError, match="no option --no-cima"):
        check_command(["python", "bench/scoring.py", "--no-cima"], "x", tmp)
    assert split_commands("git push origin v1 && dvc push  # you") == [["git", "push", "origin", "v1"], ["dvc", "push"]]


def test_set_param_values_are_loaded(tmp_path):
    from fluent_reward.errors import FluentRewardError

    with pytest.raises(FluentRewardError, match="mixed_precision"):
        check_set_params(["train.mixed_precision=maybe"], "x", tmp_path)
    check_set_params(["train.mixed_precision=no", "rubric.yaml:weights.accuracy=0.3"], "x", tmp_path)


def test_python_type_comments_are_checked():
    page = ROOT / "README.md"
    with pytest.raises(AssertionError, match="the code returned int"):
        run_python(Block(page, 1, "python", "1 + 1  # -> float", None, None), {})
    with pytest.raises(AssertionError, match="a comment shows a number"):
        run_python(Block(page, 1, "python", "x = 2.0\nx  # -> 4.85", None, None), {})
    run_python(Block(page, 1, "python", "[1.5, 2.0]  # -> list[float]: scores", None, None), {})


def test_markers_and_trees_are_read(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Intro\n<!-- doc-test: skip (needs an API key) -->\n\n```bash\nfluent-reward judge\n```\n"
        "1. a step:\n   ```python\n   x = 1\n   ```\n",
        encoding="utf-8",
    )
    skipped, step = collect_blocks(page)
    assert (skipped.marker, skipped.reason, skipped.line, skipped.text) == (
        "skip",
        "needs an API key",
        4,
        "fluent-reward judge",
    )
    assert (step.marker, step.lang, step.text) == (None, "python", "x = 1")
    tree = Block(page, 1, "", "src/fluent_reward/\n  nope.py     gone\n", "tree", None)
    with pytest.raises(AssertionError, match=r"do not exist: \['src/fluent_reward/nope\.py'\]"):
        check_tree(tree)


INLINE_COMMAND = re.compile(r"`((?:\.venv/bin/)?(?:fluent-reward|dvc) [^`]+)`")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_inline_commands(page: Path, tmp_path):
    """Commands quoted in the prose (`fluent-reward score --no-clip`, `dvc repro cv/dvc.yaml`) exist as written too.

    A span with a placeholder (``<stage>``, ``...``) shows a form, not a command, and is left out."""
    text = page.read_text(encoding="utf-8")
    for match in INLINE_COMMAND.finditer(text):
        command = match.group(1)
        if "<" in command or "..." in command or "key=value" in command:
            continue
        line = text.count("\n", 0, match.start()) + 1
        for argv in split_commands(command):
            check_command(argv, f"{page.name}:{line}", tmp_path, partial=True)


def test_architecture_names_every_module():
    """docs/ARCHITECTURE.md's module table has a row for every module of the package."""
    table = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    package = ROOT / "src" / "fluent_reward"
    modules = [p.name + ("/" if p.is_dir() else "") for p in package.iterdir() if p.name != "__init__.py"]
    modules = [m for m in modules if m.endswith((".py", "/")) and m != "__pycache__/"]
    missing = [m for m in modules if f"| `{m}` |" not in table]
    assert not missing, f"docs/ARCHITECTURE.md: no row for {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_page_points_outside_the_clone(page: Path):
    """A user's clone has no ../shared (this workplace's datasets): no page may send readers there."""
    lines = [n for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1) if "../shared" in line]
    assert not lines, f"{page.name}: lines {lines} point at ../shared, which a clone does not have"
