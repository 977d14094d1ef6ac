"""Scoring a finished cell: its predictions against the references, the answers' bits per byte and the run's
summary, as the cell.json record (the format is in ``adapteval.runner``)."""

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapteval.errors import RunnerError
from adapteval.extract import ANSWER_FORMATS
from adapteval.metrics import score_predictions
from adapteval.plan import CELL_FORMAT, Cell
from adapteval.records import read_json
from adapteval.registry import get_dataset
from tlm_plugin.train.outputs import DEMOS_FILE, PREDICTIONS_FILE, SCORES_FILE, SUMMARY_FILE, read_jsonl


def read_predictions(path: Path, n_rows: int, cell_name: str) -> list[str]:
    """The ``predict`` texts of generated_predictions.jsonl, one per input row (else ``RunnerError``)."""
    if not path.is_file():
        raise RunnerError(f"cell {cell_name}: the run wrote no {path} (does the recipe set do_predict: true?)")
    n_lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if n_lines != n_rows:
        what = "missing" if n_lines < n_rows else "extra"
        raise RunnerError(
            f"cell {cell_name}: {path.name} has {n_lines} predictions for {n_rows} input rows "
            f"({abs(n_rows - n_lines)} {what}); LLaMA-Factory may have dropped rows it could not encode "
            f"(e.g. an empty prompt) - see {path.parent.parent / 'run.log'}"
        )
    records = read_jsonl(str(path))  # complete JSON lines up to the first that is not one
    for number, record in enumerate([*records, None][:n_rows], start=1):
        if not isinstance(record, dict):
            raise RunnerError(f"cell {cell_name}: {path.name} line {number} is not a complete JSON object")
    return [record.get("predict") or "" for record in records]


def answer_fields(output_dir: Path) -> dict[str, Any]:
    """Bits per byte of the reference answers from the run's tlm_scores.jsonl: means and aligned per-row lists over
    the rows whose answer was measured and not truncated (all None when the run did not measure them)."""
    records = read_jsonl(str(output_dir / SCORES_FILE))
    measured = [r for r in records if r.get("answer_bpb") is not None and not r.get("answer_truncated")]
    fields: dict[str, Any] = {"answer_rows": [r["index"] for r in measured] if measured else None}
    for key in ("answer_bpb", "answer_bpb_base", "answer_content_bpb", "answer_content_bpb_base"):
        values = [r.get(key) for r in measured]
        ok = measured and all(v is not None for v in values)
        fields[f"{key}_per_row"] = values if ok else None
        fields[key] = sum(values) / len(values) if ok else None
    return fields


def _plain_votes(record: dict) -> list[str] | None:
    """The answers of a record of plain voting (``votes``: a list of two or more texts), else None: a record of
    augmented voting (``candidates``, ``vote_answers``) was voted on answers mapped back by the inverses, and is
    left as it is."""
    votes = record.get("votes")
    if "candidates" in record or "vote_answers" in record or not isinstance(votes, list) or len(votes) < 2:
        return None
    return votes if all(isinstance(v, str) for v in votes) else None


def _ranked_votes(votes: list[str], extract) -> list[str]:
    """One answer text per distinct extracted answer, most votes first (ties: the earliest)."""
    answers = [extract(v) for v in votes]
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    ranked = sorted(counts, key=lambda a: (-counts[a], answers.index(a)))
    return [votes[answers.index(a)] for a in ranked]


def vote_on_extracted_answers(dataset: str, output_dir: Path, predictions: list[str]) -> list[str]:
    """With ``tlm_demo_votes``, stage tlm keeps the majority of the answers' exact texts; for an exact-match dataset
    the vote is taken again on the extracted answers (two answers saying "B" and "The answer is B" agree). Returns
    the predictions with each voted row's answer replaced by one that carries the winning extracted answer. Only
    records of plain voting are voted again (``votes``: a list of texts); augmented voting's records are not."""
    spec = get_dataset(dataset).SPEC
    if spec.answer_format is None:
        return predictions
    extract = ANSWER_FORMATS[spec.answer_format].extract_prediction
    out = list(predictions)
    for record in read_jsonl(str(output_dir / DEMOS_FILE)):
        votes = _plain_votes(record)
        ranked = _ranked_votes(votes, extract) if votes is not None else []
        if ranked:
            out[record["index"]] = ranked[0]
    return out


def second_attempts(dataset: str, output_dir: Path, n_rows: int) -> list[str | None] | None:
    """ARC's second attempts from the run's tlm_demos.jsonl, one per row (None where a row has none), or None when
    the dataset is not scored by pass@2.

    A record of plain voting gives the runner-up of the vote taken again on the extracted answers (the one
    ``vote_on_extracted_answers`` picks the prediction from); any other record its ``top2``'s second answer."""
    spec = get_dataset(dataset).SPEC
    if spec.metric != "pass@2":
        return None
    extract = ANSWER_FORMATS[spec.answer_format].extract_prediction
    out: list[str | None] = [None] * n_rows
    for record in read_jsonl(str(output_dir / DEMOS_FILE)):
        index = record.get("index")
        if not isinstance(index, int) or not 0 <= index < n_rows:
            continue
        votes = _plain_votes(record)
        if votes is not None:
            ranked = _ranked_votes(votes, extract)
            out[index] = ranked[1] if len(ranked) > 1 else None
            continue
        top2 = record.get("top2")
        if isinstance(top2, list) and len(top2) > 1 and isinstance(top2[1], str):
            out[index] = top2[1]
    return out


def score_cell(cell: Cell, rows: list[dict], output_dir: Path, recipe: dict[str, Any]) -> dict:
    """The cell.json record of a finished run (references are the data file's ``output`` texts)."""
    start = time.perf_counter()
    answers = answer_fields(output_dir)
    if not cell.answers_only:
        predictions = read_predictions(output_dir / PREDICTIONS_FILE, len(rows), cell.name)
        predictions = vote_on_extracted_answers(cell.dataset, output_dir, predictions)
        second = second_attempts(cell.dataset, output_dir, len(rows))
        result = score_predictions(cell.dataset, predictions, [row["output"] for row in rows], second)
    else:  # answers only: the headline metric is the answers' bits per byte
        if answers["answer_bpb"] is None:
            raise RunnerError(f"cell {cell.name}: the run measured no answer likelihoods (tlm_eval_answers)")
        predictions = []
        result = {
            "metric": "answer_bpb",
            "score": answers["answer_bpb"],
            "scores": {"answer_bpb": answers["answer_bpb"]},
            "n": len(answers["answer_rows"]),
            "n_empty_predictions": 0,
            "per_sample": answers["answer_bpb_per_row"],
        }
    summary_path = output_dir / SUMMARY_FILE
    summary = read_json(summary_path) if summary_path.is_file() else {}
    spec = get_dataset(cell.dataset).SPEC
    return {
        "format": CELL_FORMAT,
        "dataset": cell.dataset,
        "title": spec.title,
        "bench": spec.bench,
        "method": cell.method.name,
        "method_description": cell.method.description,
        "backend": cell.backend,
        "metric": result["metric"],
        "score": result["score"],
        "scores": result["scores"],
        "n": result["n"],
        "n_empty": result["n_empty_predictions"],
        "empty_rows": [i for i, prediction in enumerate(predictions) if not prediction.strip()],
        "per_sample": result["per_sample"],
        **({"n_second_attempts": result["n_second_attempts"]} if "n_second_attempts" in result else {}),
        **answers,
        "log_ppl_before": summary.get("mean_log_ppl_before"),
        "log_ppl_after": summary.get("mean_log_ppl_after"),
        "log_ppl_user_before": summary.get("mean_log_ppl_user_before"),
        "log_ppl_user_after": summary.get("mean_log_ppl_user_after"),
        "loss_tokens": summary.get("loss_tokens"),
        "log_p0_used": summary.get("log_p0_used"),
        "n_selected": summary.get("n_selected"),
        "backward_passes": summary.get("backward_passes"),
        "limit": cell.limit,
        "data_file": str(cell.data_dir / cell.dataset_info["file_name"]),
        "data_sha256": cell.data_sha256,
        "config_hash": cell.config_hash,
        "recipe": recipe,
        "timings": {"score_s": round(time.perf_counter() - start, 3), "stages": summary.get("wall_time_s", {})},
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
