"""LogiQA (ReasoningBench): lucasmccabe/logiqa, all three splits pooled (the paper counts "8k" rows: 7,376 + 651
+ 651), LogiQA 2.0's multi-choice prompt, zero-shot; the reference is the option letter.

The hub repository's main branch holds a loading script that ``datasets`` 4 refuses to run; the hub's own parquet
export (revision ``refs/convert/parquet``) has the same rows.
"""

from adapteval.datasets._base import DatasetSpec, alpaca, text
from adapteval.datasets._hub import load_split
from adapteval.datasets._prompts import OPTION_LETTERS, logiqa_prompt


VERSION = "1"
HUB_ID = "lucasmccabe/logiqa"
REVISION = "refs/convert/parquet"
SPEC = DatasetSpec(
    name="logiqa",
    title="LogiQA",
    bench="reasoning",
    metric="em",
    answer_format="logiqa",
    source=f"{HUB_ID} (train + validation + test pooled)",
    needs_hub=True,
    fixed_file="logiqa_random_5k.json",
)


def load_parts(n: int, seed: int) -> list:
    return [load_split(HUB_ID, split, revision=REVISION) for split in ("train", "validation", "test")]


def format_row(example: dict) -> dict | None:
    options = [text(option) for option in example["options"]]
    answer = int(example["correct_option"])  # an int in the parquet export, a string in the card
    if len(options) != len(OPTION_LETTERS) or not 0 <= answer < len(OPTION_LETTERS):
        return None
    prompt = logiqa_prompt(text(example["context"]), text(example["query"]), options)
    return alpaca(prompt, "", OPTION_LETTERS[answer])
