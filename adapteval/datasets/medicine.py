"""Medicine (DomainBench): GenMedGPT-5k, ChatGPT-generated patient/doctor dialogues. Every row has the same
instruction ("If you are a doctor, please answer ...") and the patient's words in ``input``."""

from adapteval.datasets._base import DatasetSpec, alpaca_passthrough
from adapteval.datasets._hub import load_split


VERSION = "1"
SPEC = DatasetSpec(
    name="medicine",
    title="Medicine",
    bench="domain",
    metric="rougeLsum",
    source="wangrongsheng/GenMedGPT-5k-en (train)",
    needs_hub=True,
    fixed_file="GenMedGPT_random_5k.json",
)


def load_parts(n: int, seed: int) -> list:
    return [load_split("wangrongsheng/GenMedGPT-5k-en", "train")]


format_row = alpaca_passthrough
