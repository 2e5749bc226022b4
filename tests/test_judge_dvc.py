"""The judge stage driven by real `dvc repro` / `dvc status` in a temporary copy of the project: the reference
folder is a dependency, so editing one imported label (or adding a file) re-runs the judge, and the judgments carry
the new label. The bundled sample runs with no API key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _dvc(project: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}  # the sample needs no key
    env["PYTHONPATH"] = str(project / "src")  # `fluent-reward` in the stages imports this copy
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture
def project(tmp_path) -> Path:
    if shutil.which("fluent-reward", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the fluent-reward console script is not installed next to this Python")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml", "rubric.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "sample", project / "data" / "sample")
    _dvc(project, "init", "--no-scm", "-q")
    _dvc(project, "config", "core.analytics", "false")
    return project


def test_editing_one_reference_label_reruns_the_judge_with_the_new_label(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    judgments_path = project / params["data"]["judgments"]
    reference_path = project / params["judge"]["reference_dir"] / "reference_judgments.json"

    _dvc(project, "repro", "judge")
    first = json.loads(judgments_path.read_text(encoding="utf-8"))
    assert {j["source"] for j in first["judgments"]} == {"reference"} and first["failed"] == []
    assert "up to date" in _dvc(project, "status", "judge")

    reference = json.loads(reference_path.read_text(encoding="utf-8"))
    entry = reference["judgments"][7]
    corrected = 1.0 if entry["scores"]["accuracy"] != 1 else 10.0
    entry["scores"]["accuracy"] = corrected
    reference_path.write_text(json.dumps(reference, ensure_ascii=False, indent=1), encoding="utf-8")

    status = _dvc(project, "status", "judge")
    assert "changed deps" in status and params["judge"]["reference_dir"] in status
    out = _dvc(project, "repro", "judge")
    assert "Running stage 'judge'" in out and "Running stage 'validate'" not in out
    judged = {j["id"]: j for j in json.loads(judgments_path.read_text(encoding="utf-8"))["judgments"]}
    assert judged[entry["id"]]["scores"]["accuracy"] == corrected
    assert "up to date" in _dvc(project, "status", "judge")

    # A new file in the folder is a change too (an empty JSONL file: no judgments, but a new dependency file).
    (reference_path.parent / "more.jsonl").write_text("", encoding="utf-8")
    assert "changed deps" in _dvc(project, "status", "judge")
