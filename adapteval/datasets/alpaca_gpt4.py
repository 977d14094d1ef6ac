"""Alpaca-GPT4 (InstructionBench): the Alpaca instructions answered by GPT-4, as LLaMA-Factory publishes them."""

from adapteval.datasets._base import DatasetSpec, alpaca_passthrough
from adapteval.datasets._hub import load_split


VERSION = "1"
SPEC = DatasetSpec(
    name="alpaca_gpt4",
    title="Alpaca-GPT4",
    bench="instruction",
    metric="rougeLsum",
    source="llamafactory/alpaca_gpt4_en (train)",
    needs_hub=True,
    fixed_file="alpaca_gpt4_en_random_5k.json",
)


def load_parts(n: int, seed: int) -> list:
    return [load_split("llamafactory/alpaca_gpt4_en", "train")]


format_row = alpaca_passthrough
