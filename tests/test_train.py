"""The train stage: splits by group, targets, group-aware batches, losses, and tiny end-to-end runs.

The end-to-end runs use a tiny random BERT (tests/support.py) with the real tokenizer: seconds, no network.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fluent_reward.config import SplitRatios
from fluent_reward.errors import FluentRewardError
from fluent_reward.evaluate import run_evaluate
from fluent_reward.io import file_sha256, read_json, stable_hash, write_json
from fluent_reward.model import collate, target_matrix
from fluent_reward.model_folder import CARD_FILE, METADATA_FILE, ModelMetadata
from fluent_reward.splits import SPLITS, make_splits
from fluent_reward.train import (
    LOG_FILE,
    attention_dropout_override,
    fit_normalisation,
    group_batches,
    load_backbone_model,
    optimizer_steps,
    pairwise_loss,
    plan_epochs,
    pointwise_loss,
    run_train,
    shard_batches,
)
from tests.support import make_learnable_backbone, tiny_project

RATIOS = SplitRatios(train=0.7, validation=0.15, test=0.15)


# ----------------------------------------------------------------------------------------------------------------
# Splits


def test_splits_are_disjoint_complete_exact_and_seeded():
    groups = {f"g{i}": ("Spanish", "French", "Japanese")[i % 3] for i in range(40)}
    split = make_splits(groups, RATIOS, seed=1)
    sets = [set(split[name]) for name in SPLITS]
    assert set.union(*sets) == set(groups)
    assert sum(len(s) for s in sets) == len(groups)  # disjoint
    assert [len(split[name]) for name in SPLITS] == [28, 6, 6]
    # same seed, same split, whatever the order the groups come in; another seed, another split
    assert make_splits(dict(reversed(list(groups.items()))), RATIOS, seed=1) == split
    assert make_splits(groups, RATIOS, seed=2) != split


def test_splits_spread_every_language_over_the_test_split():
    groups = {f"{lang}-{i}": lang for lang in ("es", "fr", "ja", "ko") for i in range(10)}
    split = make_splits(groups, RATIOS, seed=0)
    assert set(Counter(groups[g] for g in split["test"])) == {"es", "fr", "ja", "ko"}
    assert set(Counter(groups[g] for g in split["validation"])) == {"es", "fr", "ja", "ko"}


def test_validation_ratio_zero_gives_its_groups_to_train_and_keeps_the_test_split():
    groups = {f"g{i}": ("Spanish", "French", "Japanese")[i % 3] for i in range(40)}
    split = make_splits(groups, RATIOS, seed=1)
    without = make_splits(groups, SplitRatios(train=0.85, validation=0.0, test=0.15), seed=1)
    assert without["validation"] == [] and without["test"] == split["test"]
    assert without["train"] == sorted(split["train"] + split["validation"])


def test_splits_need_three_groups():
    with pytest.raises(FluentRewardError, match="at least 3 groups"):
        make_splits({"a": "x", "b": "x"}, RATIOS, seed=0)
    assert [len(v) for v in make_splits({"a": "x", "b": "x", "c": "y"}, RATIOS, 0).values()] == [1, 1, 1]


# ----------------------------------------------------------------------------------------------------------------
# Targets


def test_targets_overall_first_and_normalisation():
    records = [
        {"overall": 8.0, "scores": {"a": 9.0, "b": 5.0}},
        {"overall": 4.0, "scores": {"a": 3.0, "b": 5.0}},
    ]
    targets = target_matrix(records, ["a", "b"])
    assert targets.tolist() == [[8.0, 9.0, 5.0], [4.0, 3.0, 5.0]]
    mean, std = fit_normalisation(targets)
    assert mean.tolist() == [6.0, 6.0, 5.0]
    assert std.tolist() == [2.0, 3.0, 1.0]  # a constant label gets std 1, never a division by zero


# ----------------------------------------------------------------------------------------------------------------
# Batches


def _groups(n_groups: int, size: int) -> list[list[int]]:
    return [list(range(g * size, (g + 1) * size)) for g in range(n_groups)]


def test_group_batches_keep_groups_whole_and_cover_every_example():
    groups = _groups(30, 5)
    lengths = [random.Random(i).randint(10, 300) for i in range(150)]
    batches = group_batches(groups, lengths, 16, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(150))
    assert all(len(b) <= 16 for b in batches)
    where = {i: k for k, b in enumerate(batches) for i in b}
    assert all(len({where[i] for i in members}) == 1 for members in groups)
    assert group_batches(groups, lengths, 16, random.Random(0)) == batches  # seeded
    assert group_batches(groups, lengths, 16, random.Random(1)) != batches


def test_group_batches_put_similar_lengths_together():
    groups = _groups(64, 4)
    rng = random.Random(3)
    group_len = [rng.choice([20, 250]) for _ in groups]
    lengths = [group_len[i // 4] for i in range(256)]
    batches = group_batches(groups, lengths, 16, random.Random(0))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    unsorted = group_batches(groups, lengths, 16, random.Random(0), bucket_batches=1)  # packed as they come
    assert padded < 0.7 * sum(len(b) * max(lengths[i] for i in b) for b in unsorted)
    assert padded < 1.15 * (32 * 4 * 20 + 32 * 4 * 250)  # close to no padding at all


def test_group_larger_than_batch_is_cut():
    batches = group_batches([list(range(10))], [5] * 10, 4, random.Random(0))
    assert sorted(len(b) for b in batches) == [2, 4, 4]


def test_shard_batches_gives_each_process_its_share_and_equal_steps():
    batches = [[0], [1], [2], [3], [4]]
    assert shard_batches(batches, 0, 2) == [[0], [2], [4]]
    assert shard_batches(batches, 1, 2) == [[1], [3], [0]]  # padded by repeating the first batch
    assert shard_batches(batches, 0, 1) == batches


def test_the_schedule_counts_the_steps_every_epoch_really_runs():
    # uneven groups: each epoch packs them differently, so one plan's length times the epochs is not the total
    sizes = [1, 7, 3, 6, 2, 5, 4, 7, 1, 6, 3, 5]
    starts = np.cumsum([0, *sizes])
    groups = [list(range(starts[k], starts[k + 1])) for k in range(len(sizes))]
    lengths = [random.Random(i).randint(10, 300) for i in range(int(starts[-1]))]
    cfg = SimpleNamespace(batch_size=4, seed=0, epochs=6, bucket_batches=8, target_steps=None, grad_accum_steps=1)
    plans = plan_epochs(groups, lengths, cfg, rank=0, world=1)
    assert len(plans) == 6
    assert len({len(p) for p in plans}) > 1  # the epochs differ (the bug: the schedule assumed they did not)
    assert optimizer_steps(plans, 1) == sum(len(p) for p in plans)
    assert optimizer_steps(plans, 4) == sum(math.ceil(len(p) / 4) for p in plans)
    for epoch, plan in enumerate(plans, start=1):
        assert plan == group_batches(groups, lengths, 4, random.Random(f"0-{epoch}"))


def test_target_steps_plans_the_fewest_whole_epochs_that_reach_it():
    groups = [[2 * k, 2 * k + 1] for k in range(10)]  # 20 replies in pairs: 5 batches of 4 in every epoch
    lengths = [50] * 20
    cfg = SimpleNamespace(batch_size=4, seed=0, epochs=6, bucket_batches=8, target_steps=11, grad_accum_steps=1)
    full = plan_epochs(groups, lengths, SimpleNamespace(**{**vars(cfg), "target_steps": None}), rank=0, world=1)
    assert [len(p) for p in full] == [5] * 6
    assert plan_epochs(groups, lengths, cfg, rank=0, world=1) == full[:3]  # 10 steps fall short of 11, 15 reach it
    cfg.target_steps = 10
    assert len(plan_epochs(groups, lengths, cfg, rank=0, world=1)) == 2  # exactly reached
    cfg.target_steps = 1000
    assert len(plan_epochs(groups, lengths, cfg, rank=0, world=1)) == 6  # never more than train.epochs
    cfg.target_steps, cfg.grad_accum_steps = 11, 2  # 3 optimizer steps per epoch (2 + 2 + 1 batches)
    assert len(plan_epochs(groups, lengths, cfg, rank=0, world=1)) == 4
    cfg.grad_accum_steps = 1
    # two processes: each runs 3 of the (padded) 6 batches an epoch, and both cut at the same epoch
    assert [len(plan_epochs(groups, lengths, cfg, rank=r, world=2)) for r in (0, 1)] == [4, 4]


def test_collate_pads_to_the_longest_in_the_batch():
    batch = collate(
        [
            {"input_ids": [101, 5, 102], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 1]},
            {"input_ids": [101, 102], "attention_mask": [1, 1], "token_type_ids": [0, 1]},
        ],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 1, 0]]


# ----------------------------------------------------------------------------------------------------------------
# Losses


def test_pairwise_loss_hand_values():
    scores = torch.tensor([2.0, 0.0, 1.0, 5.0])
    targets = torch.tensor([1.0, 0.0, 0.0, 3.0])
    groups = torch.tensor([0, 0, 0, 1])
    # ordered pairs in the same group: (0 > 1), (0 > 2); 1 and 2 tie; 3 is alone in its group
    loss, n = pairwise_loss(scores, targets, groups)
    assert n == 2
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2, rel=1e-6)
    loss, _ = pairwise_loss(scores, targets, groups, margin_scale=0.5)  # margins 0.5 * gap(1.0)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1.5)) + math.log1p(math.exp(-0.5))) / 2, rel=1e-6)


def test_pairwise_loss_without_pairs_is_zero_and_keeps_the_graph():
    scores = torch.tensor([1.0, 2.0], requires_grad=True)
    loss, n = pairwise_loss(scores, torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert scores.grad is not None


def test_pointwise_loss_kinds():
    pred, target = torch.tensor([[0.0, 3.0]]), torch.tensor([[1.0, 0.0]])
    assert pointwise_loss(pred, target, "mse", 1.0).item() == pytest.approx((1 + 9) / 2)
    assert pointwise_loss(pred, target, "huber", 1.0).item() == pytest.approx((0.5 + 2.5) / 2)


# ----------------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    backbone = make_learnable_backbone(root / "backbone")
    params = tiny_project(root / "a", backbone)
    return params, run_train(params, progress=False), backbone


def test_run_writes_model_split_metrics_and_logs(trained):
    params, _, _ = trained
    folder = Path(params.data.model_dir)
    for name in ("model.safetensors", "config.json", "tokenizer.json", METADATA_FILE):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("*.bin"))
    meta = ModelMetadata.load(folder)
    split_doc = read_json(params.data.splits)
    assert meta.labels == ["overall", *params.rubric.names]
    assert len(meta.mean) == len(meta.std) == len(meta.labels)
    assert meta.split_sha256 == stable_hash(split_doc, length=64)
    assert len(meta.training_data_sha256) == 64
    assert meta.max_length == params.train.max_length
    assert set(split_doc) == {"seed", "ratios", "groups"}
    metrics = read_json(params.data.train_metrics)
    for key in (
        "epochs_run",
        "planned_epochs",
        "best_epoch",
        "best_validation_spearman",
        "train_seconds",
        "examples_per_s",
        "peak_rss_mb",
    ):
        assert key in metrics
    rows = [json.loads(line) for line in (Path(params.data.logs_dir) / LOG_FILE).read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "step"]
    assert steps and all({"loss", "examples_per_s", "lr"} <= set(r) for r in steps)
    # the schedule ends exactly at the last step: every step before it trains at a learning rate above 0
    assert metrics["optimizer_steps"] == metrics["planned_optimizer_steps"] == steps[-1]["step"]
    assert all(r["lr"]["encoder"] > 0 and r["lr"]["head"] > 0 for r in steps[:-1])
    assert steps[-1]["lr"]["encoder"] == 0.0
    assert 0 < metrics["tokens_useful"] <= metrics["tokens_computed"]
    useful_share = metrics["tokens_useful"] / metrics["tokens_computed"]
    assert metrics["padding_share"] == pytest.approx(1 - useful_share, abs=1e-4)
    assert [r["epoch"] for r in rows if r["event"] == "validation"] == [1, 2]
    assert metrics["planned_epochs"] == 2  # train.epochs caps train.target_steps


def test_only_train_groups_are_trained_on(trained):
    params, result, _ = trained
    split_doc = read_json(params.data.splits)
    records = [json.loads(line) for line in Path(params.data.validated).read_text().splitlines()]
    train_groups = set(split_doc["groups"]["train"])
    assert len(result.seen_ids) == 2  # epochs
    assert all(seen == {r["id"] for r in records if r["group_id"] in train_groups} for seen in result.seen_ids)


def test_the_model_learns_and_loads_with_plain_transformers(trained):
    from transformers import AutoModelForSequenceClassification

    params, _, _ = trained
    rows = [json.loads(line) for line in (Path(params.data.logs_dir) / LOG_FILE).read_text().splitlines()]
    losses = {e: [r["loss"] for r in rows if r["event"] == "step" and r["epoch"] == e] for e in (1, 2)}
    assert np.mean(losses[2]) < np.mean(losses[1])
    model = AutoModelForSequenceClassification.from_pretrained(params.data.model_dir)
    assert model.config.id2label[0] == "overall" and model.config.num_labels == 1 + len(params.rubric.names)
    assert model.config.problem_type == "regression"


def test_same_seed_same_weights(trained, tmp_path):
    params, result, backbone = trained
    again = tiny_project(tmp_path, backbone)
    result2 = run_train(again, progress=False)
    assert [h["validation_spearman"] for h in result2.history] == [h["validation_spearman"] for h in result.history]
    assert file_sha256(Path(again.data.model_dir) / "model.safetensors") == file_sha256(
        Path(params.data.model_dir) / "model.safetensors"
    )


@pytest.mark.parametrize(
    ("freeze", "cached"),
    [
        ({"freeze_embeddings": False, "freeze_layers": 0}, False),
        ({"freeze_embeddings": True, "freeze_layers": 1, "frozen_cache": False}, False),
        ({"freeze_embeddings": True, "freeze_layers": 1, "frozen_cache": True}, True),
    ],
    ids=["all-trainable", "frozen-prefix-whole-model", "frozen-prefix-cache"],
)
def test_every_trainable_parameter_moves_and_every_frozen_one_stays(trained, tmp_path, monkeypatch, freeze, cached):
    """As TRL's trainer tests check: each trainable tensor (new head included) changed, each frozen one is equal,
    in memory and in the saved folder (whose head alone is folded onto the judge's scale)."""
    from fluent_reward import train

    _, _, backbone = trained
    initial: dict[str, tuple[torch.Tensor, bool]] = {}

    def freeze_and_remember(model, embeddings, layers):  # the model as training starts: loaded, head new, frozen
        frozen = real_freeze(model, embeddings, layers)
        initial.update({n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})
        return frozen

    real_freeze = train.freeze
    monkeypatch.setattr(train, "freeze", freeze_and_remember)
    params = tiny_project(tmp_path, backbone, epochs=1, **freeze)
    result = run_train(params, progress=False)
    assert result.metrics["frozen_prefix_cached"] == int(cached)
    trained_now = dict(result.model.named_parameters())
    assert trained_now.keys() == initial.keys()
    moved = {n for n, (before, _) in initial.items() if not torch.equal(before, trained_now[n].detach().cpu())}
    trainable = {n for n, (_, requires_grad) in initial.items() if requires_grad}
    assert moved == trainable, f"trainable but unchanged: {trainable - moved}; frozen but changed: {moved - trainable}"
    prefix = ("bert.embeddings.", "bert.encoder.layer.0.") if freeze["freeze_embeddings"] else ()
    assert set(initial) - trainable == {n for n in initial if n.startswith(prefix)}  # what was asked, no more
    assert {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight"} <= trainable
    saved = load_file(Path(params.data.model_dir) / "model.safetensors")
    for name in trained_now.keys() - {n for n in trained_now if n.startswith("classifier.")}:
        assert torch.equal(saved[name], trained_now[name].detach().cpu()), name


def test_target_steps_cuts_the_run_and_its_schedule(trained, tmp_path):
    _, _, backbone = trained
    params = tiny_project(tmp_path, backbone, epochs=5, target_steps=1)  # one epoch's steps already reach it
    result = run_train(params, progress=False)
    metrics = read_json(params.data.train_metrics)
    assert metrics["planned_epochs"] == metrics["epochs_run"] == 1 and len(result.seen_ids) == 1
    assert metrics["optimizer_steps"] == metrics["planned_optimizer_steps"] > 1
    rows = [json.loads(line) for line in (Path(params.data.logs_dir) / LOG_FILE).read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "step"]
    assert steps[-1]["lr"]["encoder"] == 0.0  # the schedule decays over the one planned epoch, not over five
    assert [r["epoch"] for r in rows if r["event"] == "validation"] == [1]


def test_without_a_validation_split_every_planned_epoch_runs_and_the_last_is_kept(trained, tmp_path):
    _, _, backbone = trained
    no_validation = SplitRatios(train=0.85, validation=0.0, test=0.15)
    params = tiny_project(tmp_path, backbone, epochs=3, early_stopping_patience=1, split=no_validation)
    result = run_train(params, progress=False)
    metrics, split_doc = read_json(params.data.train_metrics), read_json(params.data.splits)
    assert split_doc["groups"]["validation"] == [] and metrics["n_validation"] == 0
    # patience 1 never stops a run that has nothing to validate on; the last epoch's weights are the model's
    assert metrics["epochs_run"] == metrics["planned_epochs"] == metrics["best_epoch"] == 3
    assert metrics["best_validation_spearman"] is None
    assert ModelMetadata.load(Path(params.data.model_dir)).extra["best_validation_spearman"] is None
    card = (Path(params.data.model_dir) / CARD_FILE).read_text()  # no "None" row for a figure that does not exist
    assert "| best_epoch | 3 |" in card and "best_validation_spearman" not in card
    records = [json.loads(line) for line in Path(params.data.validated).read_text().splitlines()]
    test = set(split_doc["groups"]["test"])
    assert all(seen == {r["id"] for r in records if r["group_id"] not in test} for seen in result.seen_ids)
    rows = [json.loads(line) for line in (Path(params.data.logs_dir) / LOG_FILE).read_text().splitlines()]
    assert not [r for r in rows if r["event"] == "validation"]
    # evaluate: the test split as always, no validation metrics, and the report says why
    evaluated = run_evaluate(params)
    assert evaluated["n_groups_test"] == len(test) and not [k for k in evaluated if k.startswith("validation.")]
    report = Path(params.data.report).read_text()
    assert (
        "No validation split (`train.split.validation: 0`)" in report and "in training (no validation split)." in report
    )


@pytest.mark.parametrize("dropout", [None, 0.0, 0.5])
def test_attention_dropout_is_what_the_attention_layers_use(tmp_path, dropout):
    backbone = make_learnable_backbone(tmp_path / "backbone")  # BERT's own attention dropout: 0.1
    model, _, _ = load_backbone_model(str(backbone), ["overall", "clarity"], None, dropout)
    assert model.config.attention_probs_dropout_prob == (0.1 if dropout is None else dropout)
    for name, module in model.named_modules():  # every other dropout off: only the attention's can vary the output
        if isinstance(module, torch.nn.Dropout) and not name.endswith("attention.self.dropout"):
            module.p = 0.0
    model.train()
    ids = torch.randint(5, 1000, (3, 16))
    first, second = (model(input_ids=ids).logits for _ in range(2))
    assert torch.equal(first, second) == (dropout == 0.0)


def test_training_with_attention_dropout_off_saves_it(trained, tmp_path):
    _, _, backbone = trained
    params = tiny_project(tmp_path, backbone, epochs=1, attention_dropout=0.0)
    assert run_train(params, progress=False).model.config.attention_probs_dropout_prob == 0.0
    assert read_json(Path(params.data.model_dir) / "config.json")["attention_probs_dropout_prob"] == 0.0


def test_attention_dropout_on_a_backbone_without_one_is_a_clear_error(tmp_path):
    from transformers import GPT2Config  # its attention dropout is "attn_pdrop", a name of its own

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    assert attention_dropout_override(str(tmp_path), None) == {}
    with pytest.raises(FluentRewardError, match=r"train\.attention_dropout=0\.0: .*no attention dropout setting"):
        attention_dropout_override(str(tmp_path), 0.0)


def test_errors_are_clear(trained, tmp_path):
    params, _, backbone = trained
    judgments = read_json(params.data.judgments)
    judgments["judgments"] = judgments["judgments"][1:]
    broken = tiny_project(tmp_path / "missing", backbone)
    write_json(broken.data.judgments, judgments)
    with pytest.raises(FluentRewardError, match="1 validated record\\(s\\) have no judgment"):
        run_train(broken, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FluentRewardError, match="safetensors"):
        run_train(tiny_project(tmp_path / "p", tmp_path / "empty"), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(FluentRewardError, match="fp16 needs a CUDA GPU"):
            run_train(tiny_project(tmp_path / "q", backbone, mixed_precision="fp16"), progress=False)
