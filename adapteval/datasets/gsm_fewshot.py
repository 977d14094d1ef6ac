"""FewShotBench: GSM-Symbolic (reasoning-gym, as ``gsm_symbolic``) with K solved problems in every prompt's history.

The K demonstrations (question, final number) are drawn once (seeded) from other generated problems and carried by
every test prompt as earlier user / assistant turns, as BIG-Bench Hard gives each task one few-shot prompt; no test
row is among them. The answer is a number (GSM8K's exact match).
"""

from adapteval.datasets import gsm_symbolic
from adapteval.datasets._base import DatasetSpec


VERSION = "1"
SPEC = DatasetSpec(
    name="gsm_fewshot",
    title="GSM-Symbolic, K-shot (offline, reasoning-gym)",
    bench="fewshot",
    metric="em",
    answer_format="gsm8k",
    source=gsm_symbolic.SPEC.source + " (demonstrations: other generated problems)",
    needs_hub=False,
    packages=("reasoning_gym",),
    shots=True,
)


def load_parts(n: int, seed: int) -> list:
    return gsm_symbolic.load_parts(n + 64, seed)  # room for the demonstrations beside the n test rows


format_row = gsm_symbolic.format_row
