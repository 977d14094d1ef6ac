"""MetaMath (ReasoningBench): MetaMathQA (train), zero-shot CoT prompt on ``query``; the reference is the final
answer of ``response`` ("... The answer is: 18" -> "18")."""

from adapteval.datasets._base import DatasetSpec, alpaca, text
from adapteval.datasets._hub import load_split
from adapteval.datasets._prompts import cot_prompt


VERSION = "1"
ANSWER_MARKER = "The answer is:"
SPEC = DatasetSpec(
    name="metamath",
    title="MetaMath",
    bench="reasoning",
    metric="em",
    answer_format="metamath",
    source="meta-math/MetaMathQA (train)",
    needs_hub=True,
    fixed_file="MetaMathQA_random_5k.json",
)


def load_parts(n: int, seed: int) -> list:
    return [load_split("meta-math/MetaMathQA", "train")]


def format_row(example: dict) -> dict | None:
    response = text(example["response"])
    if ANSWER_MARKER not in response:
        return None
    return alpaca(cot_prompt(text(example["query"])), "", response.rsplit(ANSWER_MARKER, 1)[1].strip())
