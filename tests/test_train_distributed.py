"""The multi-process path: `accelerate launch` with 2 CPU processes (gloo) runs the unchanged training code; each
process trains on different batches and both end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fluent_reward.io import read_json
from tests.support import REPO, make_learnable_backbone, tiny_project

WORKER = """
import hashlib, json, sys
from pathlib import Path

from accelerate import PartialState

from fluent_reward.config import load_params
from fluent_reward.train import run_train

result = run_train(load_params(sys.argv[1]), progress=False)
state = PartialState()
digest = hashlib.sha256()
for key, value in sorted(result.model.state_dict().items()):  # this process's final (best-epoch) weights
    digest.update(key.encode())
    digest.update(value.detach().float().cpu().numpy().tobytes())
Path(sys.argv[2], f"rank{state.process_index}.json").write_text(json.dumps({
    "world": state.num_processes, "seen": [sorted(ids) for ids in result.seen_ids], "sha256": digest.hexdigest(),
    "steps": result.metrics["optimizer_steps"], "cached": result.metrics["frozen_prefix_cached"],
}))
"""


@pytest.mark.parametrize("frozen", [False, True], ids=["whole-model", "frozen-prefix-cache"])
def test_two_processes_see_different_data_and_end_identical(tmp_path, frozen):
    backbone = make_learnable_backbone(tmp_path / "backbone")
    settings = {"freeze_embeddings": True, "freeze_layers": 1} if frozen else {}
    params = tiny_project(tmp_path / "project", backbone, n_groups=24, epochs=2, batch_size=8, **settings)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump(params.model_dump(mode="json", by_alias=True), sort_keys=False), encoding="utf-8"
    )
    (tmp_path / "worker.py").write_text(WORKER, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    # this checkout's sources first: the venv's editable install may point at another checkout
    path = os.pathsep.join([str(REPO / "src"), str(REPO)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": path}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # accelerate's name for "several processes"; on CPU it uses gloo
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(tmp_path / "worker.py"),
        str(params_file),
        str(out),
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    seen = [set(r["seen"][0]) for r in ranks]  # first epoch
    split = read_json(params.data.splits)
    records = [json.loads(line) for line in Path(params.data.validated).read_text().splitlines()]
    train_ids = {r["id"] for r in records if r["group_id"] in split["groups"]["train"]}
    # different data: in an epoch each process trains on its own batches, together on all of them (when the number
    # of batches is odd, one batch is repeated so that both take the same number of steps)
    assert seen[0] | seen[1] == train_ids
    assert len(seen[0] & seen[1]) <= params.train.batch_size
    assert len(seen[0]) < len(train_ids) and len(seen[1]) < len(train_ids)
    # identical weights at the end, after the same number of optimizer steps
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert [r["cached"] for r in ranks] == [int(frozen)] * 2
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert read_json(params.data.train_metrics)["processes"] == 2
