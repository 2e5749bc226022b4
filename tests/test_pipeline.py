"""dvc.yaml, params.yaml and the code agree; judgments, judge cache and model round-trip through a DVC remote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fluent_reward.config import load_params
from fluent_reward.io import file_sha256, write_json
from fluent_reward.rubric import render_criteria_doc

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
# A git identity for the commits and tags the tests make (the machine may have none).
_GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
_GIT_ENV |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _has_key(document: dict, dotted: str) -> bool:
    node = document
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("name", list(stages()))
def test_every_stage_calls_the_console_script_and_reads_params_it_lists(name):
    stage = stages()[name]
    assert stage["cmd"].split()[:2] == ["fluent-reward", name]
    listed = []
    for entry in stage.get("params", []):
        listed += entry.items() if isinstance(entry, dict) else [("params.yaml", [entry])]
    missing = [
        f"{file}: {key}"
        for file, keys in listed
        for key in keys
        if not _has_key(yaml.safe_load((ROOT / file).read_text()), key)
    ]
    assert missing == [], f"dvc.yaml stage {name} lists params that the files lack"


def test_the_rubric_file_dvc_tracks_is_the_one_params_yaml_names():
    named = yaml.safe_load((ROOT / "params.yaml").read_text())["rubric"]
    tracked = {
        file for stage in stages().values() for e in stage.get("params", []) if isinstance(e, dict) for file in e
    }
    assert tracked == {named}


def test_every_data_path_in_dvc_yaml_is_templated_from_params():
    text = (ROOT / "dvc.yaml").read_text()
    for key, value in yaml.safe_load((ROOT / "params.yaml").read_text())["data"].items():
        if key != "conversations":
            assert str(value) not in text, f"dvc.yaml writes {value} instead of ${{data.{key}}}"


def test_the_reference_folder_is_a_judge_dependency():
    assert "${judge.reference_dir}" in stages()["judge"]["deps"]


def _dvc(cwd: Path, *args: str) -> str:
    proc = subprocess.run([*DVC, *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _standin_project(root: Path, git: bool) -> tuple[Path, dict[Path, bytes]]:
    """A copy of the project with stand-in outputs committed to DVC (the stages' real work is tested elsewhere;
    these tests are about what DVC shares). Returns the project and its DVC-cached outputs with their bytes."""
    project = root / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", "rubric.yaml"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "sample", project / "data" / "sample")
    if git:
        _git(project, "init", "-q")
    _dvc(project, "init", "-q", *([] if git else ["--no-scm"]))
    _dvc(project, "config", "core.analytics", "false")
    data = load_params(project / "params.yaml").data
    shared = {
        data.validated: b'{"id": "a"}\n',
        data.judgments: '{"judgments": [{"id": "a", "rationale": "¡bien!"}]}\n'.encode(),
        data.judge_cache: b'{"key": "k1", "scores": {}}\n{"key": "k2"',  # a torn last line survives too
        data.judge_batches: b'{"batches": [{"id": "msgbatch_1", "collected": false}], "submitting": null}\n',
        data.splits: b'{"groups": {}}\n',
        data.model_dir / "model.safetensors": bytes(range(256)) * 64,
        data.model_dir / "fluent_reward.json": b'{"dimensions": []}\n',
    }
    committed_in_git = [
        data.validation_metrics,
        data.judge_metrics,
        data.train_metrics,
        data.eval_metrics,
        data.predictions,
        data.report,
        data.test_predictions,
        *(data.plots_dir / name for name in ("scatter.png", "calibration.png", "dimensions.png")),
        data.criteria_doc,
    ]
    for path, content in shared.items():
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_bytes(content)
    for path in committed_in_git:
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text("{}\n")
    # The converted backbone (a train dep) is rebuilt from the installed package, never shared (cache: false).
    (project / data.backbones / "multilingual-e5-small").mkdir(parents=True)
    (project / data.backbones / "multilingual-e5-small" / "config.json").write_text("{}\n")
    _dvc(project, "commit", "--force", "-q")
    return project, shared


def test_judgments_judge_cache_and_model_round_trip_through_a_local_remote(tmp_path):
    """Push the shared outputs to a directory remote, delete them and the cache, pull: byte-identical."""
    project, shared = _standin_project(tmp_path, git=False)
    data = load_params(project / "params.yaml").data
    remote = tmp_path / "remote"
    _dvc(project, "remote", "add", "-d", "local", str(remote))
    _dvc(project, "push", "-q")
    for path in (data.validated, data.judgments, data.judge_cache, data.judge_batches, data.splits):
        (project / path).unlink()
    shutil.rmtree(project / data.model_dir)
    shutil.rmtree(project / ".dvc" / "cache")

    _dvc(project, "pull", "-q")
    for path, content in shared.items():
        assert (project / path).read_bytes() == content, f"{path} differs after pull"


def test_dvc_artifacts_get_finds_the_model_once_a_version_is_registered(tmp_path):
    """README's model-sharing step: `dvc artifacts get` needs a GTO version tag; `gto register` makes one."""
    project, shared = _standin_project(tmp_path, git=True)
    model_dir = load_params(project / "params.yaml").data.model_dir
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "a trained model")
    fetch = [*DVC, "artifacts", "get", str(project), "reward-model", "-o", str(tmp_path / "before")]
    proc = subprocess.run(fetch, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "Unable to find artifact 'reward-model'" in proc.stderr

    gto = [sys.executable, "-c", "from gto.cli import app; app()"]
    subprocess.run([*gto, "register", "reward-model", "--version", "v0.1.0"], cwd=project, env=_GIT_ENV, check=True)
    assert "reward-model@v0.1.0" in subprocess.run(["git", "tag"], cwd=project, capture_output=True, text=True).stdout
    _dvc(tmp_path, "artifacts", "get", str(project), "reward-model", "-o", "model")
    _dvc(tmp_path, "artifacts", "get", str(project), "reward-model", "--rev", "v0.1.0", "-o", "model_v0.1.0")
    for folder in ("model", "model_v0.1.0"):
        for name in ("model.safetensors", "fluent_reward.json"):
            assert (tmp_path / folder / name).read_bytes() == shared[model_dir / name]


# ----------------------------------------------------------------------------------------------------------------
# `dvc exp run -S` on a real, tiny copy of the project


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=_GIT_ENV, check=True, capture_output=True)


def _tiny_repo(root: Path) -> Path:
    """A git + DVC copy of the project whose sample is 16 tiny groups and whose backbone is a tiny BERT."""
    from tests.support import make_judgments, make_records, make_tiny_backbone

    project = root / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", "rubric.yaml", ".gitignore"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    records = make_records(n_groups=16, per_group=4)
    conversations = [{"conversation_id": r["group_id"], **r} for r in records]
    for record in conversations:
        del record["group_id"]
    sample = project / "data" / "sample"
    write_json(sample / "conversations.json", conversations)
    write_json(
        sample / "reference" / "reference_judgments.json", make_judgments(records, load_params(ROOT / "params.yaml"))
    )
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["train"].update(
        backbone=str(make_tiny_backbone(root / "backbone")),
        freeze_layers=1,  # of the tiny backbone's 2 layers
        ngram_embedding_layer=1,  # the n-gram head reads the frozen layer's reply embedding, as by default
        max_length=64,
        epochs=1,
        batch_size=16,
        num_threads=1,
    )
    params["evaluate"].update(bootstrap_samples=100)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    # The tiny backbone replaces the converted multilingual one: drop the stage that builds it (~470 MB) and its dep.
    pipeline = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))
    converted = pipeline["stages"].pop("backbone")["outs"][0]
    pipeline["stages"]["train"]["deps"].remove(next(iter(converted)) if isinstance(converted, dict) else converted)
    (project / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False, allow_unicode=True))
    _git(project, "init", "-q")
    _dvc(project, "init", "-q")
    _dvc(project, "config", "core.analytics", "false")
    return project


def test_dvc_exp_run_set_param_reruns_only_evaluate(tmp_path, monkeypatch):
    """`dvc exp run -S evaluate.min_gap=1.0`, as the README shows: only evaluate reruns, only its metrics change.

    The whole tiny pipeline runs for real (validate, judge from reference judgments, train, evaluate): ~25 s.
    """
    project = _tiny_repo(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(project / "src"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    _dvc(project, "repro", "-q")
    criteria = (project / "docs" / "JUDGING_CRITERIA.md").read_text(encoding="utf-8")  # stage rubric wrote it
    assert criteria == render_criteria_doc(load_params(project / "params.yaml").rubric)
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "tiny pipeline")
    params = load_params(project / "params.yaml")
    untouched = [params.data.validation_metrics, params.data.judge_metrics, params.data.train_metrics]
    untouched += [params.data.model_dir / "model.safetensors", params.data.splits, params.data.judgments]
    before = {path: file_sha256(project / path) for path in untouched}
    metrics_before = json.loads((project / params.data.eval_metrics).read_text())

    out = _dvc(project, "exp", "run", "-S", "evaluate.min_gap=1.0")

    assert "Running stage 'evaluate'" in out
    for stage in ("rubric", "validate", "judge", "train"):
        assert f"Running stage '{stage}'" not in out
    assert load_params(project / "params.yaml").evaluate.min_gap == 1.0  # and the settings still load
    assert {path: file_sha256(project / path) for path in untouched} == before
    metrics = json.loads((project / params.data.eval_metrics).read_text())
    changed = {key for key in metrics if metrics[key] != metrics_before.get(key)}
    assert changed and all("pairwise" in key for key in changed), changed
    diff = _dvc(project, "params", "diff")  # the rubric's prose is in rubric.yaml: rows stay readable
    assert "evaluate.min_gap" in diff and max(len(line) for line in diff.splitlines()) < 120, diff

    # an edit to data.py (train and evaluate read judgments through it) makes DVC rerun them
    with open(project / "src" / "fluent_reward" / "data.py", "a", encoding="utf-8") as handle:
        handle.write("\n# an edit\n")
    stale = json.loads(_dvc(project, "status", "--json"))
    assert {"validate", "train", "evaluate"} <= set(stale), stale


def test_dvc_plots_output_is_gitignored():
    proc = subprocess.run(["git", "check-ignore", "dvc_plots/index.html"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.stdout.strip() == "dvc_plots/index.html", "dvc_plots/ (from `dvc plots show`) must be gitignored"
