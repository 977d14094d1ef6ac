"""Run AdaptEval: every (dataset, method) cell as one ``llamafactory-cli train`` run, scored and cached.

A cell lives in ``<out>/cells/<dataset>/<method>/``::

    recipe.yaml    the exact recipe run (``llamafactory-cli train recipe.yaml`` reproduces the cell)
    predict.yaml   with ``--backend vllm``: the inference arguments of the vLLM predict step (adapteval.vllm_predict)
    run.log        stdout and stderr of that run
    data/          with a row limit: the first N rows of the dataset and a dataset_info.json for them
    output/        LLaMA-Factory's output_dir (adapter, generated_predictions.jsonl, tlm_summary.json, ...)
    cell.json      the scored result (the format below, ``adapteval.plan.CELL_FORMAT``); written last, atomically

cell.json (``"format": "adapteval-cell/1"``)::

    {"dataset", "title", "bench", "method", "method_description", "backend",   # "hf" or "vllm"
     "metric", "score", "scores": {metric: value},          # headline metric and its group (adapteval.metrics)
     "n", "n_empty", "empty_rows": [row indices],          # empty predictions are scored 0 and listed here
     "per_sample": [headline metric per row],
     "n_second_attempts",                                  # pass@2 (ARC) only: rows with a second attempt (top2)
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

The parts: ``adapteval.plan`` resolves every cell (recipe, data, config hash) and checks the cache before anything
runs, ``adapteval.launch`` runs a cell, ``adapteval.scoring`` turns its outputs into the record above. A cell whose
cell.json has the same config hash is reused (see ``adapteval.plan``).

The runner returns data and never prints; pass ``progress`` to hear about each finished cell.
"""

import threading
from collections.abc import Callable
from pathlib import Path

from adapteval import launch, parallel
from adapteval.builder import DATASET_INFO
from adapteval.methods import TEACHER_METHODS, resolve_methods
from adapteval.plan import cached, check_cache, load_base_recipe, parse_overrides, plan_cell, prepare_data
from adapteval.records import read_json


Progress = Callable[[int, int, dict, bool], None]  # (cells done, cells in total, the cell, reused from cache)


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
    launcher: launch.Launcher | None = None,
    predictor: launch.Launcher | None = None,
    answers_only: bool = False,
    teacher: str | None = None,
    workers: int = 1,
    gpus_per_cell: int | None = None,
    ray_address: str | None = None,
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
    ``workers`` > 1 runs that many cells at once, each with ``gpus_per_cell`` of the visible GPUs; ``ray_address``
    submits the cells to a Ray cluster (``adapteval.parallel``). Then a failed cell is recorded and the others go
    on, and ``parallel.CellsFailedError`` names the failed ones at the end (its ``records``: the others).
    """
    launch.check_backend(backend)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    out = Path(out)
    method_list = resolve_methods(methods)
    everywhere, per_method = parse_overrides(overrides or [], [m.name for m in method_list])
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
    dataset_info = read_json(data_dir / DATASET_INFO)

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
    check_cache(cells, force)

    env = launch.subprocess_env()
    if workers > 1 or ray_address is not None:
        return _run_at_once(cells, force, env, launcher, predictor, progress, workers, gpus_per_cell, ray_address)
    records = []
    for done, cell in enumerate(cells, start=1):
        record = None if force else cached(cell)  # after check_cache: None, or a record of this config
        is_cached = record is not None
        if not is_cached:
            record = launch.run_cell(
                cell, launcher or launch.launch_llamafactory, env, predictor or launch.launch_vllm_predict
            )
        records.append(record)
        if progress is not None:
            progress(done, len(cells), record, is_cached)
    return records


def _run_at_once(cells, force, env, launcher, predictor, progress, workers, gpus_per_cell, ray_address) -> list[dict]:
    """The cached cells first (reported at once), then the others at once: locally or on Ray."""
    records: list[dict | None] = [None if force else cached(cell) for cell in cells]
    finished = 0
    lock = threading.Lock()

    def done(position: int, record: dict, is_cached: bool = False) -> None:
        nonlocal finished
        with lock:
            finished += 1
            if progress is not None:
                progress(finished, len(cells), record, is_cached)

    for position, record in enumerate(records):
        if record is not None:
            done(position, record, True)
    todo = [p for p, record in enumerate(records) if record is None]
    if ray_address is not None:
        return parallel.run_on_ray(cells, todo, records, ray_address, gpus_per_cell, done)
    return parallel.run_local(
        cells,
        todo,
        records,
        workers,
        gpus_per_cell,
        env,
        launcher or launch.launch_llamafactory,
        predictor or launch.launch_vllm_predict,
        done,
    )
