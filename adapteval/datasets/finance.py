"""Finance (DomainBench): Wealth-Alpaca (Alpaca + FiQA + GPT-3.5 finance tasks). The upstream ``text`` column (a
pre-rendered prompt) is not used."""

from adapteval.datasets._base import DatasetSpec, alpaca_passthrough
from adapteval.datasets._hub import load_split


VERSION = "1"
SPEC = DatasetSpec(
    name="finance",
    title="Finance",
    bench="domain",
    metric="rougeLsum",
    source="gbharti/wealth-alpaca_lora (train)",
    needs_hub=True,
    fixed_file="wealth-alpaca_lora_random_5k.json",
)


def load_parts(n: int, seed: int) -> list:
    return [load_split("gbharti/wealth-alpaca_lora", "train")]


format_row = alpaca_passthrough
