# Run: .venv/bin/python bench/bench_objectives.py [--n 8] [--tokens 80] [--out DIR]   (several minutes on 2 CPU cores)
"""Cost per sample of each test-time objective (TLM, Tent, EATA, COME) on the demo model, via llamafactory-cli.

Each run is ``stage: tlm`` offline with ``tlm_selector: all`` on the same ``--n`` demo prompts, batch 1, one epoch;
only ``tlm_objective`` changes. The entropy objectives first generate ``--tokens`` tokens per prompt (batched,
KV cache, no gradient), then take one forward-backward pass over prompt + answer; TLM takes one forward-backward
pass over the prompt. Reported: training seconds per sample (``tlm_summary.json``), relative to TLM.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = ("perplexity", "tent", "eata", "come")


def run(recipe: dict, work: Path) -> dict:
    path = work / f"{recipe['tlm_objective']}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "LLAMAFACTORY_VERBOSITY": "WARN",
    }
    proc = subprocess.run(
        [str(bin_dir / "llamafactory-cli"), "train", str(path)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{recipe['tlm_objective']} failed:\n{proc.stderr[-3000:]}")
    return json.loads((Path(recipe["output_dir"]) / "tlm_summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="prompts (default 8)")
    parser.add_argument("--tokens", type=int, default=80, help="tlm_entropy_tokens (default 80, the paper's)")
    parser.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()

    from tlm_plugin.assets import build_demo_dataset, prepare_demo_model

    work = args.out or Path(tempfile.mkdtemp(prefix="bench_objectives_"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = prepare_demo_model(), build_demo_dataset(work / "data", n=args.n)
    base = yaml.safe_load((REPO / "recipes" / "demo" / "tlm_offline_smollm2.yaml").read_text())
    base.update(
        model_name_or_path=str(model),
        dataset_dir=str(data),
        do_predict=False,
        num_train_epochs=1.0,
        tlm_selector="all",
        tlm_entropy_tokens=args.tokens,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
    )
    rows = []
    for objective in OBJECTIVES:
        summary = run({**base, "tlm_objective": objective, "output_dir": str(work / objective)}, work)
        per_sample = summary["wall_time_s"]["train_s"] / summary["n_prompts"]
        rows.append((objective, per_sample, summary["backward_passes"]))
        print(
            f"{objective:<11} {per_sample:7.2f} s/sample  ({summary['backward_passes']} backward passes)", flush=True
        )
    reference = rows[0][1]
    print("\n| objective | train s / sample | x TLM | backward passes |\n|---|---|---|---|")
    for objective, per_sample, backward in rows:
        print(f"| {objective} | {per_sample:.2f} | {per_sample / reference:.2f} | {backward} |")
    print(f"\n{args.n} demo prompts, SmolLM2-135M-Instruct, CPU fp32, batch 1, {args.tokens} generated tokens")


if __name__ == "__main__":
    main()
