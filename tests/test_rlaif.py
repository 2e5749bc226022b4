"""The TRL reward-function adapter: prompt parsing for both formats, and a real GRPOTrainer step on tiny models."""

from __future__ import annotations

import pytest

from fluent_reward.inference import RewardModelScorer
from fluent_reward.rlaif import TutorReward, completion_text, from_messages, from_plain, make_reward_function
from tests.support import make_records, make_tiny_causal_lm, make_tiny_model_folder


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> RewardModelScorer:
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("rm") / "m", dimensions=("accuracy", "feedback"))
    return RewardModelScorer(folder, device="cpu")


def test_conversational_prompt_becomes_context_and_student_message():
    messages = [
        {"role": "system", "content": "You are a Spanish tutor."},
        {"role": "assistant", "content": "¡Hola! ¿Qué hiciste ayer?"},
        {"role": "user", "content": "Yo ir al cine."},
        {"role": "assistant", "content": "Casi: «fui». ¿Con quién?"},
        {"role": "user", "content": [{"type": "text", "text": "Con mi hermana. ¿Está bien?"}]},
    ]
    context, student = from_messages(messages)
    assert context == "Tutor: ¡Hola! ¿Qué hiciste ayer?\nStudent: Yo ir al cine.\nTutor: Casi: «fui». ¿Con quién?"
    assert student == "Con mi hermana. ¿Está bien?"
    with pytest.raises(ValueError, match="no 'user' message"):
        from_messages([{"role": "system", "content": "x"}])


def test_plain_prompt_parsing():
    prompt = "Tutor: ¿Qué hiciste ayer?\nStudent: Yo ir al cine.\nTutor:"
    assert from_plain(prompt) == ("Tutor: ¿Qué hiciste ayer?", "Yo ir al cine.")
    assert from_plain("How do I say 'dog' in French?") == ("", "How do I say 'dog' in French?")


def test_completion_text_for_both_formats():
    assert completion_text(" ¡Muy bien!") == " ¡Muy bien!"
    assert completion_text([{"role": "assistant", "content": "¡Muy bien!"}]) == "¡Muy bien!"


def test_reward_function_matches_the_scorer_for_both_formats(scorer):
    reward = make_reward_function(scorer)
    assert isinstance(reward, TutorReward) and reward.__name__ == "fluent_reward"
    rows = make_records(n_groups=2, per_group=2)
    expected = scorer.score_batch(
        [r["context"] for r in rows], [r["tutor_response"] for r in rows], [r["student_message"] for r in rows]
    )
    plain = reward(
        prompts=[f"{r['context']}\nStudent: {r['student_message']}\nTutor:" for r in rows],
        completions=[" " + r["tutor_response"] for r in rows],
        completion_ids=[[1]] * len(rows),
        trainer_state=None,
    )
    conversational = reward(
        prompts=[
            [
                {"role": "assistant", "content": "Hola, ¿qué hiciste ayer?"},
                {"role": "user", "content": r["context"].split("Student: ", 1)[1]},
                {"role": "user", "content": r["student_message"]},
            ]
            for r in rows
        ],
        completions=[[{"role": "assistant", "content": r["tutor_response"]}] for r in rows],
    )
    from_columns = reward(
        prompts=["ignored"] * len(rows),
        completions=[r["tutor_response"] for r in rows],
        context=[r["context"] for r in rows],
        student_message=[r["student_message"] for r in rows],
    )
    assert plain == pytest.approx(expected, abs=1e-4)
    assert from_columns == pytest.approx(expected, abs=1e-4)
    assert len(conversational) == len(rows) and all(isinstance(x, float) for x in conversational)
    centred = make_reward_function(scorer, center=True)(prompts=["Student: hola"], completions=["¡Hola!"])
    assert centred[0] == pytest.approx(reward(prompts=["Student: hola"], completions=["¡Hola!"])[0] - 5.5)


def test_grpo_trainer_step_with_the_reward_model(tmp_path, scorer):
    """A real TRL GRPOTrainer step: the policy generates, our reward function scores, the weights change."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    policy_dir = make_tiny_causal_lm(tmp_path / "policy")
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    prompts = [
        [
            {"role": "assistant", "content": "¡Hola! ¿Qué hiciste ayer?"},
            {"role": "user", "content": f"Yo ir al cine con mi hermana {i}."},
        ]
        for i in range(4)
    ]
    calls: list[int] = []
    reward = make_reward_function(scorer)

    def counted(prompts, completions, **kwargs):
        calls.append(len(completions))
        return reward(prompts, completions, **kwargs)

    counted.__name__ = "fluent_reward"
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=counted,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
    )
    trainer.train()
    assert calls and sum(calls) >= 4
    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert logged and "rewards/fluent_reward/mean" in logged[0]
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p.detach().cpu(), before[n])]
    assert unchanged == [], "trainable parameters that a GRPO step left unchanged"  # every one moves, as in TRL's tests


def test_empty_completions_get_the_bottom_of_the_scale_without_a_model_call(scorer):
    reward = make_reward_function(scorer)
    prompts = ["Tutor: Hola\nStudent: Yo ir al cine.\nTutor:"] * 3
    rewards = reward(prompts=prompts, completions=[" ¡Casi! Se dice «fui».", "", "  \n"])
    assert rewards[1:] == [1.0, 1.0]  # the scale's minimum
    assert rewards[0] == pytest.approx(scorer.score("Tutor: Hola", " ¡Casi! Se dice «fui».", "Yo ir al cine."))
    assert make_reward_function(scorer, center=True)(prompts=prompts[:1], completions=[""]) == [1.0 - 5.5]


def test_misuse(scorer):
    reward = make_reward_function(scorer)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward(prompts=["a", "b"], completions=["x"])
    assert reward(prompts=[], completions=[]) == []
    with pytest.raises(ValueError, match="weights"):
        make_reward_function(scorer, weights={"nope": 1})(prompts=["Student: hi"], completions=["hello"])
