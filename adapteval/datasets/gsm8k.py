"""GSM8K (ReasoningBench): grade-school math, train and test pooled, zero-shot CoT prompt; the reference is the
final answer after "####" (kept as written, thousands separators included: the metric normalises both sides)."""

from adapteval.datasets._base import DatasetSpec, alpaca, text
from adapteval.datasets._hub import load_split
from adapteval.datasets._prompts import cot_prompt


VERSION = "1"
SPEC = DatasetSpec(
    name="gsm8k",
    title="GSM8K",
    bench="reasoning",
    metric="em",
    answer_format="gsm8k",
    source="openai/gsm8k (main; train + test pooled)",
    needs_hub=True,
    fixed_file="gsm8k_random_5k.json",
)


def load_parts(n: int, seed: int) -> list:
    return [load_split("openai/gsm8k", split, name="main") for split in ("train", "test")]


def format_row(example: dict) -> dict | None:
    solution = text(example["answer"])
    if "####" not in solution:
        return None
    return alpaca(cot_prompt(text(example["question"])), "", solution.rsplit("####", 1)[1].strip())
