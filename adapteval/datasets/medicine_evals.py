"""Offline Medicine pack (DomainBench stand-in): the MedMCQA sample set shipped in OpenAI Evals (300 rows;
answers like "c) Atrophy"). The evals system prompt is the instruction, the question and options the input."""

from adapteval.datasets._base import DatasetSpec
from adapteval.datasets._packages import evals_part, evals_row


VERSION = "1"
FILES = ("medmcqa/samples.jsonl",)
SPEC = DatasetSpec(
    name="medicine_evals",
    title="Medicine (offline, MedMCQA from evals)",
    bench="domain",
    metric="rougeLsum",
    source="evals==3.0.1.post1: " + ", ".join(FILES),
    needs_hub=False,
    packages=("evals",),
)


def load_parts(n: int, seed: int) -> list:
    return [evals_part(path) for path in FILES]


format_row = evals_row
