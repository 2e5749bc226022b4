"""The command line as a user meets it: bad values, file-system failures and kills end in one clear line, never a
traceback; options work before or after the subcommand; a closed pipe ends quietly."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fluent_reward.cli import main
from fluent_reward.config import load_params
from fluent_reward.data import load_judged_records
from fluent_reward.errors import FluentRewardError
from fluent_reward.io import atomic_open, remove_stale_temps, write_json
from tests.support import write_project_params

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"context": "Tutor: Hola.", "student_message": "¿Cómo se dice 'cat'?", "tutor_response": "«Gato»."}
CLI = [sys.executable, "-m", "fluent_reward.cli"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """params.yaml (rubric inlined) with every data path under tmp_path; cwd = tmp_path."""
    write_project_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _records(n: int) -> str:
    return "".join(json.dumps({**GOOD, "id": f"r{i}", "tutor_response": f"«Gato» {i}."}) + "\n" for i in range(n))


def run(project: Path, *args: str) -> int:
    return main(["--params", str(project / "params.yaml"), *args])


# --- file-system failures: messages, not tracebacks ------------------------------------------------------------


def test_disk_full_is_a_message_and_the_old_output_survives(project, monkeypatch, capsys):
    (project / "in.jsonl").write_text(_records(3), encoding="utf-8")
    out = project / "out.jsonl"
    out.write_text("previous\n", encoding="utf-8")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fluent_reward.io.os.fsync", no_space)
    assert run(project, "validate", "--input", "in.jsonl", "--output", str(out)) == 2
    assert f"{out}: disk full (no space left on device) while writing; the previous file is untouched" in (
        capsys.readouterr().err
    )
    assert out.read_text(encoding="utf-8") == "previous\n"
    assert list(project.glob(".out.jsonl.*.tmp")) == []


def test_output_that_is_a_directory(project, capsys):
    (project / "in.jsonl").write_text(_records(2), encoding="utf-8")
    (project / "outdir").mkdir()
    assert run(project, "validate", "--input", "in.jsonl", "--output", "outdir") == 2
    assert "outdir: is a directory; give the path of a file to write" in capsys.readouterr().err


def test_output_under_a_file_is_a_message(project, capsys):
    (project / "in.jsonl").write_text(_records(2), encoding="utf-8")
    (project / "afile").write_text("x", encoding="utf-8")
    assert run(project, "validate", "--input", "in.jsonl", "--output", "afile/out.jsonl") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "afile" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", r"judgments\.json: not valid JSON \(Expecting property name .* line 1, column 2\)"),
        (b"\xff\xfe garbage", r"judgments\.json: not UTF-8 text \(byte 1\)"),
        (b"[1, 2]", r'judgments\.json: expected an object with a "judgments" list'),
        (b'{"judgments": [7]}', r'judgments\.json: judgment 1: expected an object with an "id" and "scores"'),
        (b'{"judgments": [{"id": "r0", "scores": {}}]}', r"judgment 1 \(id=r0\): score \w+=None is not a number"),
        (b'{"judgments": [{"id": "r0", "scores": "high"}]}', r'judgment 1 \(id=r0\): "scores" must be an object'),
        (b"[" * 10000 + b"]" * 10000, r"judgments\.json: JSON nested too deeply"),
    ],
)
def test_garbage_judgments_file_is_a_message(project, content, message):
    (project / "validated.jsonl").write_text(_records(1), encoding="utf-8")
    (project / "judgments.json").write_bytes(content)
    rubric = load_params(project / "params.yaml").rubric
    with pytest.raises(FluentRewardError, match=message):
        load_judged_records(project / "validated.jsonl", project / "judgments.json", rubric)


@pytest.mark.parametrize(
    "bad",
    [lambda s: float("nan"), lambda s: s.max + 1, lambda s: s.min - 0.5, lambda s: True],
    ids=["nan", "above-the-scale", "below-the-scale", "boolean"],
)
def test_non_finite_or_off_scale_judgment_scores_are_refused(project, bad):
    rubric = load_params(project / "params.yaml").rubric
    (project / "validated.jsonl").write_text(_records(1), encoding="utf-8")
    last = rubric.names[-1]
    scores = dict.fromkeys(rubric.names, rubric.scale.min) | {last: bad(rubric.scale)}
    write_json(project / "j.json", {"judgments": [{"id": "r0", "scores": scores}]})
    with pytest.raises(FluentRewardError, match=rf"score {last}=.* is not a number on the scale"):
        load_judged_records(project / "validated.jsonl", project / "j.json", rubric)


def test_garbage_judgments_through_the_cli(project, capsys):
    (project / "validated.jsonl").write_text(_records(1), encoding="utf-8")
    (project / "judgments.json").write_text("<html>502 Bad Gateway</html>", encoding="utf-8")
    args = ["--validated", "validated.jsonl", "--judgments", "judgments.json", "--output", "pairs.jsonl"]
    assert run(project, "pairs", "--no-progress", *args) == 2
    assert "judgments.json: not valid JSON (Expecting value at line 1, column 1)" in capsys.readouterr().err


def test_damaged_validated_file_names_the_line(project):
    rubric = load_params(project / "params.yaml").rubric
    (project / "validated.jsonl").write_text(_records(2) + '{"id": "torn', encoding="utf-8")
    write_json(project / "j.json", {"judgments": []})
    with pytest.raises(FluentRewardError, match=r"validated\.jsonl: line 3 is not a JSON object \(damaged file\?"):
        load_judged_records(project / "validated.jsonl", project / "j.json", rubric)


def test_non_utf8_params_through_the_cli(project, capsys):
    path = project / "params.yaml"
    path.write_bytes(b"# caf\xe9\n" + path.read_bytes())
    assert run(project, "validate") == 2
    assert "params.yaml: not UTF-8: byte 0xe9 at line 1" in capsys.readouterr().err


# --- bad option values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "--input", "x", "--output", "y", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["score", "--input", "x", "--output", "y", "--chunk-size", "-5"], "--chunk-size: must be at least 1, got -5"),
        (["pairs", "--min-gap", "nan"], "--min-gap: must be a finite number >= 0, got nan"),
        (["pairs", "--min-gap", "-1"], "--min-gap: must be a finite number >= 0, got -1"),
        (["pairs", "--min-gap", "inf"], "--min-gap: must be a finite number >= 0, got inf"),
        (["train", "--epochs", "0"], "--epochs: must be at least 1, got 0"),
    ],
)
def test_bad_option_values_are_refused(project, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run(project, *args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_refuses_max_length_beyond_the_backbone_before_any_work(project, capsys):
    from tests.support import make_tiny_backbone

    backbone = make_tiny_backbone(project / "backbone")  # 512 positions
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["train"].update(backbone=str(backbone), max_length=1024)
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    assert run(project, "train", "--no-progress") == 2  # no validated records exist: it stopped before reading
    err = capsys.readouterr().err
    assert "train.max_length=1024 is more than the backbone" in err and "set train.max_length to at most 512" in err


# --- killed writers leave no temporary files behind -----------------------------------------------------------


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "out.jsonl"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.jsonl.{dead.stdout.strip()}-abc123.tmp"
    legacy = tmp_path / ".out.jsonl.k2j3h4.tmp"  # the naming before temp names carried the pid
    live = tmp_path / f".out.jsonl.{os.getpid()}-zzz.tmp"  # a writer still running: never touched
    other = tmp_path / ".other.jsonl.1-abc.tmp"  # another output's temp: not ours to judge
    for path in (stale, legacy, live, other):
        path.write_text("partial", encoding="utf-8")
    with atomic_open(out) as handle:
        handle.write("done\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, other.name])
    assert remove_stale_temps(out) == []


def test_a_killed_validate_run_leaves_nothing_after_the_next_run(project):
    """SIGKILL in the middle of writing (no cleanup can run), then a rerun: the orphaned temp file is gone."""
    (project / "big.jsonl").write_text(_records(60_000), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    args = [*CLI, "--params", "params.yaml", "validate", "--input", "big.jsonl", "--output", "out.jsonl"]
    proc = subprocess.Popen(args, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(project.glob(".out.jsonl.*.tmp")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    orphans = list(project.glob(".out.jsonl.*.tmp"))
    assert orphans, "the run finished before it could be killed mid-write"
    (project / "small.jsonl").write_text(_records(2), encoding="utf-8")
    assert run(project, "validate", "--input", "small.jsonl", "--output", "out.jsonl") == 0
    assert list(project.glob(".out.jsonl.*.tmp")) == []
    assert len((project / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 2


# --- options, version, pipes, hostile JSON -------------------------------------------------------------------


def test_params_and_verbose_are_accepted_after_the_subcommand(project):
    (project / "in.jsonl").write_text(_records(2), encoding="utf-8")
    params = str(project / "params.yaml")
    assert main(["validate", "--params", params, "-v", "--input", "in.jsonl", "--output", "out.jsonl"]) == 0
    assert len((project / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert main(["--params", "nope.yaml", "validate", "--params", params, "--input", "in.jsonl"]) == 0  # last wins


def test_params_after_the_subcommand_in_a_subprocess(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    proc = subprocess.run(
        [*CLI, "rubric", "--params", str(ROOT / "params.yaml")], cwd=other, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("rubric ") and ", prompt version p-" in proc.stdout, (
        proc.stderr
    )


def test_version(capsys):
    from fluent_reward import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"fluent-reward {__version__}\n"


def test_a_closed_pipe_ends_quietly():
    """`fluent-reward params | head`: the reader is gone before the first write; no traceback, exit 141."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    args = [*CLI, "--params", str(ROOT / "params.yaml"), "params"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # nobody reads: the command's writes hit a broken pipe
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 141
    assert stderr == ""


def test_head_on_a_real_shell_pipe():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = f"{sys.executable} -m fluent_reward.cli --params params.yaml params | head -n 1"
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "## `data`\n" and proc.stderr == ""


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl"])
def test_ten_thousand_deep_json_is_a_message(project, capsys, name):
    deep = "[" * 10_000 + "]" * 10_000
    content = deep if name.endswith(".json") else json.dumps(GOOD) + "\n" + deep + "\n"
    (project / name).write_text(content, encoding="utf-8")
    assert run(project, "validate", "--input", name, "--output", "out.jsonl") == 2
    err = capsys.readouterr().err
    assert f"{name}: " in err and "JSON nested too deeply to parse" in err and "RecursionError" not in err


def test_ten_thousand_deep_json_in_a_subprocess_has_no_traceback(project):
    (project / "deep.json").write_text("[" * 10_000 + "]" * 10_000, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [*CLI, "validate", "--input", "deep.json"], cwd=project, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "deep.json: JSON nested too deeply to parse" in proc.stderr


def test_outputs_names_a_damaged_metrics_file_without_a_traceback(project, capsys):
    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics" / "metrics.json").write_text('{"overall.spea', encoding="utf-8")
    assert main(["outputs"]) == 2
    err = capsys.readouterr().err
    assert "metrics.json: not valid JSON" in err and "Traceback" not in err
