"""What a run leaves in ``output_dir`` besides the adapter, and how an interrupted run finds its place again.

Files: ``tlm_scores.jsonl`` (one line per input row, dataset order), ``tlm_summary.json``, LLaMA-Factory's
``generated_predictions.jsonl`` / ``predict_results.json``, and the per-method records. ``tlm_run.json`` holds the
identity of the run (a hash of every setting that changes its results): rerunning the same command with the same
``output_dir`` resumes only a run with the same identity, ``overwrite_output_dir: true`` starts over and removes
what an earlier stage-tlm run left.
"""

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from typing import Any

from tlm_plugin.errors import TLMConfigError


# Every file and folder a stage-tlm run writes into output_dir (besides the adapter and HF's own files).
SCORES_FILE = "tlm_scores.jsonl"  # one line per input row, dataset order
SUMMARY_FILE = "tlm_summary.json"
RUN_FILE = "tlm_run.json"  # the run's identity
PREDICTIONS_FILE = "generated_predictions.jsonl"  # LLaMA-Factory's format
PREDICT_RESULTS_FILE = "predict_results.json"
SIFT_SELECTION_FILE = "tlm_sift_selection.jsonl"  # pool methods: the rows picked
EMBEDDINGS_FILE = "tlm_embeddings.pt"
SNAPSHOT_FILE = "tlm_reset_snapshot.pt"  # tlm_reset: chunk
GENERATED_FILE = "tlm_generated.jsonl"  # tlm_selector: generate
DEMOS_FILE = "tlm_demos.jsonl"  # tlm_selector: demos
PROMPT_RECORDS_FILE = "tlm_prompt_records.jsonl"  # a per-prompt source's records, unless it names its own
TASK_ADAPTERS_DIR = "tlm_task_adapters"
PART_PATTERN = "tlm_prompts.rank{rank}.jsonl"  # per-prompt records while the run goes (merged, then removed)
CHECKPOINTS = "checkpoint-*"
# Serving (tlm_mode: serve): see tlm_plugin.serving.store
STREAM_FILE = "tlm_stream.jsonl"  # every prompt received, in order (the learner's input)
VERSIONS_DIR = "tlm_versions"  # v<N>/: a LoRA adapter and the learner's state after window N
SERVE_CONTROL_FILE = "tlm_serve_control.json"  # rollbacks and guard resets (the server writes it)
SERVE_RECIPE_FILE = "tlm_serve_recipe.json"  # the recipe the learner process builds from
LEARNER_STATUS_FILE = "tlm_learner_status.json"
LEARNER_LOG_FILE = "tlm_learner.log"
LEARNER_LOCK_FILE = "tlm_learner.lock"
OWN_PATTERNS = (  # removed when a run starts over
    SCORES_FILE,
    SUMMARY_FILE,
    RUN_FILE,
    PREDICTIONS_FILE,
    PREDICT_RESULTS_FILE,
    SIFT_SELECTION_FILE,
    EMBEDDINGS_FILE,
    SNAPSHOT_FILE,
    GENERATED_FILE,
    DEMOS_FILE,
    PROMPT_RECORDS_FILE,
    TASK_ADAPTERS_DIR,
    PART_PATTERN.format(rank="*"),
    CHECKPOINTS,
    STREAM_FILE,
    VERSIONS_DIR,
    SERVE_CONTROL_FILE,
    SERVE_RECIPE_FILE,
    LEARNER_STATUS_FILE,
    LEARNER_LOG_FILE,
    LEARNER_LOCK_FILE,
)


def clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing score is null
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def jsonl_line(row: dict[str, Any]) -> str:
    return json.dumps(clean(row), ensure_ascii=False) + "\n"


def atomic_replace(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one step: the file
    appears whole or not at all, also when several processes write it at once (each has its own temporary name)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_replace(path, write)


def write_records(output_dir: str, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """One JSON line per input row in dataset order, then the run summary; each file appears whole or not at all."""
    os.makedirs(output_dir, exist_ok=True)
    atomic_write(os.path.join(output_dir, SCORES_FILE), "".join(jsonl_line(r) for r in rows))
    atomic_write(os.path.join(output_dir, SUMMARY_FILE), json.dumps(clean(summary), indent=2) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Complete lines of a JSONL file (a torn last line, from a kill while writing, is dropped)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return rows


def truncate_lines(path: str, keep: int) -> None:
    """Keep the first ``keep`` complete lines of ``path`` (what a checkpoint recorded), drop the rest."""
    if not os.path.isfile(path):
        if keep:
            raise TLMConfigError(f"{path} is missing but the checkpoint recorded {keep} lines in it; cannot resume.")
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    complete = lines[:-1]  # the part after the last newline is a torn line (or empty)
    if len(complete) < keep:
        raise TLMConfigError(f"{path} has {len(complete)} lines but the checkpoint recorded {keep}; cannot resume.")
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in complete[:keep]))
        f.flush()
        os.fsync(f.fileno())


def run_identity(settings: dict[str, Any]) -> str:
    """A short hash of the settings that change a run's results."""
    return hashlib.sha256(json.dumps(clean(settings), sort_keys=True, default=str).encode()).hexdigest()[:16]


def start_fresh(output_dir: str, force: bool = False) -> None:
    """Remove what an earlier stage-tlm run left in ``output_dir`` (only if it was one: ``tlm_run.json``, or
    ``force`` when the caller saw that file). Safe when other processes remove the same files at the same time."""
    if not force and not os.path.isfile(os.path.join(output_dir, RUN_FILE)):
        return
    for pattern in OWN_PATTERNS:
        for path in glob.glob(os.path.join(output_dir, pattern)):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def write_identity(output_dir: str, identity: str, mode: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    atomic_write(os.path.join(output_dir, RUN_FILE), json.dumps({"identity": identity, "mode": mode}) + "\n")


def mark_finished(output_dir: str) -> None:
    """Record in ``tlm_run.json`` that the run wrote all its files (a rerun then reports it instead of redoing it)."""
    path = os.path.join(output_dir, RUN_FILE)
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    atomic_write(path, json.dumps({**record, "finished": True}) + "\n")


def finished_run(output_dir: str | None) -> dict[str, Any] | None:
    """The run record (``identity``, ``mode``) of a finished stage-tlm run in ``output_dir``, else None."""
    if not output_dir:
        return None
    try:
        with open(os.path.join(output_dir, RUN_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if record.get("finished") and os.path.isfile(os.path.join(output_dir, SUMMARY_FILE)) else None


def check_identity(output_dir: str, identity: str) -> None:
    """Refuse to resume a run made with other settings (its records would mix with this run's)."""
    path = os.path.join(output_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise TLMConfigError(
            f"output_dir {output_dir} holds a checkpoint but no {RUN_FILE}: it was not written by a stage-tlm run "
            "of this version. Set overwrite_output_dir: true to start over, or choose another output_dir."
        )
    with open(path, encoding="utf-8") as f:
        found = json.load(f).get("identity")
    if found != identity:
        raise TLMConfigError(
            f"output_dir {output_dir} holds an interrupted stage-tlm run made with other settings ({found} vs "
            f"{identity} now). Rerun it with its own settings to resume, set overwrite_output_dir: true to start "
            "over, or choose another output_dir."
        )


def complete_checkpoint(output_dir: str, state_key: str | None = None) -> str | None:
    """The newest ``checkpoint-N`` whose ``trainer_state.json`` was written (and, if given, holds ``state_key``
    among its stateful callbacks); None if there is none. A checkpoint torn by a kill is passed over."""
    candidates = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        suffix = os.path.basename(path).split("-", 1)[1]
        if suffix.isdigit() and os.path.isdir(path):
            candidates.append((int(suffix), path))
    for _, path in sorted(candidates, reverse=True):
        try:
            with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if state_key is None or state_key in state.get("stateful_callbacks", {}):
            return path
    return None


def remove_parts(output_dir: str) -> None:
    """Remove the per-rank record files of per-prompt mode once the run's final files are written."""
    for path in glob.glob(os.path.join(output_dir, PART_PATTERN.format(rank="*"))):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
