"""Offline Geography pack (DomainBench stand-in): three geography sets shipped in OpenAI Evals (country names as
answers). ``lat_long_identify`` asks for names in the country's own language; rows whose every accepted answer is
in a non-Latin script are skipped, since ROUGE (rouge-score's tokenizer) cannot score them."""

from adapteval.datasets._base import DatasetSpec
from adapteval.datasets._packages import evals_part, evals_row


VERSION = "1"
FILES = (
    "largest_country/samples.jsonl",
    "compare-countries-area/samples.jsonl",
    "lat_long_identify/samples.jsonl",
)
SPEC = DatasetSpec(
    name="geography_evals",
    title="Geography (offline, evals geography sets)",
    bench="domain",
    metric="rougeLsum",
    source="evals==3.0.1.post1: " + ", ".join(FILES),
    needs_hub=False,
    packages=("evals",),
)


def load_parts(n: int, seed: int) -> list:
    return [evals_part(path) for path in FILES]


format_row = evals_row
