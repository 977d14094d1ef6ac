"""Planning AdaptEval cells: the base recipe, ``--set`` values, the data folder, each cell's resolved recipe and
config hash, and the cache of finished cells (``cell.json``).

Cache: ``config_hash`` covers the resolved recipe (without the runner's own paths), the dataset's
dataset_info.json entry, the full data file's sha256 and the row limit. A cell whose cell.json has the same hash is
reused; a different hash is refused unless ``force``. A cell without cell.json (never run, failed, interrupted) is
run from scratch, so an interrupted run resumes where it stopped.
"""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from adapteval.builder import DATASET_INFO, MANIFEST, build
from adapteval.datasets._base import BENCHES, PAPER_BENCHES
from adapteval.errors import CacheConflictError, DataUnavailableError, UnknownNameError
from adapteval.methods import Method
from adapteval.records import CELL_FILE, CELLS_DIR, read_json
from adapteval.registry import ALL, DATASETS, get_dataset, resolve
from tlm_plugin.hparams import inert_keys


CELL_FORMAT = "adapteval-cell/1"
# Keys each cell sets itself; a base recipe or --set value for them is replaced / refused.
RUNNER_KEYS = ("dataset", "eval_dataset", "dataset_dir", "output_dir")
# Runner paths are left out of the config hash: the data is hashed by content, and moving --out keeps the cache.
UNHASHED_KEYS = ("dataset_dir", "output_dir")

# The paper's settings (Hu et al. 2025, Sec. 5.1 / App. B). The learning rate depends on the bench and is only
# used when the base recipe sets none.
# the TLM paper per bench; fewshot: the few-shot TTT paper (Akyürek et al.) on BIG-Bench Hard; arc, arc-dev: its ARC
# test-time training of 1B/3B models (8B: 1e-4); arc-sft: its fine-tuning on similar tasks before test time
PAPER_LEARNING_RATES = {
    "domain": 5.0e-5,
    "instruction": 5.0e-5,
    "reasoning": 1.0e-6,
    "fewshot": 1.0e-4,
    "arc": 5.0e-5,
    "arc-dev": 5.0e-5,
    "arc-sft": 2.5e-5,
}
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


def predicts_separately(recipe: Mapping[str, Any]) -> bool:
    """Whether a cell's answers can come after its adaptation (offline), not in between updates (online, per
    prompt)."""
    per_prompt = recipe.get("tlm_mode") == "per_prompt" or recipe.get("tlm_reset") == "prompt"
    return recipe.get("tlm_mode", "offline") != "online" and not per_prompt


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
    return torch.cuda.is_available()


def prepare_data(
    bench: str, out: Path, data_dir: str | Path | None, offline: bool, fixed_dir: str | Path | None
) -> tuple[Path, list[str]]:
    """The data folder and the dataset names to run, building the missing ones into ``<out>/data`` if needed."""
    if data_dir is not None:
        data_dir = Path(data_dir).resolve()
        manifest = read_json(data_dir / MANIFEST)
        return data_dir, names_in_build(bench, manifest.get("datasets", {}), data_dir)
    data_dir = out / "data"
    names = resolve(bench, offline=offline, fixed_dir=fixed_dir)
    built = read_json(data_dir / MANIFEST).get("datasets", {}) if (data_dir / MANIFEST).exists() else {}
    missing = [name for name in names if name not in built]
    if missing:
        build(missing, data_dir, offline=offline, fixed_dir=fixed_dir)
    return data_dir, names


def names_in_build(bench: str, built: Mapping[str, Any], data_dir: Path) -> list[str]:
    """Resolve benches and names against what a build folder holds (registry order within a bench)."""
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


def cached(cell: Cell) -> dict | None:
    """The cell's finished record (cell.json), ``{}`` for an unreadable one, None when it has none."""
    path = cell.dir / CELL_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def check_cache(cells: list[Cell], force: bool) -> None:
    """Refuse (``CacheConflictError``) cells whose cell.json was made with another configuration, unless ``force``."""
    if force:
        return
    conflicts = []
    for cell in cells:
        record = cached(cell)
        if record is not None and record.get("config_hash") != cell.config_hash:
            conflicts.append(f"{cell.dir / CELL_FILE} (made with {record.get('config_hash')}, now {cell.config_hash})")
    if conflicts:
        raise CacheConflictError(
            "these cells were made with a different configuration: "
            + "; ".join(conflicts)
            + ". Use a fresh --out, or --force to rerun them."
        )
