"""`fluent-reward score` under `accelerate launch` with 2 CPU processes (gloo): each process scores its share of the
records, and the merged output is the single-process output, in input order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fluent_reward.cli import main
from tests.support import make_records, make_tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
WORKER = "import sys\nfrom fluent_reward.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def test_two_processes_each_score_a_share_and_the_output_keeps_input_order(tmp_path):
    model = make_tiny_model_folder(tmp_path / "model", dimensions=("accuracy", "feedback"))
    rows = [{k: v for k, v in r.items() if k != "group_id"} for r in make_records(n_groups=5, per_group=3)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    common = ["--params", str(ROOT / "params.yaml"), "score", "--input", str(source), "--model", str(model)]
    assert main([*common, "--output", str(tmp_path / "single.jsonl"), "--no-progress", "--device", "cpu"]) == 0

    (tmp_path / "worker.py").write_text(WORKER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT / "src")}
    env["PYTHONPATH"] += os.pathsep + str(ROOT)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "worker.py")]
    out = tmp_path / "sharded.jsonl"
    run = subprocess.run(
        [*launch, *common, "--output", str(out), "--no-progress", "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    logs = run.stderr + run.stdout
    assert "scored 8 of 15 records" in logs and "[process 0 of 2]" in logs  # ranks 0 and 1: 8 + 7 records
    assert "scored 7 of 15 records" in logs and "[process 1 of 2]" in logs
    single = [json.loads(line) for line in (tmp_path / "single.jsonl").read_text().splitlines()]
    sharded = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in sharded] == [r["id"] for r in rows]
    for a, b in zip(single, sharded, strict=True):
        assert a["id"] == b["id"] and abs(a["overall"] - b["overall"]) < 1e-3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".sharded")) == []  # parts cleaned up
