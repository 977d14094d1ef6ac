# Run: .venv/bin/python bench/bench_tlm.py [--n 24] [--repeat 3] [--out DIR] [--json PATH] [--gpu] [--strict]   (minutes on 2 CPU cores)
"""Times ``stage: tlm`` against a plain LLaMA-Factory LoRA run, all three through ``llamafactory-cli train``.

On the demo model (SmolLM2-135M-Instruct; fp32 on the CPU, or with ``--gpu`` bf16 on the first GPU) and the demo
prompts:

(a) ``stage: tlm``, offline, ``tlm_selector: all``: every prompt is scored, then trained on (one step each);
(b) ``stage: tlm``, offline, ``tlm_selector: perplexity`` with ``tlm_log_p0`` = the median log-perplexity that
    run (a) measured, so about half the prompts are trained on;
(c) ``stage: pt`` (plain LLaMA-Factory, no plugin code on the path) on a text data set whose rows are exactly the
    templated prompts of (a): the same number of steps over sequences of the same lengths (plus the one EOS token
    that the pt stage appends to every row).

Adaptation time is scoring + training for (a) and (b) (``tlm_summary.json``) and ``train_runtime`` for (c); peak
memory is the peak RSS of the ``llamafactory-cli`` process tree. Exit code 0 whatever the targets say (it is a
report) unless ``--strict``; non-zero when a run fails.
"""

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from tlm_plugin.train.outputs import SCORES_FILE, SUMMARY_FILE, read_jsonl


REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
GNU_TIME = "/usr/bin/time"
DATASET = "tlm_demo"
TEMPLATE = "smollm2"
TEXT_DATASET = "tlm_prompt_texts"
CUTOFF_LEN = 1024
POLL_S = 0.2
GPU = {"on": False}  # --gpu: bf16 on the first CUDA device, and the GPU target of the adaptation time
GIVEN: dict[str, Path | list[str] | None] = {"model": None, "data": None, "cli": None}  # --model / --data / --cli
TARGETS = {  # name: (numerator run, denominator run, quantity, highest passing ratio)
    "adaptation time (a)/(c)": ("a", "c", "adapt_s", 1.25),  # 1.10 with --gpu
    "adaptation time (b)/(a)": ("b", "a", "adapt_s", 0.65),
    "peak memory (a)/(c)": ("a", "c", "peak_rss_mib", 1.10),
}
RUN_TITLES = {
    "a": "(a) tlm, selector all",
    "b": "(b) tlm, perplexity, p0 = median",
    "c": "(c) plain pt LoRA",
}


class RunFailed(RuntimeError):
    """A subprocess of the benchmark exited with a non-zero code."""


# ----------------------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------------------


def core_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def child_env(cores: int) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "LLAMAFACTORY_VERBOSITY": "WARN",
        "OMP_NUM_THREADS": str(cores),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0") if GPU["on"] else "",
        "DISABLE_VERSION_CHECK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "LLAMAFACTORY_TLM_DISABLE", "USE_V1"):
        env.pop(key, None)
    return env


def gnu_time_works() -> bool:
    """``/usr/bin/time -v`` exists and is GNU time (BusyBox and BSD time print no maximum resident set size)."""
    if not os.access(GNU_TIME, os.X_OK):
        return False
    proc = subprocess.run([GNU_TIME, "-v", "true"], capture_output=True, text=True, check=False)
    return proc.returncode == 0 and "Maximum resident set size" in proc.stderr


def tree_rss(root: psutil.Process) -> int:
    """Sum of the RSS of ``root`` and all its descendants, in bytes (processes that vanish meanwhile count 0)."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores) since boot."""
    times = psutil.cpu_times()  # guest time is already inside user time on Linux; steal is not this machine's
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))


def stderr_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def measured_run(cmd: list[str], env: dict[str, str], log_dir: Path, use_time: bool) -> dict:
    """Run ``cmd`` with stdout/stderr to files; wall time, peak RSS (GNU time if usable) and polled tree RSS."""
    log_dir.mkdir(parents=True, exist_ok=True)
    time_file = log_dir / "time.txt"
    full_cmd = [GNU_TIME, "-v", "-o", str(time_file), *cmd] if use_time else cmd
    stdout_path, stderr_path = log_dir / "stdout.log", log_dir / "stderr.log"
    peak_poll = 0
    machine_before, children_before = busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(full_cmd, env=env, cwd=log_dir, stdout=out, stderr=err)
        root = psutil.Process(proc.pid)
        while True:
            peak_poll = max(peak_poll, tree_rss(root))
            try:
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                continue
        wall = time.perf_counter() - start
    machine_cpu, children_after = busy_cpu_s() - machine_before, resource.getrusage(resource.RUSAGE_CHILDREN)
    own_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    if proc.returncode != 0:
        raise RunFailed(
            f"`{' '.join(cmd)}` exited with code {proc.returncode} (logs in {log_dir}); stderr tail:\n"
            + stderr_tail(stderr_path)
        )
    result = {
        "wall_s": wall,
        "cpu_s": own_cpu,
        "other_load_cores": max(0.0, machine_cpu - own_cpu) / wall,
        "tree_rss_poll_mib": peak_poll / 2**20,
    }
    if use_time:
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_file.read_text(encoding="utf-8"))
        if match is None:
            raise RunFailed(f"No maximum resident set size in {time_file}")
        result["peak_rss_mib"] = int(match.group(1)) / 1024
        result["peak_rss_source"] = "/usr/bin/time -v (max RSS)"
    else:
        result["peak_rss_mib"] = result["tree_rss_poll_mib"]
        result["peak_rss_source"] = f"psutil, process tree polled every {POLL_S} s"
    return result


def asset(kind: str, *args: str, env: dict[str, str]) -> Path:
    """``python -m tlm_plugin.assets KIND ...``: the path it prints last on stdout."""
    cmd = [sys.executable, "-m", "tlm_plugin.assets", kind, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-40:])
        raise RunFailed(f"`{' '.join(cmd)}` exited with code {proc.returncode}; stderr tail:\n{tail}")
    return Path(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# Recipes and runs
# ----------------------------------------------------------------------------------------------------------------


def common_recipe(model_dir: Path, output_dir: Path) -> dict:
    return {
        "model_name_or_path": str(model_dir),
        "trust_remote_code": False,
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_target": "q_proj,v_proj",
        "template": TEMPLATE,
        "cutoff_len": CUTOFF_LEN,
        "overwrite_cache": True,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 5.0e-5,
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "constant",
        "bf16": GPU["on"],
        "fp16": False,
        "logging_steps": 5,
        "include_num_input_tokens_seen": "non_padding",
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def tlm_recipe(model_dir: Path, data_dir: Path, output_dir: Path, selector: str, log_p0: float | None) -> dict:
    recipe = {
        **common_recipe(model_dir, output_dir),
        "stage": "tlm",
        "dataset": DATASET,
        "dataset_dir": str(data_dir),
        "tlm_mode": "offline",
        "tlm_selector": selector,
    }
    if log_p0 is not None:
        recipe["tlm_log_p0"] = float(log_p0)
    return recipe


def pt_recipe(model_dir: Path, data_dir: Path, output_dir: Path, cutoff_len: int) -> dict:
    return {
        **common_recipe(model_dir, output_dir),
        "stage": "pt",
        "dataset": TEXT_DATASET,
        "dataset_dir": str(data_dir),
        "packing": False,
        "cutoff_len": cutoff_len,
    }


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise RunFailed(f"The run wrote no {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def tokens_seen(output_dir: Path) -> int | None:
    """``num_input_tokens_seen`` of the trainer's last log (non-padding tokens that went through training)."""
    state = output_dir / "trainer_state.json"
    if not state.is_file():
        return None
    seen = [
        e["num_input_tokens_seen"] for e in read_json(state).get("log_history", []) if "num_input_tokens_seen" in e
    ]
    return int(seen[-1]) if seen else None


def run_cli(name: str, recipe: dict, work: Path, env: dict[str, str], use_time: bool) -> dict:
    run_dir = work / f"run_{name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = run_dir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    cli = GIVEN["cli"] or [shutil.which("llamafactory-cli", path=env["PATH"])]
    if cli[0] is None:
        raise RunFailed(f"llamafactory-cli is not on PATH ({env['PATH']})")
    print(f"running {RUN_TITLES[name]} ... ", end="", flush=True)
    result = measured_run([*cli, "train", str(recipe_path)], env, run_dir / "logs", use_time)
    print(f"{result['wall_s']:.1f} s", flush=True)

    output_dir = Path(recipe["output_dir"])
    train = read_json(output_dir / "train_results.json")
    result.update(
        {
            "recipe": str(recipe_path),
            "train_runtime_s": float(train["train_runtime"]),
            "tokens_seen": tokens_seen(output_dir),
        }
    )
    if recipe["stage"] == "tlm":
        summary = read_json(output_dir / SUMMARY_FILE)
        wall = summary["wall_time_s"]
        result.update(
            {
                "score_before_s": wall["score_before_s"],
                "train_s": wall["train_s"],
                "score_after_s": wall.get("score_after_s"),
                "predict_s": wall.get("predict_s"),
                "adapt_s": wall["score_before_s"] + wall["train_s"],
                "n_prompts": summary["n_prompts"],
                "n_selected": summary["n_selected"],
                "backward_passes": summary["backward_passes"],
                "optimizer_steps": summary["optimizer_steps"],
                "shared_prefix_tokens": summary.get("score_shared_prefix_tokens"),
                "scores": read_scores(output_dir),
            }
        )
    else:
        state = read_json(output_dir / "trainer_state.json") if (output_dir / "trainer_state.json").is_file() else {}
        result.update(
            {
                "adapt_s": result["train_runtime_s"],
                "optimizer_steps": state.get("global_step"),
                "backward_passes": state.get("global_step"),
            }
        )
    return result


def read_scores(output_dir: Path) -> list[dict]:
    path = output_dir / SCORES_FILE
    if not path.is_file():
        raise RunFailed(f"The run wrote no {path}")
    return read_jsonl(str(path))


# ----------------------------------------------------------------------------------------------------------------
# The text data set of run (c)
# ----------------------------------------------------------------------------------------------------------------


def templated_prompts(model_dir: Path, data_dir: Path) -> tuple[list[list[int]], object]:
    """``input_ids`` of every demo prompt as LLaMA-Factory's template encodes it for stage tlm, and the tokenizer.

    Mirrors the alpaca converter ("instruction\\ninput") and the unsupervised processor (one user turn, an empty
    assistant turn, the template's default system prompt).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["LLAMAFACTORY_VERBOSITY"] = "WARN"
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=TEMPLATE))
    rows = json.loads((data_dir / f"{DATASET}.json").read_text(encoding="utf-8"))
    prompts = []
    for row in rows:
        content = "\n".join(part for part in (row.get("instruction"), row.get("input")) if part)
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
        ids, _ = template.encode_oneturn(tokenizer, messages)
        prompts.append(ids)
    return prompts, tokenizer


def write_text_dataset(directory: Path, texts: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{TEXT_DATASET}.json").write_text(
        json.dumps([{"text": t} for t in texts], ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    info = {TEXT_DATASET: {"file_name": f"{TEXT_DATASET}.json", "columns": {"prompt": "text"}}}
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return directory


def pt_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """The rows as LLaMA-Factory's pt stage tokenizes them without packing (text + EOS; BOS if the tokenizer adds one)."""
    prefix = tokenizer.bos_token if getattr(tokenizer, "add_bos_token", False) else ""
    return [tokenizer(prefix + t + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for t in texts]


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def fmt(value, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def print_table(runs: dict[str, dict]) -> None:
    rows = [
        ("prompts trained on (steps)", "optimizer_steps", "d"),
        ("backward passes", "backward_passes", "d"),
        ("training tokens (tokens seen)", "tokens_seen", "d"),
        ("scoring: shared prefix, tokens", "shared_prefix_tokens", "d"),
        ("score before, s", "score_before_s", ".2f"),
        ("train, s (tlm: train_s)", "train_s", ".2f"),
        ("train_runtime (HF), s", "train_runtime_s", ".2f"),
        ("ADAPTATION, s", "adapt_s", ".2f"),
        ("score after, s", "score_after_s", ".2f"),
        ("whole process wall, s", "wall_s", ".2f"),
        ("whole process CPU (user+sys), s", "cpu_s", ".1f"),
        ("other processes' load, cores", "other_load_cores", ".2f"),
        ("PEAK RSS, MiB", "peak_rss_mib", ".0f"),
        ("tree RSS polled, MiB", "tree_rss_poll_mib", ".0f"),
    ]
    names = list(runs)
    width = max(len(label) for label, _, _ in rows)
    cols = [max(len(RUN_TITLES[n]), 10) for n in names]
    header = f"| {'':<{width}} | " + " | ".join(f"{RUN_TITLES[n]:>{c}}" for n, c in zip(names, cols)) + " |"
    print(header)
    print("|" + "-" * (width + 2) + "|" + "|".join("-" * (c + 2) for c in cols) + "|")
    for label, key, spec in rows:
        cells = " | ".join(f"{fmt(runs[n].get(key), spec):>{c}}" for n, c in zip(names, cols))
        print(f"| {label:<{width}} | {cells} |")


def ratios(runs: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for name, (num, den, key, limit) in TARGETS.items():
        value = runs[num][key] / runs[den][key]
        out[name] = {"ratio": value, "target": limit, "pass": value <= limit}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def benchmark(n: int, work: Path) -> dict:
    cores = core_count()
    env = child_env(cores)
    use_time = gnu_time_works()
    load_start = os.getloadavg()
    busy_now = psutil.cpu_percent(interval=2.0) / 100 * psutil.cpu_count()
    print(
        f"{cores} cores for the runs, OMP_NUM_THREADS={cores}, load average {' '.join(f'{x:.2f}' for x in load_start)}, "
        f"{busy_now:.2f} cores busy over the last 2 s"
    )
    if busy_now > psutil.cpu_count() - cores + 0.25:
        print(
            f"WARNING: other processes keep {busy_now:.2f} of the machine's {psutil.cpu_count()} cores busy "
            f"(the runs get {cores}): timings will be noisy"
        )
    print(f"peak memory from {'/usr/bin/time -v' if use_time else 'psutil polling'}; work dir {work}")

    model_dir = GIVEN["model"] or asset("model", env=env)
    data_dir = GIVEN["data"] or asset("data", "--out", str(work / "data"), "--n", str(n), env=env)
    print(f"model {model_dir}\ndata  {data_dir} ({n} prompts)")

    runs: dict[str, dict] = {}
    runs["a"] = run_cli("a", tlm_recipe(model_dir, data_dir, work / "out_a", "all", None), work, env, use_time)
    log_ppls = [r["log_ppl"] for r in runs["a"]["scores"] if r.get("log_ppl") is not None]
    log_p0 = statistics.median(log_ppls)
    print(f"median log-perplexity of run (a): {log_p0:.4f} (min {min(log_ppls):.3f}, max {max(log_ppls):.3f})")
    runs["b"] = run_cli(
        "b", tlm_recipe(model_dir, data_dir, work / "out_b", "perplexity", log_p0), work, env, use_time
    )

    # Run (c)'s rows: the templated prompts of (a), decoded back to text.
    prompts, tokenizer = templated_prompts(model_dir, data_dir)
    tlm_lengths = [r["n_tokens"] for r in sorted(runs["a"]["scores"], key=lambda r: r["index"])]
    encoded_lengths = [len(ids) for ids in prompts]
    if encoded_lengths != tlm_lengths:
        bad = [i for i, (x, y) in enumerate(zip(encoded_lengths, tlm_lengths)) if x != y]
        raise RunFailed(
            f"The template encoding here disagrees with run (a)'s n_tokens (rows {bad[:10]}, "
            f"{len(encoded_lengths)} vs {len(tlm_lengths)} rows): run (c) would not match"
        )
    texts = [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in prompts]
    pt_ids = pt_token_ids(tokenizer, texts)
    lengths = [len(ids) for ids in pt_ids]
    extra = [p - t for p, t in zip(lengths, tlm_lengths)]
    tokens = {
        "tlm_prompt_tokens": sum(tlm_lengths),
        "pt_tokens": sum(lengths),
        "pt_minus_tlm_per_row": sorted(set(extra)),
        "rows_identical_before_eos": sum(p[: len(t)] == t for p, t in zip(pt_ids, prompts)),
        "longest_prompt": max(tlm_lengths),
    }
    print(
        f"tokens per epoch: tlm (a) {tokens['tlm_prompt_tokens']} over {len(tlm_lengths)} prompts, "
        f"pt (c) {tokens['pt_tokens']} (per-row difference {tokens['pt_minus_tlm_per_row']}: "
        f"LLaMA-Factory's pt stage appends one EOS to each row; {tokens['rows_identical_before_eos']}/"
        f"{len(prompts)} rows re-tokenize to the very same ids)"
    )
    if any(abs(x) > 2 for x in extra):
        raise RunFailed(f"Run (c)'s rows do not re-tokenize to the prompts' lengths (per-row differences {extra})")
    text_dir = write_text_dataset(work / "text_data", texts)
    pt_cutoff = max(CUTOFF_LEN, max(lengths) + 64)
    runs["c"] = run_cli("c", pt_recipe(model_dir, text_dir, work / "out_c", pt_cutoff), work, env, use_time)
    if runs["c"]["tokens_seen"] is not None and runs["c"]["tokens_seen"] != tokens["pt_tokens"]:
        print(f"WARNING: run (c) saw {runs['c']['tokens_seen']} tokens, expected {tokens['pt_tokens']}")
    if runs["c"]["optimizer_steps"] != runs["a"]["optimizer_steps"]:
        print(f"WARNING: steps differ: (a) {runs['a']['optimizer_steps']}, (c) {runs['c']['optimizer_steps']}")

    load_end = os.getloadavg()
    for run in runs.values():
        run.pop("scores", None)
    return {
        "n_prompts": n,
        "cores": cores,
        "machine_cores": psutil.cpu_count(),
        "load_average_start": load_start,
        "busy_cores_at_start": busy_now,
        "load_average_end": load_end,
        "peak_memory_source": runs["a"]["peak_rss_source"],
        "tlm_log_p0_b": log_p0,
        "tokens": tokens,
        "runs": runs,
        "ratios": ratios(runs),
        "work_dir": str(work),
    }


def report(result: dict) -> None:
    runs = result["runs"]
    print()
    print_table(runs)
    print()
    for name, r in result["ratios"].items():
        verdict = "PASS" if r["pass"] else "FAIL"
        print(f"{name:<26} {r['ratio']:6.3f}  (target <= {r['target']:.2f})  {verdict}")
    selected = runs["b"]["n_selected"]
    print(
        f"\n(b) trained on {selected}/{runs['b']['n_prompts']} prompts (tlm_log_p0 = {result['tlm_log_p0_b']:.4f}); "
        f"peak memory: {result['peak_memory_source']}; load average at the end "
        f"{' '.join(f'{x:.2f}' for x in result['load_average_end'])}"
    )
    spare = result["machine_cores"] - result["cores"]  # cores the runs were not given (taskset): others may use them
    busy = {name: run["other_load_cores"] for name, run in runs.items() if run["other_load_cores"] > spare + 0.25}
    if busy:
        where = ", ".join(f"({name}) {load:.2f}" for name, load in busy.items())
        print(
            f"WARNING: other processes used CPU during the runs (cores on average: {where}; the machine has "
            f"{result['machine_cores']}, the runs were given {result['cores']}): the time ratios measure the "
            "contention as much as the code; run again on a quiet machine"
        )


def median_runs(results: list[dict]) -> dict[str, dict]:
    """Per run and numeric quantity, the median over repeats (the other fields of the first repeat)."""
    runs: dict[str, dict] = {}
    for name, first in results[0]["runs"].items():
        merged = dict(first)
        for key, value in first.items():
            values = [r["runs"][name].get(key) for r in results]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and None not in values:
                merged[key] = statistics.median(values)
        runs[name] = merged
    return runs


def combine(results: list[dict]) -> dict:
    """Several repeats as one result: median quantities, ratios of the medians, and every repeat's own ratios."""
    if len(results) == 1:
        return results[0]
    runs = median_runs(results)
    combined = {**results[0], "runs": runs, "ratios": ratios(runs), "repeats": results}
    combined["load_average_end"] = results[-1]["load_average_end"]
    return combined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="number of demo prompts (default 24)")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the three runs this many times; report medians (default 1)"
    )
    parser.add_argument(
        "--gpu", action="store_true", help="bf16 on the first GPU; adaptation target (a)/(c) <= 1.10 instead of 1.25"
    )
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the demo model)")
    parser.add_argument("--data", type=Path, default=None, help="folder holding the tlm_demo dataset (default: made)")
    parser.add_argument("--cli", default=None, help='command that runs LLaMA-Factory (default "llamafactory-cli")')
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    GIVEN.update(model=args.model, data=args.data, cli=args.cli.split() if args.cli else None)
    if args.gpu:
        GPU["on"] = True
        TARGETS["adaptation time (a)/(c)"] = ("a", "c", "adapt_s", 1.10)
    if args.n < 2:
        parser.error("--n must be at least 2")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    work = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="bench_tlm-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for i in range(args.repeat):
            if args.repeat > 1:
                print(f"\n--- repeat {i + 1}/{args.repeat}")
            results.append(benchmark(args.n, work / f"repeat{i + 1}" if args.repeat > 1 else work))
    except RunFailed as err:
        print(f"\nRUN FAILED: {err}\n(work dir kept for inspection: {work})", file=sys.stderr)
        return 1
    result = combine(results)
    if args.repeat > 1:
        print(f"\n=== medians over {args.repeat} repeats")
        for name in result["ratios"]:
            each = ", ".join(f"{r['ratios'][name]['ratio']:.3f}" for r in results)
            print(f"{name:<26} per repeat: {each}")
    report(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    missed = [name for name, r in result["ratios"].items() if not r["pass"]]
    if args.strict and missed:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
