"""Run AdaptEval: every (dataset, method) cell as one ``llamafactory-cli train`` run, scored and cached.

A cell lives in ``<out>/cells/<dataset>/<method>/``::

    recipe.yaml    the exact recipe run (``llamafactory-cli train recipe.yaml`` reproduces the cell)
    predict.yaml   with ``--backend vllm``: the inference arguments of the vLLM predict step (adapteval.vllm_predict)
    run.log        stdout and stderr of that run
    data/          with a row limit: the first N rows of the dataset and a dataset_info.json for them
    output/        LLaMA-Factory's output_dir (adapter, generated_predictions.jsonl, tlm_summary.json, ...)
    cell.json      the scored result (see ``CELL_FORMAT`` below); written last, atomically

cell.json (``"format": "adapteval-cell/1"``)::

    {"dataset", "title", "bench", "method", "method_description", "backend",   # "hf" or "vllm"
     "metric", "score", "scores": {metric: value},          # headline metric and its group (adapteval.metrics)
     "n", "n_empty", "empty_rows": [row indices],          # empty predictions are scored 0 and listed here
     "per_sample": [headline metric per row],
     "answer_bpb", "answer_bpb_base",                      # mean bits per byte of the reference answers (adapted /
     "answer_content_bpb", "answer_content_bpb_base",      #   unadapted model; label tokens / content tokens only)
     "answer_rows", "answer_bpb_per_row", "answer_bpb_base_per_row",  # rows with a measured, untruncated answer
     "answer_content_bpb_per_row", "answer_content_bpb_base_per_row",
     "log_ppl_before", "log_ppl_after",                    # mean input log-perplexity (tlm_summary.json), or None
     "log_ppl_user_before", "log_ppl_user_after",          # the same over the user's own tokens, or None
     "loss_tokens", "log_p0_used",                         # tlm_loss_tokens and the threshold used, or None
     "n_selected", "backward_passes",                      # from tlm_summary.json, or None
     "limit", "data_file", "data_sha256", "config_hash", "recipe",
     "timings": {"run_s", "score_s", "stages": {...tlm_summary wall_time_s}}, "finished_at"}

Cache: ``config_hash`` covers the resolved recipe (without the runner's own paths), the dataset's
dataset_info.json entry, the full data file's sha256 and the row limit. A cell whose cell.json has the same hash is
reused; a different hash is refused unless ``force``. A cell without cell.json (never run, failed, interrupted) is
run from scratch, so an interrupted run resumes where it stopped.

The runner returns data and never prints; pass ``progress`` to hear about each finished cell.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from adapteval.builder import DATASET_INFO, MANIFEST, build
from adapteval.errors import DataUnavailableError, UnknownNameError
from adapteval.methods import Method, resolve_methods
from adapteval.metrics import score_predictions
from adapteval.registry import ALL, get_dataset, resolve


CELL_FORMAT = "adapteval-cell/1"
CELL_FILE = "cell.json"
CELLS_DIR = "cells"
PREDICTIONS = "generated_predictions.jsonl"
SUMMARY = "tlm_summary.json"
BACKENDS = ("hf", "vllm")
# Keys each cell sets itself; a base recipe or --set value for them is replaced / refused.
RUNNER_KEYS = ("dataset", "eval_dataset", "dataset_dir", "output_dir")
# Runner paths are left out of the config hash: the data is hashed by content, and moving --out keeps the cache.
UNHASHED_KEYS = ("dataset_dir", "output_dir")
LOG_TAIL_LINES = 40

# The paper's settings (Hu et al. 2025, Sec. 5.1 / App. B). The learning rate depends on the bench and is only
# used when the base recipe sets none.
# the TLM paper per bench; fewshot: the few-shot TTT paper (Akyürek et al.) on BIG-Bench Hard
PAPER_LEARNING_RATES = {"domain": 5.0e-5, "instruction": 5.0e-5, "reasoning": 1.0e-6, "fewshot": 1.0e-4}
PAPER_RECIPE: dict[str, Any] = {
    "trust_remote_code": False,
    "finetuning_type": "lora",
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target": "q_proj,v_proj",
    "cutoff_len": 4096,
    "overwrite_output_dir": True,
    "save_strategy": "no",
    "logging_steps": 10,
    "plot_loss": False,
    "report_to": "none",
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 1.0,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "seed": 42,
    "per_device_eval_batch_size": 8,
    "do_sample": False,
    "max_new_tokens": 512,
}

Progress = Callable[[int, int, dict, bool], None]  # (cells done, cells in total, the cell, reused from cache)
Launcher = Callable[[Path, Path, Mapping[str, str]], int]  # (recipe.yaml, run.log, environment) -> exit code


class RunnerError(RuntimeError):
    """A cell could not be produced (its run failed, or its outputs do not match its inputs)."""


class CacheConflictError(ValueError):
    """The output folder holds a cell made with another configuration."""


@dataclass(frozen=True)
class Cell:
    """One planned (dataset, method) run, fully resolved before anything is written."""

    dataset: str
    method: Method
    dir: Path
    recipe: dict[str, Any]  # without dataset_dir / output_dir (set when the cell runs)
    data_dir: Path
    dataset_info: dict[str, Any]  # the dataset's entry of dataset_info.json
    data_sha256: str
    limit: int | None
    config_hash: str
    backend: str = "hf"  # how its predictions are generated: "hf" (in the training run) or "vllm" (a step after)
    answers_only: bool = False  # no predictions: the headline is the reference answers' bits per byte

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.method.name}"


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def run(
    out: str | Path,
    bench: str,
    methods: str | list[str],
    model: str | None = None,
    template: str | None = None,
    limit: int | None = None,
    data_dir: str | Path | None = None,
    offline: bool = False,
    fixed_dir: str | Path | None = None,
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    backend: str = "hf",
    force: bool = False,
    progress: Progress | None = None,
    launcher: Launcher | None = None,
    predictor: Launcher | None = None,
    answers_only: bool = False,
    teacher: str | None = None,
) -> list[dict]:
    """Run (or reuse) every cell of ``bench`` x ``methods`` into ``out``; returns the cells' records, in order.

    ``data_dir`` is an already built AdaptEval folder (dataset_info.json + manifest.json); without it the datasets
    are built into ``<out>/data`` (from the hub, or ``offline`` from packages and ``fixed_dir``).
    ``overrides`` are ``key=value`` (every cell) or ``method:key=value`` (that method's cells) recipe values.
    ``teacher``: the generator of the teacher methods (``tt-d``): a model folder, hub id or endpoint URL.
    ``answers_only``: no generation at all; each cell measures the reference answers' bits per byte (the headline
    metric ``answer_bpb``), one teacher-forced pass instead of generating answers.
    ``backend="vllm"``: cells that adapt before answering (base and every offline method) train with
    ``do_predict: false``, then answer in a second step on LLaMA-Factory's vLLM engine (``adapteval.vllm_predict``,
    run by ``predictor``); online and per-prompt cells answer in between updates and keep HF generation.
    """
    check_backend(backend)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    out = Path(out)
    method_list = resolve_methods(methods)
    everywhere, per_method = parse_overrides(overrides or [], [m.name for m in method_list])
    from adapteval.methods import TEACHER_METHODS

    for method in method_list:
        if method.name in TEACHER_METHODS:
            if teacher is None and "tlm_generator" not in per_method.get(method.name, {}):
                raise ValueError(f"method {method.name} needs a teacher: pass --teacher MODEL_OR_URL")
            if teacher is not None:
                per_method.setdefault(method.name, {})["tlm_generator"] = teacher
    if answers_only:
        everywhere = {**everywhere, "do_predict": False, "tlm_eval_answers": True}
        backend = "hf"
    base = load_base_recipe(recipe, model, template)
    data_dir, names = prepare_data(bench, out, data_dir, offline, fixed_dir)
    dataset_info = _read_json(data_dir / DATASET_INFO)

    cells = [
        plan_cell(
            out,
            name,
            method,
            base,
            {**everywhere, **per_method.get(method.name, {})},
            data_dir,
            dataset_info,
            limit,
            backend,
            answers_only,
        )
        for name in names
        for method in method_list
    ]
    _check_cache(cells, force)

    env = subprocess_env()
    records = []
    for done, cell in enumerate(cells, start=1):
        record = None if force else _cached(cell)  # after _check_cache: None, or a record of this config
        cached = record is not None
        if not cached:
            record = run_cell(cell, launcher or launch_llamafactory, env, predictor or launch_vllm_predict)
        records.append(record)
        if progress is not None:
            progress(done, len(cells), record, cached)
    return records


def check_backend(backend: str) -> None:
    """``hf``: generation inside each ``llamafactory-cli train`` run; ``vllm`` needs the vllm package."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "hf":
        return
    if not vllm_installed():
        raise ValueError(
            "--backend vllm needs the vllm package, which is not installed in this environment: install the "
            "version LLaMA-Factory supports (pip install 'vllm>=0.4.3,<=0.11.0', NVIDIA GPUs), or use --backend hf."
        )


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def predicts_separately(recipe: Mapping[str, Any]) -> bool:
    """Whether a cell's answers can come after its adaptation (offline), not in between updates (online, per
    prompt)."""
    per_prompt = recipe.get("tlm_mode") == "per_prompt" or recipe.get("tlm_reset") == "prompt"
    return recipe.get("tlm_mode", "offline") != "online" and not per_prompt


# ----------------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------------


def parse_overrides(values: list[str], method_names: list[str]) -> tuple[dict, dict[str, dict]]:
    """``key=value`` and ``method:key=value`` strings -> (for every cell, {method: for its cells}).

    Values are read as YAML scalars (``true``, ``8``, ``null``); ``5e-5`` (YAML 1.1 reads it as text) is a float.
    """
    everywhere: dict[str, Any] = {}
    per_method: dict[str, dict[str, Any]] = {}
    for item in values:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set expects key=value or method:key=value, got {item!r}")
        scope, colon, key = key.strip().rpartition(":")
        if key in RUNNER_KEYS:
            raise ValueError(f"--set {key} is not allowed: the runner sets {', '.join(RUNNER_KEYS)} for each cell")
        if colon and scope not in method_names:
            raise ValueError(f"--set {item!r}: {scope!r} is not one of the methods run ({', '.join(method_names)})")
        target = per_method.setdefault(scope, {}) if colon else everywhere
        target[key] = _scalar(raw)
    return everywhere, per_method


def _scalar(raw: str) -> Any:
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_base_recipe(path: str | Path | None, model: str | None, template: str | None) -> dict[str, Any]:
    """The recipe every cell starts from: a YAML file, or the paper's settings; ``model``/``template`` win."""
    if path is None:
        base = dict(PAPER_RECIPE)
        base["bf16"] = _has_gpu()  # the paper's bf16 needs a GPU; on CPU transformers refuses it
    else:
        try:
            base = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"cannot read the base recipe {path}: {err}") from err
        if not isinstance(base, dict):
            raise ValueError(f"the base recipe {path} is not a YAML mapping of keys to values")
    if model is not None:
        base["model_name_or_path"] = str(Path(model).resolve()) if Path(model).exists() else model
    if template is not None:
        base["template"] = template
    for key in ("model_name_or_path", "template"):
        if not base.get(key):
            raise ValueError(f"no {key}: pass --{key.split('_')[0]} or set it in --recipe")
    return {k: v for k, v in base.items() if k not in RUNNER_KEYS}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_data(
    bench: str, out: Path, data_dir: str | Path | None, offline: bool, fixed_dir: str | Path | None
) -> tuple[Path, list[str]]:
    """The data folder and the dataset names to run, building the missing ones into ``<out>/data`` if needed."""
    if data_dir is not None:
        data_dir = Path(data_dir).resolve()
        manifest = _read_json(data_dir / MANIFEST)
        return data_dir, names_in_build(bench, manifest.get("datasets", {}), data_dir)
    data_dir = out / "data"
    names = resolve(bench, offline=offline, fixed_dir=fixed_dir)
    built = _read_json(data_dir / MANIFEST).get("datasets", {}) if (data_dir / MANIFEST).exists() else {}
    missing = [name for name in names if name not in built]
    if missing:
        build(missing, data_dir, offline=offline, fixed_dir=fixed_dir)
    return data_dir, names


def names_in_build(bench: str, built: Mapping[str, Any], data_dir: Path) -> list[str]:
    """Resolve benches and names against what a build folder holds (registry order within a bench)."""
    from adapteval.datasets._base import BENCHES, PAPER_BENCHES
    from adapteval.registry import DATASETS

    names: list[str] = []
    for token in [part.strip().lower() for part in bench.split(",") if part.strip()]:
        if token == ALL or token in BENCHES:
            benches = PAPER_BENCHES if token == ALL else (token,)
            members = [n for b in benches for n in DATASETS if n in built and get_dataset(n).SPEC.bench == b]
        elif token in DATASETS:
            if token not in built:
                raise DataUnavailableError(f"{token} is not in {data_dir}/{MANIFEST}; build it there first")
            members = [token]
        else:
            get_dataset(token)  # raises UnknownNameError listing the valid names
            members = []
        names.extend(n for n in members if n not in names)
    if not names:
        raise UnknownNameError(f"{bench!r} names no dataset built in {data_dir} (it holds: {', '.join(built)})")
    return names


def plan_cell(
    out: Path,
    dataset: str,
    method: Method,
    base: dict[str, Any],
    overrides: dict[str, Any],
    data_dir: Path,
    dataset_info: dict[str, Any],
    limit: int | None,
    backend: str = "hf",
    answers_only: bool = False,
) -> Cell:
    if dataset not in dataset_info:
        raise DataUnavailableError(f"{dataset} has no entry in {data_dir}/{DATASET_INFO}")
    entry = dataset_info[dataset]
    data_file = data_dir / entry["file_name"]
    if not data_file.is_file():
        raise DataUnavailableError(f"{data_file} (dataset {dataset}) does not exist")
    recipe = dict(base)
    if "learning_rate" not in recipe:
        recipe["learning_rate"] = PAPER_LEARNING_RATES[get_dataset(dataset).SPEC.bench]
    recipe = {**method.apply(recipe), **overrides, "dataset": dataset}
    # a tlm_* key of the base recipe that this method's mode does not use (e.g. TLM's P0 for an entropy method) is
    # dropped; the method's own keys and --set values always stay (stage tlm refuses those if they are inert)
    from tlm_plugin.hparams import inert_keys

    for key in inert_keys(recipe) - set(method.overrides) - set(overrides):
        recipe.pop(key)
    data_sha256 = hashlib.sha256(data_file.read_bytes()).hexdigest()
    backend = backend if predicts_separately(recipe) else "hf"
    identity = {
        "format": CELL_FORMAT,
        "recipe": {k: v for k, v in recipe.items() if k not in UNHASHED_KEYS},
        "dataset_info": entry,
        "data_sha256": data_sha256,
        "limit": limit,
    }
    if backend != "hf":  # other answers; HF cells keep the hash they had before backends existed
        identity["backend"] = backend
    config_hash = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Cell(
        dataset=dataset,
        method=method,
        dir=out / CELLS_DIR / dataset / method.name,
        recipe=recipe,
        data_dir=data_dir,
        dataset_info=entry,
        data_sha256=data_sha256,
        limit=limit,
        config_hash=config_hash,
        backend=backend,
        answers_only=answers_only,
    )


def _cached(cell: Cell) -> dict | None:
    path = cell.dir / CELL_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _check_cache(cells: list[Cell], force: bool) -> None:
    if force:
        return
    conflicts = []
    for cell in cells:
        record = _cached(cell)
        if record is not None and record.get("config_hash") != cell.config_hash:
            conflicts.append(f"{cell.dir / CELL_FILE} (made with {record.get('config_hash')}, now {cell.config_hash})")
    if conflicts:
        raise CacheConflictError(
            "these cells were made with a different configuration: "
            + "; ".join(conflicts)
            + ". Use a fresh --out, or --force to rerun them."
        )


# ----------------------------------------------------------------------------------------------------------------
# Running and scoring one cell
# ----------------------------------------------------------------------------------------------------------------


def run_cell(cell: Cell, launcher: Launcher, env: Mapping[str, str], predictor: Launcher | None = None) -> dict:
    """Write the cell's inputs, run it, score it and write cell.json (atomically, only once complete).

    A ``vllm`` cell runs ``launcher`` only to adapt (``do_predict: false``; not at all when the method does not
    train) and then ``predictor`` on ``predict.yaml`` (``adapteval.vllm_predict``), both logging to run.log.
    """
    cell.dir.mkdir(parents=True, exist_ok=True)
    for stale in (cell.dir / CELL_FILE, cell.dir / "output", cell.dir / "data"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    rows = _read_json(cell.data_dir / cell.dataset_info["file_name"])
    dataset_dir = cell.data_dir
    if cell.limit is not None:
        rows = rows[: cell.limit]
        dataset_dir = write_limited_copy(cell, rows)

    output_dir = cell.dir / "output"
    recipe = {**cell.recipe, "dataset_dir": str(dataset_dir.resolve()), "output_dir": str(output_dir.resolve())}
    if cell.backend == "vllm":
        recipe["do_predict"] = False
    recipe_path = cell.dir / "recipe.yaml"
    header = f"# llamafactory-cli train {recipe_path}\n# AdaptEval cell {cell.name} (config {cell.config_hash})\n"
    recipe_path.write_text(header + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")

    log_path = cell.dir / "run.log"
    log_path.unlink(missing_ok=True)
    start = time.perf_counter()
    if cell.backend != "vllm" or recipe.get("do_train", True):
        code = launcher(recipe_path, log_path, env)
        if code != 0:
            raise RunnerError(
                f"cell {cell.name}: llamafactory-cli exited with status {code}; log {log_path}, last lines:\n"
                + log_tail(log_path)
            )
    if cell.backend == "vllm":
        _predict_with_vllm(cell, recipe, output_dir, log_path, env, predictor or launch_vllm_predict)
    run_s = time.perf_counter() - start
    record = score_cell(cell, rows, output_dir, recipe)
    record["timings"]["run_s"] = round(run_s, 3)
    _write_json_atomic(cell.dir / CELL_FILE, record)
    return record


def _predict_with_vllm(
    cell: Cell, recipe: dict[str, Any], output_dir: Path, log_path: Path, env: Mapping[str, str], predictor: Launcher
) -> None:
    from adapteval.vllm_predict import PREDICTIONS_KEY, inference_args

    adapter = output_dir if recipe.get("do_train", True) else None
    if adapter is not None and not (output_dir / "adapter_config.json").is_file():
        raise RunnerError(f"cell {cell.name}: the training run saved no LoRA adapter in {output_dir}")
    args = {**inference_args(recipe, adapter), PREDICTIONS_KEY: str((output_dir / PREDICTIONS).resolve())}
    predict_path = cell.dir / "predict.yaml"
    header = f"# python -m adapteval.vllm_predict {predict_path}\n# AdaptEval cell {cell.name}: answers with vLLM\n"
    predict_path.write_text(header + yaml.safe_dump(args, sort_keys=False), encoding="utf-8")
    code = predictor(predict_path, log_path, env)
    if code != 0:
        raise RunnerError(
            f"cell {cell.name}: the vLLM predict step exited with status {code}; log {log_path}, last lines:\n"
            + log_tail(log_path)
        )


def write_limited_copy(cell: Cell, rows: list[dict]) -> Path:
    """The first ``limit`` rows as a dataset folder of the cell; the full data is never modified."""
    data = cell.dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    file_name = Path(cell.dataset_info["file_name"]).name
    (data / file_name).write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    info = {cell.dataset: {**cell.dataset_info, "file_name": file_name}}
    (data / DATASET_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return data


def read_predictions(path: Path, n_rows: int, cell_name: str) -> list[str]:
    """The ``predict`` texts of generated_predictions.jsonl, one per input row (else ``RunnerError``)."""
    if not path.is_file():
        raise RunnerError(f"cell {cell_name}: the run wrote no {path} (does the recipe set do_predict: true?)")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != n_rows:
        what = "missing" if len(lines) < n_rows else "extra"
        raise RunnerError(
            f"cell {cell_name}: {path.name} has {len(lines)} predictions for {n_rows} input rows "
            f"({abs(n_rows - len(lines))} {what}); LLaMA-Factory may have dropped rows it could not encode "
            f"(e.g. an empty prompt) - see {path.parent.parent / 'run.log'}"
        )
    predictions = []
    for number, line in enumerate(lines, start=1):
        try:
            predictions.append(json.loads(line).get("predict") or "")
        except (ValueError, AttributeError) as err:
            raise RunnerError(f"cell {cell_name}: {path.name} line {number} is not a JSON object: {err}") from err
    return predictions


def answer_fields(output_dir: Path) -> dict[str, Any]:
    """Bits per byte of the reference answers from the run's tlm_scores.jsonl: means and aligned per-row lists over
    the rows whose answer was measured and not truncated (all None when the run did not measure them)."""
    path = output_dir / "tlm_scores.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
    measured = [r for r in records if r.get("answer_bpb") is not None and not r.get("answer_truncated")]
    fields: dict[str, Any] = {"answer_rows": [r["index"] for r in measured] if measured else None}
    for key in ("answer_bpb", "answer_bpb_base", "answer_content_bpb", "answer_content_bpb_base"):
        values = [r.get(key) for r in measured]
        ok = measured and all(v is not None for v in values)
        fields[f"{key}_per_row"] = values if ok else None
        fields[key] = sum(values) / len(values) if ok else None
    return fields


def vote_on_extracted_answers(dataset: str, output_dir: Path, predictions: list[str]) -> list[str]:
    """With ``tlm_demo_votes``, stage tlm keeps the majority of the answers' exact texts; for an exact-match dataset
    the vote is taken again on the extracted answers (two answers saying "B" and "The answer is B" agree). Returns
    the predictions with each voted row's answer replaced by one that carries the winning extracted answer."""
    from adapteval.extract import ANSWER_FORMATS

    spec = get_dataset(dataset).SPEC
    path = output_dir / "tlm_demos.jsonl"
    if spec.answer_format is None or not path.is_file():
        return predictions
    extract = ANSWER_FORMATS[spec.answer_format].extract_prediction
    out = list(predictions)
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        votes = record.get("votes") or []
        if len(votes) < 2:
            continue
        answers = [extract(v) for v in votes]
        counts: dict[str, int] = {}
        for a in answers:
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        if counts:
            best = max(counts, key=lambda a: (counts[a], -answers.index(a)))
            out[record["index"]] = votes[answers.index(best)]
    return out


def score_cell(cell: Cell, rows: list[dict], output_dir: Path, recipe: dict[str, Any]) -> dict:
    """The cell.json record of a finished run (references are the data file's ``output`` texts)."""
    start = time.perf_counter()
    answers = answer_fields(output_dir)
    if not cell.answers_only:
        predictions = read_predictions(output_dir / PREDICTIONS, len(rows), cell.name)
        predictions = vote_on_extracted_answers(cell.dataset, output_dir, predictions)
        result = score_predictions(cell.dataset, predictions, [row["output"] for row in rows])
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
    summary = _read_json(output_dir / SUMMARY) if (output_dir / SUMMARY).is_file() else {}
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


# ----------------------------------------------------------------------------------------------------------------
# Subprocess and files
# ----------------------------------------------------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    """The environment of each run: this Python's bin folder first on PATH (LLaMA-Factory's torchrun launcher
    looks ``torchrun`` up there)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def launch_llamafactory(recipe_path: Path, log_path: Path, env: Mapping[str, str]) -> int:
    """``llamafactory-cli train recipe.yaml`` with stdout and stderr in ``log_path``; returns the exit code."""
    cli = shutil.which("llamafactory-cli", path=env.get("PATH"))
    if cli is None:
        raise RunnerError("llamafactory-cli is not on PATH; install LLaMA-Factory in this environment")
    with log_path.open("w", encoding="utf-8") as log:
        log.write(f"$ {cli} train {recipe_path}\n")
        log.flush()
        return subprocess.run(
            [cli, "train", str(recipe_path)], stdout=log, stderr=subprocess.STDOUT, env=dict(env)
        ).returncode


def launch_vllm_predict(predict_path: Path, log_path: Path, env: Mapping[str, str]) -> int:
    """``python -m adapteval.vllm_predict predict.yaml``, appending to ``log_path``; returns the exit code."""
    command = [sys.executable, "-m", "adapteval.vllm_predict", str(predict_path)]
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=dict(env)).returncode


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return "(no log written)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataUnavailableError(f"{path} does not exist") from None
    except ValueError as err:
        raise DataUnavailableError(f"{path} is not valid JSON: {err}") from err


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
