"""Offline Finance pack (DomainBench stand-in): three finance sets shipped in OpenAI Evals. ``finance_calc``
answers are a year in brackets ("[2030]"); ``taxes`` and ``accounting_audit`` answers are option letters."""

from adapteval.datasets._base import DatasetSpec
from adapteval.datasets._packages import evals_part, evals_row


VERSION = "1"
FILES = ("finance_calc/samples.jsonl", "taxes/samples.jsonl", "accounting_audit/samples.jsonl")
SPEC = DatasetSpec(
    name="finance_evals",
    title="Finance (offline, evals finance sets)",
    bench="domain",
    metric="rougeLsum",
    source="evals==3.0.1.post1: " + ", ".join(FILES),
    needs_hub=False,
    packages=("evals",),
)


def load_parts(n: int, seed: int) -> list:
    return [evals_part(path) for path in FILES]


format_row = evals_row
