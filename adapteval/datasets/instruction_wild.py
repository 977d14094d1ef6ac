"""InstructionWild (InstructionBench): user-style instructions in the Alpaca layout, English half.

The hub repository keeps a loading script (InstructionWild.py), which ``datasets`` 4 refuses to run; the English
file is read directly through the json loader instead (same rows as the script's ``en`` config).
"""

from adapteval.datasets._base import DatasetSpec, alpaca_passthrough
from adapteval.datasets._hub import load_split


VERSION = "1"
HUB_ID = "fuliucansheng/InstructionWild"
DATA_FILE = f"hf://datasets/{HUB_ID}/instinwild_en.json"
SPEC = DatasetSpec(
    name="instruction_wild",
    title="InstructionWild",
    bench="instruction",
    metric="rougeLsum",
    source=f"{HUB_ID} (instinwild_en.json)",
    needs_hub=True,
    fixed_file="instruction_wild_random_5k.json",
)


def load_parts(n: int, seed: int) -> list:
    return [load_split("json", "train", data_files=DATA_FILE, cite_as=f"hf:{HUB_ID}/instinwild_en.json")]


format_row = alpaca_passthrough
