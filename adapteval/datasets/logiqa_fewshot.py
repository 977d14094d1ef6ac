"""FewShotBench: LogiQA (from OpenAI Evals, as ``logiqa_evals``) with K demonstrations in every prompt's history.

As BIG-Bench Hard gives each task one fixed few-shot prompt, the K demonstrations are drawn once (seeded) from the
dataset's other rows and carried by every test prompt as earlier user / assistant turns; no test row is among them.
"""

from adapteval.datasets import logiqa_evals
from adapteval.datasets._base import DatasetSpec


VERSION = "1"
SPEC = DatasetSpec(
    name="logiqa_fewshot",
    title="LogiQA, K-shot (offline, from evals)",
    bench="fewshot",
    metric="em",
    answer_format="logiqa",
    source=logiqa_evals.SPEC.source + " (demonstrations: other rows of the same file)",
    needs_hub=False,
    packages=("evals",),
    shots=True,
)
load_parts = logiqa_evals.load_parts
format_row = logiqa_evals.format_row
