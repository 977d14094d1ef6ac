"""Running one AdaptEval cell: its inputs written into the cell folder, ``llamafactory-cli train`` (and with
``--backend vllm`` the vLLM predict step, ``adapteval.vllm_predict``) as subprocesses logging to run.log, then the
cell scored (``adapteval.scoring``) and its cell.json written."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from adapteval.builder import DATASET_INFO
from adapteval.errors import RunnerError
from adapteval.plan import Cell
from adapteval.records import CELL_FILE, read_json, write_json
from adapteval.scoring import score_cell
from adapteval.vllm_predict import PREDICTIONS_KEY, inference_args
from tlm_plugin.train.outputs import PREDICTIONS_FILE


BACKENDS = ("hf", "vllm")
LOG_TAIL_LINES = 40
FAILED_FILE = "failed.json"  # a cell that failed in a run of many at once (adapteval.parallel)
ADAPTER_CONFIG = "adapter_config.json"  # what PEFT saves with a LoRA adapter

Launcher = Callable[[Path, Path, Mapping[str, str]], int]  # (recipe.yaml, run.log, environment) -> exit code


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
    return importlib.util.find_spec("vllm") is not None


def run_cell(cell: Cell, launcher: Launcher, env: Mapping[str, str], predictor: Launcher | None = None) -> dict:
    """Write the cell's inputs, run it, score it and write cell.json (atomically, only once complete).

    A ``vllm`` cell runs ``launcher`` only to adapt (``do_predict: false``; not at all when the method does not
    train) and then ``predictor`` on ``predict.yaml`` (``adapteval.vllm_predict``), both logging to run.log.
    """
    cell.dir.mkdir(parents=True, exist_ok=True)
    for stale in (cell.dir / CELL_FILE, cell.dir / FAILED_FILE, cell.dir / "output", cell.dir / "data"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    rows = read_json(cell.data_dir / cell.dataset_info["file_name"])
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
    write_json(cell.dir / CELL_FILE, record)
    return record


def _predict_with_vllm(
    cell: Cell, recipe: dict[str, Any], output_dir: Path, log_path: Path, env: Mapping[str, str], predictor: Launcher
) -> None:
    adapter = output_dir if recipe.get("do_train", True) else None
    if adapter is not None and not (output_dir / ADAPTER_CONFIG).is_file():
        raise RunnerError(f"cell {cell.name}: the training run saved no LoRA adapter in {output_dir}")
    args = {**inference_args(recipe, adapter), PREDICTIONS_KEY: str((output_dir / PREDICTIONS_FILE).resolve())}
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
