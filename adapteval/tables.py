"""AdaptEval results as data first, tables second, all rebuilt from the cells' cell.json files only.

``write_reports(out)`` writes into ``out``:

results.json (``"format": "adapteval-results/1"``)::

    {"format": "adapteval-results/1",
     "settings": {"models": [...], "templates": [...], "limits": [...],     # distinct values over the cells
                  "datasets": [...], "methods": [...], "n_cells": int},       # row and column order of the tables
     "methods": [{"name", "description"}],
     "cells": [{"dataset", "title", "bench", "method", "metric", "score", "scores", "base_score",
                "relative_change",                                            # (score - base) / base, or None
                "diff_vs_base", "diff_ci_low", "diff_ci_high",                # score - base and its paired
                                                                              # bootstrap CI (adapteval.stats), or None
                "n", "n_empty", "empty_rows", "log_ppl_before", "log_ppl_after",  # tlm_summary.json means
                "log_ppl_user_before", "log_ppl_user_after", "loss_tokens", "log_p0_used", "n_selected",
                "backward_passes", "limit", "config_hash", "data_sha256", "timings"}]}

results.csv     one row per cell (the same fields, flat; every metric of the cell's group as ``score_<metric>``)
results.md      the paper's Table 2/3 layout: rows are datasets grouped by bench, columns are methods, each cell
                ``score (relative change vs base)``, e.g. ``0.3212 (+31.1%)`` (ARC: a pass@2 row, then a pass@1
                row); then, when the cells have per-row
                scores, a second table in the same layout with each non-base cell's change vs base and its paired
                95% bootstrap interval, e.g. ``+0.0762 [+0.0412, +0.1101]``; then, for cells that adapted, the
                mean input log-perplexity before -> after, over the scored tokens and over the user's own tokens
results.png     grouped bar chart (``adapteval.plot``)

The change vs base is the mean of per-row differences (``per_sample`` of the cell minus that of the base cell
of the same dataset, row i with row i); its interval is ``adapteval.stats.paired_bootstrap`` (``CI_RESAMPLES``
resamples, seed ``CI_SEED``, ``CI_CONFIDENCE``). All three are None when a cell or its base lacks per-row scores,
or the two were not scored on the same rows (row counts, data_sha256 or limit differ).

Orders are fixed (bench, then registry order of datasets; registry order of methods), so the same cells always give
byte-identical json, csv and md.
"""

import csv
import io
import json
from pathlib import Path
from typing import Any

from adapteval.datasets._base import BENCHES
from adapteval.methods import BASE, METHODS
from adapteval.metrics import METRICS
from adapteval.plot import plot_results
from adapteval.records import CELL_FILE, CELLS_DIR
from adapteval.registry import DATASETS
from adapteval.stats import format_interval, format_percent, paired_bootstrap


RESULTS_FORMAT = "adapteval-results/1"
CI_CONFIDENCE = 0.95
CI_RESAMPLES = 2000
CI_SEED = 0
CI_KEYS = ("diff_vs_base", "diff_ci_low", "diff_ci_high")
BENCH_TITLES = {
    "domain": "DomainBench",
    "instruction": "InstructionBench",
    "reasoning": "ReasoningBench",
    "fewshot": "FewShotBench",
    "arc": "ARC",
    "arc-sft": "ARC sft data",
}
METRIC_TITLES = {"rougeLsum": "ROUGE-Lsum", "em": "EM", "pass@2": "pass@2", "pass@1": "pass@1"}
# Metrics of a headline's group that results.md shows in rows of their own under the headline's (ARC: pass@1)
SHOWN_ALONGSIDE = {"pass@2": ("pass@1",)}
CELL_KEYS = (
    "dataset",
    "title",
    "bench",
    "method",
    "metric",
    "score",
    "scores",
    "base_score",
    "relative_change",
    "n",
    "n_empty",
    "empty_rows",
    "answer_bpb",
    "answer_bpb_base",
    "answer_content_bpb",
    "answer_content_bpb_base",
    "log_ppl_before",
    "log_ppl_after",
    "log_ppl_user_before",
    "log_ppl_user_after",
    "loss_tokens",
    "log_p0_used",
    "n_selected",
    "backward_passes",
    "limit",
    "config_hash",
    "data_sha256",
    "timings",
)
BPB_KEYS = ("answer_rows_n", "bpb_relative_change", "bpb_diff", "bpb_ci_low", "bpb_ci_high")
CONTENT_BPB_KEYS = ("content_bpb_relative_change", "content_bpb_diff", "content_bpb_ci_low", "content_bpb_ci_high")
CSV_KEYS = (
    "bench",
    "dataset",
    "method",
    "metric",
    "score",
    "base_score",
    "relative_change",
    *CI_KEYS,
    "n",
    "n_empty",
    "log_ppl_before",
    "log_ppl_after",
    "log_ppl_user_before",
    "log_ppl_user_after",
    "loss_tokens",
    "log_p0_used",
    "n_selected",
    "backward_passes",
    "answer_bpb",
    "answer_bpb_base",
    *BPB_KEYS,
    "answer_content_bpb",
    "answer_content_bpb_base",
    *CONTENT_BPB_KEYS,
    "run_s",
    "limit",
    "config_hash",
)


def load_cells(out: str | Path) -> list[dict]:
    """Every finished cell under ``<out>/cells``, in table order (bench, dataset, method)."""
    paths = sorted(Path(out).glob(f"{CELLS_DIR}/*/*/{CELL_FILE}"))
    if not paths:
        raise ValueError(
            f"no finished cell in {Path(out) / CELLS_DIR} (expected */*/{CELL_FILE}); run `adapteval run`"
        )
    cells = []
    for path in paths:
        try:
            cells.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); delete the cell to rerun it") from err
    dataset_order, method_order = dataset_names(cells), method_names(cells)
    return sorted(cells, key=lambda c: (dataset_order.index(c["dataset"]), method_order.index(c["method"])))


def dataset_names(cells: list[dict]) -> list[str]:
    present = {cell["dataset"] for cell in cells}
    bench_of = {cell["dataset"]: cell["bench"] for cell in cells}
    registered = [name for name in DATASETS if name in present]
    others = sorted(present - set(registered))
    return sorted(registered + others, key=lambda name: _bench_rank(bench_of[name]))


def _bench_rank(bench: str) -> int:
    return BENCHES.index(bench) if bench in BENCHES else len(BENCHES)


def method_names(cells: list[dict]) -> list[str]:
    present = {cell["method"] for cell in cells}
    return [name for name in METHODS if name in present] + sorted(present - set(METHODS))


def relative_change(score: float | None, base: float | None) -> float | None:
    """(score - base) / base, the paper's "relative improvement"; None without a positive base score."""
    if score is None or base is None or base <= 0:
        return None
    return (score - base) / base


def paired_change(cell: dict, base_cell: dict | None) -> dict[str, float | None]:
    """``diff_vs_base``, ``diff_ci_low``, ``diff_ci_high`` of ``cell`` vs ``base_cell`` (all None if not paired)."""
    none = dict.fromkeys(CI_KEYS)
    if base_cell is None or cell is base_cell or cell["method"] == BASE:
        return none
    scores, base_scores = cell.get("per_sample"), base_cell.get("per_sample")
    if not scores or not base_scores or len(scores) != len(base_scores):
        return none
    if cell.get("data_sha256") != base_cell.get("data_sha256") or cell.get("limit") != base_cell.get("limit"):
        return none  # not the same rows
    diff, low, high = paired_bootstrap(
        base_scores, scores, n_resamples=CI_RESAMPLES, seed=CI_SEED, confidence=CI_CONFIDENCE
    )
    return dict(zip(CI_KEYS, (diff, low, high)))


def bpb_change(cell: dict, prefix: str = "answer") -> dict[str, float | None]:
    """The answers' bits per byte after vs before adaptation on the cell's own rows: relative change of the means,
    mean per-row difference and its paired bootstrap interval (None without per-row values or for ``base``)."""
    out_prefix = "bpb" if prefix == "answer" else "content_bpb"
    keys = [f"{out_prefix}_relative_change", f"{out_prefix}_diff", f"{out_prefix}_ci_low", f"{out_prefix}_ci_high"]
    none = dict.fromkeys(keys)
    after, before = cell.get(f"{prefix}_bpb_per_row"), cell.get(f"{prefix}_bpb_base_per_row")
    if cell["method"] == BASE or not after or not before or len(after) != len(before):
        return none
    diff, low, high = paired_bootstrap(before, after, n_resamples=CI_RESAMPLES, seed=CI_SEED, confidence=CI_CONFIDENCE)
    mean_before = sum(before) / len(before)
    return dict(zip(keys, (diff / mean_before if mean_before > 0 else None, diff, low, high)))


def build_results(cells: list[dict]) -> dict[str, Any]:
    """The results.json document of ``cells`` (as ``load_cells`` returns them)."""
    base_cells = {cell["dataset"]: cell for cell in cells if cell["method"] == BASE}
    base = {name: cell["score"] for name, cell in base_cells.items()}
    rows = []
    for cell in cells:
        row = {key: cell.get(key) for key in CELL_KEYS}
        row["base_score"] = base.get(cell["dataset"])
        row["relative_change"] = relative_change(cell["score"], row["base_score"])
        row.update(paired_change(cell, base_cells.get(cell["dataset"])))
        row["answer_rows_n"] = len(cell["answer_rows"]) if cell.get("answer_rows") else None
        row.update(bpb_change(cell, "answer"))
        row.update(bpb_change(cell, "answer_content"))
        rows.append(row)
    methods = method_names(cells)
    descriptions = {cell["method"]: cell.get("method_description", "") for cell in cells}
    return {
        "format": RESULTS_FORMAT,
        "settings": {
            "models": _distinct(cell.get("recipe", {}).get("model_name_or_path") for cell in cells),
            "templates": _distinct(cell.get("recipe", {}).get("template") for cell in cells),
            "limits": _distinct(cell.get("limit") for cell in cells),
            "datasets": dataset_names(cells),
            "methods": methods,
            "n_cells": len(cells),
            "ci": {
                "method": "paired percentile bootstrap over rows",
                "confidence": CI_CONFIDENCE,
                "resamples": CI_RESAMPLES,
                "seed": CI_SEED,
            },
        },
        "methods": [{"name": name, "description": descriptions[name]} for name in methods],
        "cells": rows,
    }


def _distinct(values) -> list:
    return list(dict.fromkeys(values))


def results_csv(results: dict[str, Any]) -> str:
    metric_keys = [f"score_{name}" for name in METRICS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*CSV_KEYS, *metric_keys], lineterminator="\n")
    writer.writeheader()
    for cell in results["cells"]:
        row = {key: cell.get(key) for key in CSV_KEYS}
        row["run_s"] = (cell.get("timings") or {}).get("run_s")
        row.update({f"score_{name}": value for name, value in (cell.get("scores") or {}).items()})
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def format_score(score: float | None, base: float | None, is_base: bool) -> str:
    """``0.3212 (+31.1%)``; the base column and cells without a positive base score show the score alone. A
    non-zero change is never shown as 0 (``+0.03%``)."""
    if score is None:
        return "-"
    change = None if is_base else relative_change(score, base)
    return f"{score:.4f}" if change is None else f"{score:.4f} ({format_percent(change)})"


def results_markdown(results: dict[str, Any]) -> str:
    """The paper's Table 2/3 layout, with an Avg. row for every bench of two or more datasets."""
    settings, methods = results["settings"], results["settings"]["methods"]
    by_key = {(cell["dataset"], cell["method"]): cell for cell in results["cells"]}
    lines = [
        "# AdaptEval results",
        "",
        f"Model: {', '.join(f'`{m}`' for m in settings['models'])}; template: {', '.join(map(str, settings['templates']))}; "
        f"rows per dataset: {_limits_text(settings['limits'])}.",
        "Each cell is the headline metric, with the relative change vs `base` in parentheses.",
        "",
        "| Bench | Dataset | Metric | n | " + " | ".join(methods) + " |",
        "|---|---|---|---:|" + "---:|" * len(methods),
    ]
    bench_of = {cell["dataset"]: cell["bench"] for cell in results["cells"]}
    for bench in dict.fromkeys(bench_of[name] for name in settings["datasets"]):
        names = [name for name in settings["datasets"] if bench_of[name] == bench]
        for position, name in enumerate(names):
            cells = [by_key.get((name, method)) for method in methods]
            first = next(cell for cell in cells if cell is not None)
            base = by_key.get((name, BASE), {}).get("score")
            shown = [format_score(c and c["score"], base, m == BASE) for c, m in zip(cells, methods)]
            label = BENCH_TITLES.get(bench, bench) if position == 0 else ""
            metric = METRIC_TITLES.get(first["metric"], first["metric"])
            lines.append(f"| {label} | {name} | {metric} | {first['n']} | " + " | ".join(shown) + " |")
            for other in SHOWN_ALONGSIDE.get(first["metric"], ()):
                lines.append(_alongside_row(name, other, cells, methods, by_key.get((name, BASE))))
        if len(names) > 1:
            lines.append(_average_row(names, methods, by_key))
    empty = [c for c in results["cells"] if c.get("n_empty")]
    if empty:
        lines += [
            "",
            "Empty predictions (scored 0): "
            + "; ".join(f"{c['dataset']}/{c['method']}: {c['n_empty']}" for c in empty)
            + ".",
        ]
    lines += _ci_table(results)
    lines += _bpb_table(results)
    lines += _log_ppl_table(results)
    return "\n".join(lines) + "\n"


def _bpb_cell(cell: dict | None, prefix: str) -> str:
    """``1.2345 (-4.4%) [-0.102, -0.034]*``: bits per byte after adaptation, change vs the unadapted model on the
    same rows, the paired interval of the per-row difference (``*`` when it excludes 0; ``stats.format_interval``)."""
    key = "answer_bpb" if prefix == "bpb" else "answer_content_bpb"
    if cell is None or cell.get(key) is None:
        return "-"
    if cell.get(f"{prefix}_diff") is None:
        return f"{cell[key]:.4f}"
    rel, low, high = cell[f"{prefix}_relative_change"], cell[f"{prefix}_ci_low"], cell[f"{prefix}_ci_high"]
    change = "" if rel is None else f"({format_percent(rel)}) "
    return f"{cell[key]:.4f} {change}{format_interval(low, high, 3)}"


def _bpb_table(results: dict[str, Any]) -> list[str]:
    """Bits per byte of the reference answers, datasets x methods, for the label tokens and the content tokens."""
    cells = [c for c in results["cells"] if c.get("answer_bpb") is not None]
    if not cells:
        return []
    settings = results["settings"]
    methods = [m for m in settings["methods"] if any(c["method"] == m for c in cells)]
    by_key = {(c["dataset"], c["method"]): c for c in cells}
    lines = []
    for prefix, title, what in (
        (
            "bpb",
            "Reference answers, bits per byte (lower is better)",
            "the tokens `stage: sft` trains on: the answer and the template's closing tokens",
        ),
        (
            "content_bpb",
            "Reference answers' own content, bits per byte",
            "the answer's content tokens only, without the template's closing tokens",
        ),
    ):
        lines += [
            "",
            f"## {title}",
            "",
            f"Teacher-forced likelihood of each row's reference answer over {what}, in bits per UTF-8 byte of the "
            "answer, under the model that produced the row's prediction; in parentheses the change of the mean vs "
            "the unadapted model on the same rows, then the paired 95% bootstrap interval of the per-row "
            "difference (`*`: it excludes 0). The `base` column is the unadapted model.",
            "",
            "| Dataset | n | " + " | ".join(methods) + " |",
            "|---|---:|" + "---:|" * len(methods),
        ]
        for name in settings["datasets"]:
            row = [by_key.get((name, m)) for m in methods]
            present = [c for c in row if c is not None]
            if not present:
                continue
            n = present[0].get("answer_rows_n") or "-"
            lines.append(f"| {name} | {n} | " + " | ".join(_bpb_cell(c, prefix) for c in row) + " |")
    return lines


def _arrow(before: float | None, after: float | None) -> str:
    return "-" if before is None or after is None else f"{before:.3f} → {after:.3f}"


def _log_ppl_table(results: dict[str, Any]) -> list[str]:
    """Mean input log-perplexity before -> after per adapted cell, over its scope and the user's tokens."""
    cells = [c for c in results["cells"] if c.get("log_ppl_before") is not None and c.get("log_ppl_after") is not None]
    if not cells:
        return []
    lines = [
        "",
        "## Input log-perplexity before → after adaptation",
        "",
        "Mean over the rows of the log-perplexity TLM scores (`scope`: the whole templated prompt, or the user's "
        "tokens with `tlm_loss_tokens: user`) and over the user's own tokens only (`user tokens`); "
        "`selected` = prompts trained on (`-` for a method that trains nothing), `log P0` = the threshold used.",
        "",
        "| Dataset | Method | scope | scope log-ppl | user-token log-ppl | selected | log P0 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for c in cells:
        p0 = c.get("log_p0_used")
        lines.append(
            f"| {c['dataset']} | {c['method']} | {c.get('loss_tokens') or '-'} | "
            f"{_arrow(c['log_ppl_before'], c['log_ppl_after'])} | "
            f"{_arrow(c.get('log_ppl_user_before'), c.get('log_ppl_user_after'))} | "
            f"{_selected(c)} | "
            f"{'-' if p0 is None else f'{p0:.3f}'} |"
        )
    return lines


def _selected(cell: dict) -> str:
    """``2/3``: prompts trained on of the cell's rows; ``-`` for a method that trains nothing (``Method.trains``)."""
    method = METHODS.get(cell["method"])
    if method is not None and not method.trains:
        return "-"
    return f"{'-' if cell.get('n_selected') is None else cell['n_selected']}/{cell['n']}"


def format_ci(cell: dict | None) -> str:
    """``+0.0762 [+0.0412, +0.1101]``, with ``*`` when the interval excludes 0 (``stats.format_interval``); ``-``
    without an interval."""
    if cell is None or cell.get("diff_vs_base") is None:
        return "-"
    diff, low, high = (cell[key] for key in CI_KEYS)
    return format_interval(low, high, 4, diff=diff)


def _ci_table(results: dict[str, Any]) -> list[str]:
    """The change vs base with its paired bootstrap interval, per dataset and non-base method (none: no lines)."""
    if not any(cell.get("diff_vs_base") is not None for cell in results["cells"]):
        return []
    settings = results["settings"]
    methods = [method for method in settings["methods"] if method != BASE]
    by_key = {(cell["dataset"], cell["method"]): cell for cell in results["cells"]}
    ci = settings.get("ci", {})
    lines = [
        "",
        f"## Change vs base, paired {ci.get('confidence', CI_CONFIDENCE) * 100:g}% bootstrap interval",
        "",
        "Each cell is the mean per-row difference (method - base, in the headline metric) and its percentile "
        f"interval over {ci.get('resamples', CI_RESAMPLES)} paired resamples of the rows "
        f"(seed {ci.get('seed', CI_SEED)}); `*` marks an interval that excludes 0.",
        "",
        "| Bench | Dataset | Metric | n | " + " | ".join(methods) + " |",
        "|---|---|---|---:|" + "---:|" * len(methods),
    ]
    bench_of = {cell["dataset"]: cell["bench"] for cell in results["cells"]}
    shown_bench = None
    for name in settings["datasets"]:
        cells = [by_key.get((name, method)) for method in methods]
        present = [cell for cell in cells if cell is not None]
        if not present:
            continue
        bench = bench_of[name]
        label = BENCH_TITLES.get(bench, bench) if bench != shown_bench else ""
        shown_bench = bench
        metric = METRIC_TITLES.get(present[0]["metric"], present[0]["metric"])
        lines.append(
            f"| {label} | {name} | {metric} | {present[0]['n']} | " + " | ".join(map(format_ci, cells)) + " |"
        )
    return lines


def _alongside_row(name: str, metric: str, cells: list[dict | None], methods: list[str], base: dict | None) -> str:
    """The row of a second metric of the group (``metric`` in ``scores``), changes vs the base cell's value."""

    def value(cell: dict | None) -> float | None:
        return (cell.get("scores") or {}).get(metric) if cell is not None else None

    shown = [format_score(value(c), value(base), m == BASE) for c, m in zip(cells, methods)]
    n = next((c["n"] for c in cells if c is not None), "")
    return f"|  | {name} | {METRIC_TITLES.get(metric, metric)} | {n} | " + " | ".join(shown) + " |"


def _average_row(names: list[str], methods: list[str], by_key: dict) -> str:
    """Mean over the bench's datasets that every method has; the change is that of the means."""
    complete = [name for name in names if all((name, method) in by_key for method in methods)]
    means = {m: sum(by_key[(n, m)]["score"] for n in complete) / len(complete) if complete else None for m in methods}
    shown = [format_score(means[m], means.get(BASE), m == BASE) for m in methods]
    return f"|  | **Avg.** |  | {len(complete)} sets | " + " | ".join(shown) + " |"


def _limits_text(limits: list) -> str:
    texts = ["all" if limit is None else f"first {limit}" for limit in limits]
    return ", ".join(texts) if texts else "all"


def write_reports(out: str | Path) -> dict[str, Path]:
    """Write results.json/.csv/.md and the bar chart from the cells in ``out``; returns the paths written."""
    out = Path(out)
    results = build_results(load_cells(out))
    paths = {name: out / f"results.{name}" for name in ("json", "csv", "md", "png")}
    paths["json"].write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    paths["csv"].write_text(results_csv(results), encoding="utf-8")
    paths["md"].write_text(results_markdown(results), encoding="utf-8")
    plot_results(results, paths["png"])
    return paths
