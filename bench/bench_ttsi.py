# Run: .venv/bin/python bench/bench_ttsi.py [--n 12] [--json PATH]   (a few minutes on 2 CPU cores)
"""Seconds per prompt and phase of per-prompt learning (TT-SI / TT-D) on the demo model, through llamafactory-cli.

Two runs over the same demo prompts, both with the margin gate (5 sampled candidates) and 5 epochs of training on
K = 1 example (the TT-SI paper's settings, LoRA r 8 on every linear layer, fp32 on the CPU):

(a) ``tlm_generator: self``: the demo model writes its own example (a 135M model often writes none that parses;
    those prompts are answered untrained, so this run times the gate and the generation);
(b) ``tlm_generator: <a local endpoint>``: a test server answers every request at once with one well-formed example,
    so every flagged prompt trains: this run times training, answering and the restore.

Per phase: gate (candidates sampled and scored), data (generation, parsing, encoding), train, answer (likelihoods
and greedy answer), restore; "bookkeeping" is the rest of a prompt's wall time (records appended, progress bar).
Target: restore + bookkeeping under 5% of a prompt's wall time.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

from tlm_plugin.train.outputs import GENERATED_FILE, SUMMARY_FILE, read_jsonl


REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PHASES = ("gate_s", "data_s", "train_s", "answer_s", "restore_s")
EXAMPLE = "### Example 1\nInput: What should I do about a mild headache?\nOutput: Rest, drink water and, if it lasts, see a doctor.\n"


def serve_examples() -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send({"data": [{"id": "bench"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send({"choices": [{"message": {"role": "assistant", "content": EXAMPLE}}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def env() -> dict[str, str]:
    out = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    out.update({"LLAMAFACTORY_VERBOSITY": "WARN", "CUDA_VISIBLE_DEVICES": "", "DISABLE_VERSION_CHECK": "1"})
    return out


def asset(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "tlm_plugin.assets", *args], env=env(), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return proc.stdout.strip().splitlines()[-1]


def run(work: Path, name: str, model: str, data: str, generator: str) -> dict:
    recipe = yaml.safe_load((REPO / "recipes" / "ttsi" / "smollm2_cpu_ttsi.yaml").read_text(encoding="utf-8"))
    out = work / name
    recipe.update(
        model_name_or_path=model, dataset_dir=data, output_dir=str(out), tlm_generator=generator, do_predict=True
    )
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    proc = subprocess.run(
        [str(VENV_BIN / "llamafactory-cli"), "train", str(path)], env=env(), capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"run {name} failed:\n{proc.stderr[-3000:]}")
    records = read_jsonl(str(out / GENERATED_FILE))
    summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    wall = summary["wall_time_s"]["per_prompt_s"] / len(records)
    phases = {p: statistics.mean(r["seconds"][p] for r in records) for p in PHASES}
    bookkeeping = max(0.0, wall - sum(phases.values()))
    return {
        "prompts": len(records),
        "trained": sum(r["steps"] > 0 for r in records),
        "flagged": sum(r["flagged"] for r in records),
        "wall_s_per_prompt": wall,
        **phases,
        "bookkeeping_s": bookkeeping,
        "restore_and_bookkeeping_share": (phases["restore_s"] + bookkeeping) / wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="demo prompts (default 12)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_ttsi-"))
    try:
        model = asset("model")
        data = asset("data", "--out", str(work / "data"), "--n", str(args.n))
        server, url = serve_examples()
        try:
            results = {
                "a_self": run(work, "self", model, data, "self"),
                "b_served": run(work, "served", model, data, url),
            }
        finally:
            server.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{'run':<10} {'flagged':>8} {'trained':>8} {'wall/prompt':>12} "
        + " ".join(f"{p[:-2]:>8}" for p in PHASES)
        + f" {'other':>8} {'restore+other':>14}"
    )
    for name, r in results.items():
        print(
            f"{name:<10} {r['flagged']:>8} {r['trained']:>8} {r['wall_s_per_prompt']:>11.3f}s "
            + " ".join(f"{r[p]:>8.3f}" for p in PHASES)
            + f" {r['bookkeeping_s']:>8.3f} "
            f"{100 * r['restore_and_bookkeeping_share']:>13.2f}%"
        )
    share = results["b_served"]["restore_and_bookkeeping_share"]
    print(
        f"\nrestore + bookkeeping of a trained prompt: {100 * share:.2f}% of its wall time (target < 5%): "
        f"{'PASS' if share < 0.05 else 'FAIL'}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
