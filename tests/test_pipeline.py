"""dvc.yaml, params.yaml and the code agree; judgments, judge cache and model round-trip through a DVC remote."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from fluent_reward.config import load_params

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_calls_the_console_script_and_reads_params_it_lists():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in stages().items():
        assert stage["cmd"] == f"fluent-reward {name}"
        for key in stage.get("params", []):
            section, *rest = key.split(".")
            node = params[section]
            for part in rest:
                node = node[part]  # KeyError: dvc.yaml lists a param that params.yaml lacks


def test_every_data_path_in_dvc_yaml_is_templated_from_params():
    text = (ROOT / "dvc.yaml").read_text()
    for key, value in yaml.safe_load((ROOT / "params.yaml").read_text())["data"].items():
        if key != "conversations":
            assert str(value) not in text, f"dvc.yaml writes {value} instead of ${{data.{key}}}"


def test_reference_files_are_judge_dependencies():
    deps = stages()["judge"]["deps"]
    for path in load_params(ROOT / "params.yaml").judge.reference:
        assert str(path) in deps, f"{path} is in judge.reference but not a dep of the judge stage"


def _dvc(cwd: Path, *args: str) -> str:
    proc = subprocess.run([*DVC, *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_judgments_judge_cache_and_model_round_trip_through_a_local_remote(tmp_path):
    """Push the shared outputs to a directory remote, delete them and the cache, pull: byte-identical."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "sample", project / "data" / "sample")
    _dvc(project, "init", "--no-scm", "-q")
    _dvc(project, "config", "core.analytics", "false")
    params = load_params(project / "params.yaml")
    data = params.data

    # Stand-in outputs (the stages' real work is tested elsewhere; this test is about what DVC shares).
    shared = {
        data.validated: b'{"id": "a"}\n',
        data.judgments: '{"judgments": [{"id": "a", "rationale": "¡bien!"}]}\n'.encode(),
        data.judge_cache: b'{"key": "k1", "scores": {}}\n{"key": "k2"',  # a torn last line survives too
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
        data.plots_dir / "scatter.png",
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

    remote = tmp_path / "remote"
    _dvc(project, "remote", "add", "-d", "local", str(remote))
    _dvc(project, "push", "-q")
    for path in (data.validated, data.judgments, data.judge_cache, data.splits):
        (project / path).unlink()
    shutil.rmtree(project / data.model_dir)
    shutil.rmtree(project / ".dvc" / "cache")

    _dvc(project, "pull", "-q")
    for path, content in shared.items():
        assert (project / path).read_bytes() == content, f"{path} differs after pull"
