"""Geography (DomainBench): GeoSignal, the geoscience instruction data of K2 (daven3/geosignal)."""

from adapteval.datasets._base import DatasetSpec, alpaca_passthrough
from adapteval.datasets._hub import load_split


VERSION = "1"
SPEC = DatasetSpec(
    name="geography",
    title="Geography",
    bench="domain",
    metric="rougeLsum",
    source="daven3/geosignal (train)",
    needs_hub=True,
    fixed_file="geosignal_random_5k.json",
)


def load_parts(n: int, seed: int) -> list:
    return [load_split("daven3/geosignal", "train")]


format_row = alpaca_passthrough
