# Run: .venv/bin/python bench/bench_serve.py [--prompts 48] [--repeats 1] [--json PATH]   (about 20 minutes, 2 cores)
"""Learning while serving on CPU with the demo model (SmolLM2-135M-Instruct): does learning slow answering down?

For K = 1 and K = 4 concurrent clients on 127.0.0.1, the same held-out demo prompts are replayed (closed loop: a
client sends its next request when its answer arrives) through two servers started as a user starts them
(``llamafactory-cli api recipe.yaml``): one learning (``tlm_mode: serve``, windows of 8 prompts, TLM's S(x), the
drift guard on a probe set of 16 other demo rows) and the same recipe with ``tlm_learn: false``. Reported:

- p50 / p95 answer latency with learning on and off, and their ratio (target: p50 ratio <= 1.15 with K = 4, i.e.
  learning must not starve answering; the learner runs as its own process at a lower CPU priority);
- the adapter swap time (the pause new answers see while a version's weights are copied in; target < 50 ms);
- how many windows the learner finished while answering went on, and, after the replay, once every window is
  learned: prompts learned per second of the learner's training time, and the probe set's answer bits per byte
  after those windows against the unadapted model (v0).

Both servers of one K run one after the other in one invocation (same machine state), so the ratio compares like
with like; ``--repeats`` repeats the pair and reports medians.
"""

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from tlm_plugin.assets import build_demo_dataset, prepare_demo_model
from tlm_plugin.serving.launch import ServerProcess, chat, free_port, request
from tlm_plugin.train.outputs import read_jsonl


REPO = Path(__file__).resolve().parents[1]
PROBE_ROWS = 16
WINDOW = 8  # tlm_chunk_size
SETTLE_S = 900  # after the replay, the learner may finish the windows it has not learned yet
ENV = {"HF_HUB_OFFLINE": "1", "LLAMAFACTORY_VERBOSITY": "WARN", "API_VERBOSE": "0"}


def recipe(model: Path, data: Path, out: Path, learn: bool) -> dict:
    settings = {
        "model_name_or_path": str(model),
        "template": "smollm2",
        "stage": "tlm",
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target": "q_proj,v_proj",
        "tlm_mode": "serve",
        "tlm_learn": learn,
        "dataset_dir": str(data),
        "cutoff_len": 512,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "report_to": "none",
        "per_device_train_batch_size": 1,
        "learning_rate": 5.0e-5,
        "lr_scheduler_type": "constant",
        "seed": 42,
        "do_sample": False,
        "max_new_tokens": 32,
    }
    if learn:
        settings.update(tlm_chunk_size=WINDOW, tlm_probe_dataset="bench_probe", max_samples=PROBE_ROWS)
    return settings


def write_data(root: Path, n: int) -> tuple[Path, list[str]]:
    """The probe set (first rows, with references) and the traffic (the others), from the demo dataset."""
    build_demo_dataset(root, n=n + PROBE_ROWS, seed=0)
    rows = json.loads((root / "tlm_demo.json").read_text(encoding="utf-8"))
    (root / "bench_probe.json").write_text(json.dumps(rows[:PROBE_ROWS]), encoding="utf-8")
    info = json.loads((root / "dataset_info.json").read_text(encoding="utf-8"))
    info["bench_probe"] = {"file_name": "bench_probe.json"}
    (root / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    prompts = [(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")) for r in rows[PROBE_ROWS:]]
    return root, prompts


def replay(url: str, prompts: list[str], clients: int) -> tuple[list[float], list[int], int]:
    """Closed-loop replay; (latencies of answered requests, their versions, failed requests)."""
    queue = list(enumerate(prompts))
    lock = threading.Lock()
    latencies, versions, failed = [], [], []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                _, prompt = queue.pop(0)
            start = time.perf_counter()
            code, body = chat(url, [{"role": "user", "content": prompt}], do_sample=False)
            elapsed = time.perf_counter() - start
            with lock:
                if code == 200:
                    latencies.append(elapsed)
                    versions.append(int(body["system_fingerprint"].removeprefix("tlm-v")))
                else:
                    failed.append(code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, versions, len(failed)


def settle(url: str, windows: int) -> dict:
    """The status once ``windows`` windows are learned (answering has stopped: the learner has the CPU)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        status = request(url + "/tlm/status")[2]
        if status["windows"] >= windows or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_server(model: Path, data: Path, work: Path, prompts: list[str], clients: int, learn: bool) -> dict:
    out = work / f"out-{'learn' if learn else 'static'}-{clients}"
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe(model, data, out, learn)), encoding="utf-8")
    server = ServerProcess(str(path), free_port(), ENV, log=str(work / f"{out.name}.log")).start()
    try:
        server.wait_ready(timeout=900)
        latencies, versions, failed = replay(server.url, prompts, clients)
        during = request(server.url + "/tlm/status")[2]
        status = settle(server.url, len(prompts) // WINDOW) if learn else during
    finally:
        server.stop()
    result = {
        "answered": len(latencies),
        "failed": failed,
        "p50_s": quantile(latencies, 0.5),
        "p95_s": quantile(latencies, 0.95),
        "versions_answering": sorted(set(versions)),
    }
    if learn:
        result["windows_during_replay"] = during["windows"]
        metas = [json.loads(p.read_text()) for p in sorted((out / "tlm_versions").glob("v*/tlm_version.json"))]
        learned = sum(m.get("learned", 0) for m in metas)
        train_s = sum(m.get("train_s", 0.0) for m in metas)
        probe = status["probe_answer_bpb"]
        published = [n for n in status["published"] if n > 0]
        result.update(
            windows=status["windows"],
            learned=learned,
            rejected=len(status["rejected"]),
            learned_per_train_s=learned / train_s if train_s else None,
            swap_ms_median=status["swap_ms"]["median"],
            swap_ms_max=status["swap_ms"]["max"],
            probe_bpb_v0=probe.get("v0"),
            probe_bpb_last=probe.get(f"v{published[-1]}") if published else probe.get("v0"),
            scores_lines=len(read_jsonl(str(out / "tlm_scores.jsonl"))),
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts replayed per server")
    parser.add_argument("--clients", default="1,4", help="concurrent clients, comma-separated")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    model = prepare_demo_model()
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    data, prompts = write_data(work / "data", args.prompts)
    results = {"prompts": args.prompts, "probe_rows": PROBE_ROWS, "by_clients": {}}
    for clients in (int(k) for k in args.clients.split(",")):
        runs = []
        for _ in range(args.repeats):
            static = one_server(model, data, work, prompts, clients, learn=False)
            learning = one_server(model, data, work, prompts, clients, learn=True)
            runs.append({"static": static, "learning": learning})
        p50_ratio = statistics.median(r["learning"]["p50_s"] / r["static"]["p50_s"] for r in runs)
        p95_ratio = statistics.median(r["learning"]["p95_s"] / r["static"]["p95_s"] for r in runs)
        results["by_clients"][clients] = {"runs": runs, "p50_ratio": p50_ratio, "p95_ratio": p95_ratio}
        last = runs[-1]
        print(
            f"K={clients}: p50 {last['static']['p50_s']:.3f} s static / {last['learning']['p50_s']:.3f} s learning "
            f"(ratio {p50_ratio:.3f}), p95 {last['static']['p95_s']:.3f} / {last['learning']['p95_s']:.3f} "
            f"(ratio {p95_ratio:.3f}); windows {last['learning']['windows_during_replay']} during the replay, "
            f"{last['learning']['windows']} after it, learned {last['learning']['learned']}, "
            f"{last['learning']['learned_per_train_s'] or 0:.2f} prompts/s of training, swap median "
            f"{last['learning']['swap_ms_median'] or 0:.1f} ms (max {last['learning']['swap_ms_max'] or 0:.1f}), "
            f"probe bpb v0 {last['learning']['probe_bpb_v0']:.4f} -> {last['learning']['probe_bpb_last']:.4f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
