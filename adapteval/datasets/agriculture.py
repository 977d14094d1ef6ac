"""Agriculture (DomainBench): KisanVaani's English agriculture QA; the question is the prompt, ``answers`` the
reference."""

from adapteval.datasets._base import DatasetSpec, alpaca, text
from adapteval.datasets._hub import load_split


VERSION = "1"
SPEC = DatasetSpec(
    name="agriculture",
    title="Agriculture",
    bench="domain",
    metric="rougeLsum",
    source="KisanVaani/agriculture-qa-english-only (train; question -> answers)",
    needs_hub=True,
    fixed_file="agriculture-qa_random_5k.json",
)


def load_parts(n: int, seed: int) -> list:
    return [load_split("KisanVaani/agriculture-qa-english-only", "train")]


def format_row(example: dict) -> dict | None:
    return alpaca(text(example["question"]), "", text(example["answers"]))
