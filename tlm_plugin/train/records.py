"""What a run leaves in ``output_dir`` besides the adapter: ``tlm_scores.jsonl`` and ``tlm_summary.json``."""

import json
import math
import os
from typing import Any


SCORES_FILE = "tlm_scores.jsonl"
SUMMARY_FILE = "tlm_summary.json"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing score is null
    return value


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_records(output_dir: str, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """One JSON line per input row in dataset order, then the run summary; each file appears whole or not at all."""
    os.makedirs(output_dir, exist_ok=True)
    lines = [json.dumps({k: _clean(v) for k, v in row.items()}, ensure_ascii=False) for row in rows]
    _atomic_write(os.path.join(output_dir, SCORES_FILE), "\n".join(lines) + "\n")
    _atomic_write(os.path.join(output_dir, SUMMARY_FILE), json.dumps(summary, indent=2, default=_clean) + "\n")
