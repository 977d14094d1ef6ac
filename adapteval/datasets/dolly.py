"""Dolly (InstructionBench): databricks-dolly-15k, rendered in Databricks' own training format (the paper follows
databrickslabs/dolly training/consts.py): the whole prompt, context included, is the instruction."""

from adapteval.datasets._base import DatasetSpec, alpaca, text
from adapteval.datasets._hub import load_split
from adapteval.datasets._prompts import dolly_prompt


VERSION = "1"
SPEC = DatasetSpec(
    name="dolly",
    title="Dolly",
    bench="instruction",
    metric="rougeLsum",
    source="databricks/databricks-dolly-15k (train)",
    needs_hub=True,
    fixed_file="dolly_random_5k.json",
)


def load_parts(n: int, seed: int) -> list:
    return [load_split("databricks/databricks-dolly-15k", "train")]


def format_row(example: dict) -> dict | None:
    prompt = dolly_prompt(text(example["instruction"]), text(example.get("context")))
    return alpaca(prompt, "", text(example["response"]))
