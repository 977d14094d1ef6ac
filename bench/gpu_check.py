# Run: python3 bench/gpu_check.py   (a machine with one NVIDIA GPU and PyPI access; about 8 minutes after installing)
"""Prove the GPU paths of stage tlm on the demo model: one line per case (PASS/FAIL, why, seconds), then the bench.

Cases (SmolLM2-135M-Instruct, the 24 demo prompts, every run a real ``llamafactory-cli train``):

- ``bf16_offline``: offline TLM in bf16; the adapter learned (selected prompts' log-perplexity fell), every selected
  prompt took one optimizer step, 24 predictions.
- ``fp16_online_no_selection``: online in fp16 with P0 above every prompt, so no chunk selects anything: the
  GradScaler never sees an empty step, every update is skipped and counted, the adapter stays at its start.
- ``deepspeed_zero2`` / ``deepspeed_zero3``: offline bf16 under DeepSpeed (one process): the scores before
  adaptation equal ``bf16_offline``'s, the selected prompts are trained on.
- ``fsdp``: offline bf16 under FSDP2 through ``accelerate launch`` (one process).
- ``per_prompt_sift``: SIFT test-time fine-tuning per prompt (budget 4), every prompt answered once, restored.
- ``per_prompt_ttsi``: TT-SI per prompt (margin gate, the model writes one example, learns it, answers, restores).
- ``per_prompt_ttd_endpoint``: TT-D from an OpenAI-compatible endpoint (a stub teacher in this script that writes one
  well-formed example per request): every prompt learns the example (its loss falls), answers, restores.
- ``per_prompt_fewshot``: few-shot TTT on prompts carrying 3 demonstrations: one adapter per task, reused, restored.
- ``resume_after_kill``: an online run killed with SIGKILL mid-stream and rerun: no prediction lost or duplicated;
  the report says how many predictions equal an uninterrupted run's.
- then ``bench/bench_tlm.py --gpu``: stage tlm vs a plain LoRA run in bf16 (target: adaptation <= 1.10x).

On a machine without the packages it creates ``.venv-gpu`` in the repository, installs the project (with DeepSpeed
and the demo's data package) and runs itself there. ``--keep DIR`` keeps the runs for inspection.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-gpu"
CPU = {"on": False}  # --cpu: the same cases in fp32 on the CPU (no FSDP, no fp16), to check this script itself
EVALS = "evals==3.0.1.post1"
NEEDED = ("llamafactory", "tlm_plugin", "deepspeed", "gguf")


# ---------------------------------------------------------------------------------------------------------------
# Set-up


def has_packages(python: str) -> bool:
    code = "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))"
    return subprocess.run([python, "-c", code, *NEEDED], check=False).returncode == 0


def ensure_environment(argv: list[str]) -> None:
    """Re-run this script in a venv that has everything, creating it on first use."""
    if has_packages(sys.executable):
        return
    python = str(VENV / "bin" / "python")
    if not Path(python).exists():
        print(f"creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if not has_packages(python):
        print("installing llamafactory-tlm, LLaMA-Factory, DeepSpeed (several minutes) ...", flush=True)
        pip = [python, "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "-e", f"{REPO}[dev,demo,offline]", "deepspeed"], check=True)
        subprocess.run([*pip, "--no-deps", EVALS], check=True)
    os.execv(python, [python, __file__, *argv])


# ---------------------------------------------------------------------------------------------------------------
# Runs


def env_for(extra: dict[str, str] | None = None) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    env.update({"LLAMAFACTORY_VERBOSITY": "WARN", "DISABLE_VERSION_CHECK": "1", "CUDA_VISIBLE_DEVICES": "0"})
    if CPU["on"]:
        env.update({"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"})
    for key in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "LLAMAFACTORY_TLM_DISABLE"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def base_recipe(model: str, data: str, out: Path, **overrides) -> dict:
    recipe = {
        "model_name_or_path": model,
        "stage": "tlm",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_target": "q_proj,v_proj",
        "dataset": "tlm_demo",
        "dataset_dir": data,
        "template": "smollm2",
        "cutoff_len": 1024,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 1,
        "learning_rate": 1.0e-4,
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "bf16": True,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 42,
        "do_predict": True,
        "per_device_eval_batch_size": 8,
        "do_sample": False,
        "max_new_tokens": 32,
    }
    recipe.update(overrides)
    if CPU["on"]:
        recipe.update(bf16=False, fp16=False)
    return {k: v for k, v in recipe.items() if v is not None}


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def launch(recipe: dict, work: Path, name: str, env: dict | None = None, command: list[str] | None = None):
    """Run ``llamafactory-cli train`` (or ``command`` + the recipe path); returns (exit code, log path)."""
    path = write_recipe(work / f"{name}.yaml", recipe)
    log = work / f"{name}.log"
    cmd = (command or [shutil.which("llamafactory-cli", path=env_for()["PATH"]) or "llamafactory-cli", "train"]) + [
        str(path)
    ]
    with log.open("w", encoding="utf-8") as out:
        code = subprocess.run(cmd, env=env_for(env), stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    return code, log


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tail(log: Path, lines: int = 6) -> str:
    text = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    return " | ".join(line.strip() for line in text[-lines:])


class CheckFailed(Exception):
    pass


def expect(condition: bool, why: str) -> None:
    if not condition:
        raise CheckFailed(why)


def run_ok(recipe: dict, work: Path, name: str, env: dict | None = None, command: list[str] | None = None) -> Path:
    code, log = launch(recipe, work, name, env, command)
    expect(code == 0, f"exit code {code}: {tail(log)}")
    return Path(recipe["output_dir"])


def lora_b_norm(out: Path) -> float:
    from safetensors.torch import load_file

    return sum(
        float(v.float().norm()) for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "lora_B" in k
    )


# ---------------------------------------------------------------------------------------------------------------
# Cases


def case_bf16_offline(ctx) -> str:
    out = run_ok(base_recipe(ctx.model, ctx.data, ctx.work / "bf16"), ctx.work, "bf16_offline")
    s = read_json(out / "tlm_summary.json")
    ctx.bf16_scores = [r["log_ppl"] for r in read_jsonl(out / "tlm_scores.jsonl")]
    expect(s["optimizer_steps"] == s["n_selected"] > 0, f"steps {s['optimizer_steps']} vs selected {s['n_selected']}")
    expect(s["mean_log_ppl_after_selected"] < s["mean_log_ppl_before_selected"], "log-perplexity did not fall")
    expect(len(read_jsonl(out / "generated_predictions.jsonl")) == s["n_prompts"], "prediction count")
    return f"{s['n_selected']}/{s['n_prompts']} selected, log-ppl {s['mean_log_ppl_before']:.3f} -> {s['mean_log_ppl_after']:.3f}"


def case_fp16_online_no_selection(ctx) -> str:
    recipe = base_recipe(
        ctx.model,
        ctx.data,
        ctx.work / "fp16",
        bf16=False,
        fp16=not CPU["on"],
        tlm_mode="online",
        tlm_chunk_size=6,
        tlm_log_p0=50.0,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
    )
    out = run_ok(recipe, ctx.work, "fp16_online")
    s = read_json(out / "tlm_summary.json")
    expect(
        s["n_selected"] == 0 and s["optimizer_steps"] == 0, f"selected {s['n_selected']}, steps {s['optimizer_steps']}"
    )
    expect(s["skipped_steps"] == s["n_prompts"], f"skipped {s['skipped_steps']} of {s['n_prompts']} updates")
    expect(lora_b_norm(out) == 0.0, "the adapter moved although nothing was selected")
    return f"{s['skipped_steps']} updates skipped, adapter unchanged"


def _deepspeed(ctx, stage: int) -> str:
    recipe = base_recipe(
        ctx.model,
        ctx.data,
        ctx.work / f"z{stage}",
        deepspeed=str(REPO / "recipes" / "deepspeed" / f"ds_z{stage}.json"),
    )
    out = run_ok(recipe, ctx.work, f"deepspeed_z{stage}", env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"})
    s = read_json(out / "tlm_summary.json")
    scores = [r["log_ppl"] for r in read_jsonl(out / "tlm_scores.jsonl")]
    if ctx.bf16_scores:
        worst = max(abs(a - b) for a, b in zip(scores, ctx.bf16_scores))
        expect(worst < 2e-2, f"scores differ from bf16_offline by up to {worst:.4f}")
    expect(s["optimizer_steps"] == s["n_selected"] > 0, f"steps {s['optimizer_steps']} vs selected {s['n_selected']}")
    return f"ZeRO-{stage}: {s['optimizer_steps']} steps, log-ppl after {s['mean_log_ppl_after']:.3f}"


def case_deepspeed_zero2(ctx) -> str:
    return _deepspeed(ctx, 2)


def case_deepspeed_zero3(ctx) -> str:
    return _deepspeed(ctx, 3)


def case_fsdp(ctx) -> str:
    import llamafactory.launcher as launcher

    config = ctx.work / "fsdp.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n"
        "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n"
        "  fsdp_reshard_after_forward: true\n  fsdp_state_dict_type: FULL_STATE_DICT\n  fsdp_cpu_ram_efficient_loading: false\n"
        "machine_rank: 0\nmain_training_function: main\nmixed_precision: bf16\nnum_machines: 1\nnum_processes: 1\n"
        "rdzv_backend: static\nsame_network: true\nuse_cpu: false\n",
        encoding="utf-8",
    )
    accelerate = shutil.which("accelerate", path=env_for()["PATH"]) or "accelerate"
    out = run_ok(
        base_recipe(ctx.model, ctx.data, ctx.work / "fsdp"),
        ctx.work,
        "fsdp",
        command=[accelerate, "launch", "--config_file", str(config), launcher.__file__],
    )
    s = read_json(out / "tlm_summary.json")
    expect(s["optimizer_steps"] == s["n_selected"] > 0, f"steps {s['optimizer_steps']} vs selected {s['n_selected']}")
    return f"FSDP2: {s['optimizer_steps']} steps, log-ppl after {s['mean_log_ppl_after']:.3f}"


def case_per_prompt_sift(ctx) -> str:
    recipe = base_recipe(
        ctx.model,
        ctx.data,
        ctx.work / "sift",
        tlm_selector="sift",
        tlm_reset="prompt",
        tlm_sift_budget=4,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
    )
    out = run_ok(recipe, ctx.work, "per_prompt_sift")
    s = read_json(out / "tlm_summary.json")
    lines = read_jsonl(out / "tlm_sift_selection.jsonl")
    expect([x["index"] for x in lines] == list(range(s["n_prompts"])), "each prompt once, in order")
    expect(s["optimizer_steps"] == 4 * s["n_prompts"], f"{s['optimizer_steps']} steps for {s['n_prompts']} prompts")
    expect(lora_b_norm(out) == 0.0, "the saved adapter is not the restored starting adapter")
    return f"{s['n_prompts']} prompts, log-ppl {s['mean_log_ppl_before']:.3f} -> {s['mean_log_ppl_after']:.3f}"


def case_per_prompt_ttsi(ctx) -> str:
    recipe = base_recipe(
        ctx.model,
        ctx.data,
        ctx.work / "ttsi",
        tlm_reset="prompt",
        tlm_selector="generate",
        tlm_generator="self",
        tlm_gate="margin",
        tlm_gate_tau=0.95,
        tlm_generate_k=1,
        tlm_generate_max_tokens=160,
        tlm_prompt_epochs=2,
        lora_target="all",
        max_samples=6 if CPU["on"] else 12,  # keeps the whole check within minutes (a CPU writes an example a minute)
    )
    out = run_ok(recipe, ctx.work, "per_prompt_ttsi")
    s = read_json(out / "tlm_summary.json")
    lines = read_jsonl(out / "tlm_generated.jsonl")
    expect([x["index"] for x in lines] == list(range(s["n_prompts"])), "each prompt once, in order")
    expect(all("gate_score" in x and "status" in x for x in lines), "a record without its gate score or status")
    counts = s["per_prompt"]
    expect(counts.get("n_generator_failed", 0) == 0, f"{counts.get('n_generator_failed')} generator failures")
    trained = [x for x in lines if x["steps"] > 0]
    expect(all(x["status"] == "ok" for x in trained), "a prompt trained without a usable example")
    expect(lora_b_norm(out) == 0.0, "the saved adapter is not the restored starting adapter")
    return (
        f"{counts['n_flagged']}/{s['n_prompts']} flagged, {len(trained)} trained on their own example "
        f"(examples: {counts.get('generated_examples')})"
    )


class StubEndpoint:
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers every request with one well-formed example, so that
    the TT-D path (endpoint -> parse -> train -> answer -> restore) runs whatever the demo model would write."""

    REPLY = "### Example 1\nInput: Write the word river backwards.\nOutput: revir\n"

    def __enter__(self):
        import http.server
        import threading

        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 (http.server's naming)
                self._send({"object": "list", "data": [{"id": "stub-teacher", "object": "model"}]})

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                stub.requests.append(json.loads(self.rfile.read(length)))
                message = {"role": "assistant", "content": stub.REPLY}
                self._send({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

            def log_message(self, *args):
                pass

        self.requests: list[dict] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def case_per_prompt_ttd_endpoint(ctx) -> str:
    with StubEndpoint() as teacher:
        recipe = base_recipe(
            ctx.model,
            ctx.data,
            ctx.work / "ttd",
            tlm_reset="prompt",
            tlm_selector="generate",
            tlm_generator=teacher.url,
            tlm_gate="none",
            tlm_generate_k=1,
            tlm_prompt_epochs=3,
            lora_target="all",
            max_samples=8,
        )
        out = run_ok(recipe, ctx.work, "per_prompt_ttd_endpoint")
    s = read_json(out / "tlm_summary.json")
    lines = read_jsonl(out / "tlm_generated.jsonl")
    n = s["n_prompts"]
    expect([x["index"] for x in lines] == list(range(n)), "each prompt once, in order")
    expect(len(teacher.requests) == n, f"{len(teacher.requests)} requests to the teacher for {n} prompts")
    expect(all(x["steps"] == 3 for x in lines), f"steps per prompt {[x['steps'] for x in lines]}, expected 3")
    drops = [(x["data_loss_before"], x["data_loss_after"]) for x in lines]
    expect(all(b < a for a, b in drops), "the loss on the teacher's answer did not fall on every prompt")
    expect(lora_b_norm(out) == 0.0, "the saved adapter is not the restored starting adapter")
    a, b = drops[0]
    return f"{n} prompts trained on the teacher's example (3 steps each; first prompt's loss {a:.2f} -> {b:.2f})"


def write_fewshot_data(ctx) -> str:
    """The demo prompts regrouped into 4 tasks of 6 prompts, each carrying 3 demonstrations (the next group's
    first rows) in its history: 4 task adapters to train, 20 prompts that reuse one."""
    rows = json.loads((Path(ctx.data) / "tlm_demo.json").read_text(encoding="utf-8"))[:24]
    folder = ctx.work / "fewshot_data"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, row in enumerate(rows):
        group = i // 6
        donors = [rows[(6 * (group + 1) + j) % 24] for j in range(3)]
        history = [[d["instruction"], d["output"]] for d in donors]
        out.append({"instruction": row["instruction"], "input": "", "output": row["output"], "history": history})
    (folder / "fewshot.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    info = {"fewshot": {"file_name": "fewshot.json", "columns": {"history": "history"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return str(folder)


def case_per_prompt_fewshot(ctx) -> str:
    recipe = base_recipe(
        ctx.model,
        write_fewshot_data(ctx),
        ctx.work / "fewshot",
        dataset="fewshot",
        tlm_reset="prompt",
        tlm_selector="demos",
        tlm_demo_orders=8,
        tlm_prompt_epochs=1,
        per_device_train_batch_size=4,
    )
    out = run_ok(recipe, ctx.work, "per_prompt_fewshot")
    s = read_json(out / "tlm_summary.json")
    lines = read_jsonl(out / "tlm_demos.jsonl")
    expect([x["index"] for x in lines] == list(range(24)), "each prompt once, in order")
    expect(all(x["n_demos"] == 3 for x in lines), "demonstrations not found in the history")
    trained = [x["index"] for x in lines if x["steps"] > 0]
    expect(trained == [0, 6, 12, 18], f"task adapters trained at prompts {trained}, expected 0, 6, 12, 18")
    hits = s["per_prompt"]["n_cache_hits"]
    expect(hits == 20, f"{hits} cache hits, expected 20")
    expect(lora_b_norm(out) == 0.0, "the saved adapter is not the restored starting adapter")
    loss = [(x["data_loss_before"], x["data_loss_after"]) for x in lines if x["steps"] > 0]
    return "4 task adapters, 20 reuses; demo-answer loss " + ", ".join(f"{a:.2f}->{b:.2f}" for a, b in loss)


def case_resume_after_kill(ctx) -> str:
    common = dict(
        tlm_mode="online",
        tlm_chunk_size=4,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        save_strategy="steps",
        overwrite_output_dir=False,
    )
    ref = run_ok(base_recipe(ctx.model, ctx.data, ctx.work / "ref", **common), ctx.work, "resume_reference")
    out = ctx.work / "killed"
    path = write_recipe(ctx.work / "resume_killed.yaml", base_recipe(ctx.model, ctx.data, out, **common))
    cli = shutil.which("llamafactory-cli", path=env_for()["PATH"]) or "llamafactory-cli"
    with (ctx.work / "resume_killed.log").open("w") as log:
        proc = subprocess.Popen(
            [cli, "train", str(path)], env=env_for(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        predictions = out / "generated_predictions.jsonl"
        while proc.poll() is None:
            if predictions.is_file() and len(predictions.read_text().splitlines()) >= 10:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.1)
        proc.wait()
    killed_at = len(predictions.read_text().splitlines()) if predictions.is_file() else 0
    expect(killed_at < 24, "the run finished before it could be killed")
    run_ok(base_recipe(ctx.model, ctx.data, out, **common), ctx.work, "resume_rerun")
    a, b = read_jsonl(ref / "generated_predictions.jsonl"), read_jsonl(predictions)
    expect(len(b) == len(a) == 24, f"{len(b)} predictions after resuming, {len(a)} uninterrupted")
    expect([x["prompt"] for x in a] == [x["prompt"] for x in b], "prompts out of order or duplicated")
    same = sum(x["predict"] == y["predict"] for x, y in zip(a, b))
    return f"killed at {killed_at}/24 answers; after resuming 24 answers, {same}/24 equal to the uninterrupted run"


CASES = [
    case_bf16_offline,
    case_fp16_online_no_selection,
    case_deepspeed_zero2,
    case_deepspeed_zero3,
    case_fsdp,
    case_per_prompt_sift,
    case_per_prompt_ttsi,
    case_per_prompt_ttd_endpoint,
    case_per_prompt_fewshot,
    case_resume_after_kill,
]


class Context:
    def __init__(self, work: Path, model: str, data: str) -> None:
        self.work, self.model, self.data = work, model, data
        self.bf16_scores: list[float] | None = None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder")
    parser.add_argument("--no-bench", action="store_true", help="skip bench/bench_tlm.py --gpu")
    parser.add_argument("--only", default=None, help="comma-separated case names to run")
    parser.add_argument("--cpu", action="store_true", help="check this script on a CPU (fp32; FSDP and bench skipped)")
    args = parser.parse_args(argv)
    ensure_environment(argv)
    CPU["on"] = args.cpu

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("FAIL  setup: no CUDA device visible to torch", flush=True)
        return 1
    device = "CPU (script check)" if args.cpu else torch.cuda.get_device_name(0)
    print(f"device: {device}, torch {torch.__version__}", flush=True)
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="tlm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    assets = [sys.executable, "-m", "tlm_plugin.assets"]
    model = subprocess.run([*assets, "model"], env=env_for(), capture_output=True, text=True, check=True).stdout
    data = subprocess.run(
        [*assets, "data", "--out", str(work / "data"), "--n", "24"],
        env=env_for(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ctx = Context(work, model.strip().splitlines()[-1], data.strip().splitlines()[-1])

    failures = 0
    wanted = set(args.only.split(",")) if args.only else None
    for case in CASES:
        name = case.__name__.removeprefix("case_")
        if (wanted and name not in wanted) or (args.cpu and name == "fsdp"):
            continue
        start = time.perf_counter()
        try:
            detail, verdict = case(ctx), "PASS"
        except CheckFailed as err:
            detail, verdict = str(err), "FAIL"
        except Exception as err:  # a crash of the check itself is a failure of that case, not of the report
            detail, verdict = f"{type(err).__name__}: {err}", "FAIL"
        failures += verdict == "FAIL"
        print(f"{verdict}  {name:<28} {time.perf_counter() - start:7.1f} s  {detail}", flush=True)

    if not args.no_bench and not wanted and not args.cpu:
        print("\nbench/bench_tlm.py --gpu (stage tlm vs plain LoRA, bf16):", flush=True)
        code = subprocess.run(
            [sys.executable, str(REPO / "bench" / "bench_tlm.py"), "--gpu", "--out", str(work / "bench")],
            env=env_for(),
            check=False,
        ).returncode
        failures += code != 0
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'all cases passed' if failures == 0 else f'{failures} failed'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
