"""Offline GSM8K-style pack (ReasoningBench stand-in): reasoning-gym's ``gsm_symbolic`` generator (templated
GSM8K problems with fresh numbers), deterministic by seed, in the GSM8K zero-shot CoT prompt.

The generator appends "Give the result as your final answer. Do not include units." to every question; it is
removed so the prompt reads like a GSM8K one. Answers are mostly integers (a few are decimals). About 0.6% of
generated questions repeat, so a few more than ``n`` are generated (generation is prefix-stable: the first k
questions do not depend on ``size``).
"""

from adapteval.datasets._base import DatasetSpec, SourcePart, alpaca, text
from adapteval.datasets._packages import package_dir, package_version
from adapteval.datasets._prompts import cot_prompt


VERSION = "1"
GENERATOR = "gsm_symbolic"
QUESTION_SUFFIX = " Give the result as your final answer. Do not include units."
SPEC = DatasetSpec(
    name="gsm_symbolic",
    title="GSM-Symbolic (offline, reasoning-gym)",
    bench="reasoning",
    metric="em",
    answer_format="gsm8k",
    source="reasoning-gym==0.1.25: gsm_symbolic generator",
    needs_hub=False,
    packages=("reasoning_gym",),
)


def load_parts(n: int, seed: int) -> list:
    package_dir("reasoning_gym")  # a clear error naming pip when it is missing
    import reasoning_gym

    size = n + n // 20 + 10  # headroom for the repeats that de-duplication drops
    generated = reasoning_gym.create_dataset(GENERATOR, size=size, seed=seed)
    rows = [{"question": item["question"], "answer": item["answer"]} for item in generated]
    return [
        SourcePart(
            rows=rows,
            source="reasoning-gym",
            version=package_version("reasoning_gym"),
            file=f"{GENERATOR}(size={size}, seed={seed})",
        )
    ]


def format_row(example: dict) -> dict | None:
    question = text(example["question"]).removesuffix(QUESTION_SUFFIX)
    return alpaca(cot_prompt(question), "", text(example["answer"]).strip())
