# Run: python3 bench/gpu_check.py --prepare DIR   (any machine with PyPI: writes a bundle of at most 64 MiB)
#      python3 DIR/gpu_check.py --bundle DIR       (the GPU node, no network at all: about 6 minutes on one H100)
"""Prove the GPU paths of stage tlm on one NVIDIA GPU, on a node without internet: one PASS/FAIL line per case.

Two steps. ``--prepare DIR`` (here, with PyPI) writes a bundle: the wheels the check needs beyond torch /
transformers / accelerate / peft / safetensors / numpy (LLaMA-Factory and the dependencies it imports, DeepSpeed as an
sdist to build without ops, this project), fallback copies of transformers / accelerate / peft, the demo tokenizer and
demo prompts, this script, and a manifest. No model weights. ``--bundle DIR`` (the GPU node, no network) installs
from the bundle with ``pip --no-index`` into a target folder (no venv: the node's python may lack it), on the node's
own torch; the node's transformers / accelerate / peft are used where they are inside the tested bounds, the bundle's
copies otherwise (the choice is printed). The models are built there from configs: a tiny Llama with the demo
tokenizer, first taught the demo prompts and TT-SI's example format (seconds), for every correctness case; a random
~1B Llama-shaped model for the timing, where only speed matters.

Every case is a real ``llamafactory-cli train`` (one process; multi-rank agreement is proven by the gloo tests of
``tests/train/test_ranks.py``) and every PASS means the model learned what it should:

- ``bf16_offline``: the prompts the model does not know (log-ppl above P0) are selected and no other, one optimizer
  step each, their log-perplexity falls, LoRA B moved, one prediction per prompt.
- ``fp16_online``: chunk 0 holds known prompts (nothing selected: every update skipped, never reaching the
  GradScaler), chunk 1 unknown ones (real fp16 steps: steps + overflows = selected, at least one step); the learned
  prompts' log-perplexity falls and LoRA B moved.
- ``deepspeed_zero2`` / ``deepspeed_zero3``: offline bf16 with a DeepSpeed config that has its own optimizer and
  scheduler (``auto``): the scores equal ``bf16_offline``'s, the same rows selected and stepped, the log-perplexity
  falls at least half as much as without DeepSpeed (a learning rate of about 0 would not).
- ``fsdp2``: offline bf16 through ``accelerate launch`` with LLaMA-Factory's own FSDP2 settings
  (``fsdp_cpu_ram_efficient_loading: true`` included): the same checks as DeepSpeed's.
- ``per_prompt_sift``: SIFT per prompt (budget 4): every prompt once, 4 steps each, its log-perplexity falls on
  average, the saved adapter is the restored starting one.
- ``per_prompt_ttsi``: TT-SI with the model itself (margin gate): at least one prompt trained, every trained one on
  a usable example of its own, the loss on that example falls.
- ``per_prompt_ttd_endpoint``: TT-D from an OpenAI-compatible endpoint (a stub teacher in this script): every
  prompt learns the example and its loss falls.
- ``per_prompt_fewshot``: few-shot TTT: one adapter per task, reused, the demonstrations' loss falls.
- ``per_prompt_arc_augmented``: few-shot TTT on grid tasks with the ARC augmentations (dihedral, colours): 32
  augmented sequences per task, every test input answered in 18 forms in one batched bf16 ``generate``, grid answers
  among them and each mapped back exactly by its inverse, the prediction the vote's winner, the task's loss falls.
- ``resume_after_kill``: an online run killed with SIGKILL mid-stream and rerun: every answer once, in order, and
  the records equal an uninterrupted run's selection.
- ``serve_hf``: a learning server (``llamafactory-cli api``, ``tlm_mode: serve``, huggingface engine, bf16) answers
  16 prompts (8 known, 8 made up): every answer 200 with a version that never goes back, four windows, the made-up
  prompts selected and the known ones not, adapter swaps under 50 ms; killed with SIGKILL and restarted, it has lost
  no prompt and serves the same version.
- ``serve_vllm``: the same with ``infer_backend: vllm`` (each version a new ``LoRARequest``), then the p50 answer
  latency of 4 concurrent clients with learning on and off (target ratio <= 1.15); SKIP where vLLM is not installed.
- then ``bench/bench_tlm.py --gpu`` on the ~1B model: adaptation time of stage tlm vs plain LoRA, target <= 1.10x;
  the script exits non-zero if it misses.

``--cpu`` runs the same cases in fp32 on the CPU (no FSDP, no fp16, no bench), to check the script and the bundle.
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path


HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUNDLE_LIMIT = 64 * 2**20
FORMAT = 1
CPU = {"on": False}
LANES = {"jobs": 1}

# ---------------------------------------------------------------------------------------------------------------
# What the bundle holds. core: the node's copy is used when inside the bounds, else the bundle's (installed with the
# packages it needs itself). needed: installed unless the node has a version inside the bounds. Bounds: this
# project's and LLaMA-Factory 0.9.5's (which caps transformers at 5.6.0, accelerate at 1.11.0, peft at 0.18.1).

CORE = {  # name: bounds of the node's copy, the bundle's version
    "transformers": (">=4.55,!=4.57.0,<=5.6.0", "5.6.0"),
    "accelerate": (">=1.3,<=1.11.0", "1.11.0"),
    "peft": (">=0.18,<=0.18.1", "0.18.1"),
}
CORE_COMPANIONS = (  # what the bundle's transformers / accelerate / peft need, for nodes that lack it or have it too old
    "tokenizers",
    "huggingface-hub",
    "safetensors",
    "typer",
    "click",
    "rich",
    "shellingham",
    "markdown-it-py",
    "mdurl",
    "pygments",
    "httpx",
    "httpcore",
    "h11",
    "anyio",
    "sniffio",
    "hf-xet",
)
NEEDED = {  # what `llamafactory-cli train` with stage tlm imports beyond the six: name -> bounds of a node's copy
    "llamafactory": "==0.9.5",
    "datasets": ">=3.0,<=4.0.0",
    "trl": ">=0.18,<=0.24.0",
    "pyarrow": ">=15.0",
    "pandas": ">=2.0",
    "python-dateutil": "",
    "pytz": "",
    "tzdata": "",
    "dill": ">=0.3.0,<0.3.9",
    "multiprocess": "<0.70.17",
    "xxhash": "",
    "fsspec": ">=2023.1.0,<=2025.3.0",
    "requests": ">=2.32",
    "urllib3": "",
    "idna": "",
    "certifi": "",
    "charset-normalizer": "",
    "omegaconf": ">=2.0",
    "antlr4-python3-runtime": "",
    "pyyaml": ">=5.1",
    "pydantic": ">=2.0",
    "pydantic-core": "",
    "annotated-types": "",
    "typing-extensions": ">=4.12",
    "typing-inspection": "",
    "hjson": "",
    "py-cpuinfo": "",
    "msgpack": "",
    "nvidia-ml-py": "",
    "einops": "",
    "ninja": "",
    "packaging": ">=20.0",
    "psutil": "",
    "tqdm": ">=4.66",
    "filelock": "",
    "regex": "",
    # llamafactory-cli api (the learning server of tlm_mode: serve)
    "fastapi": "",
    "starlette": "",
    "uvicorn": "",
    "sse-starlette": "",
    "prometheus-client": ">=0.20",
}
# The versions come from one resolution for the node's Python and platform, under these pins: LLaMA-Factory 0.9.5's
# caps, and a pyarrow small enough for the bundle (datasets needs >= 15).
RESOLVE_PINS = ["llamafactory==0.9.5", "datasets==4.0.0", "trl==0.24.0", "pyarrow>=15,<17"]
TORCHAUDIO = "2.11.0"  # only for a node whose torch >= 2.11 has none (LLaMA-Factory imports torchaudio)
DEEPSPEED = "0.19.8"  # an sdist, built on the node without ops (ZeRO with torch's AdamW needs none)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
DEMO_ROWS = 96  # the bench's prompts; the cases use the first KNOWN_ROWS, which the tiny model is taught
KNOWN_ROWS = 24


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# --prepare


def pip_download(specs: list[str], dest: Path, python_version: str, platforms: list[str], binary: bool) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "-d",
        str(dest),
    ]
    if binary:
        cmd += ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
        for platform in platforms:
            cmd += ["--platform", platform]
    else:
        cmd += ["--no-binary=:all:"]
    subprocess.run(cmd + specs, check=True)


def resolve(python_version: str, platforms: list[str]) -> dict[str, str]:
    """{name: version} of one pip resolution of LLaMA-Factory, this project's core pins and DeepSpeed's needs, for
    the node's Python and platform (metadata only: nothing is installed)."""
    core = [f"{name}=={version}" for name, (_spec, version) in CORE.items()]
    needs = [n for n in NEEDED if n not in {p.split("=")[0].split(">")[0].split("<")[0] for p in RESOLVE_PINS}]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--dry-run",
            "--ignore-installed",
            "--target",
            str(Path(tmp) / "t"),
            "--report",
            str(report),
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
        ]
        for platform in platforms:
            cmd += ["--platform", platform]
        subprocess.run(cmd + RESOLVE_PINS + core + needs, check=True)
        data = json.loads(report.read_text(encoding="utf-8"))
    return {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in data["install"]
    }


def stored_copy(wheel: Path, dest: Path) -> None:
    """The same wheel with its members stored uncompressed (contents and RECORD unchanged), so that the xz stream
    of the bundle compresses the files themselves (deflated members do not compress further)."""
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            copy.external_attr, copy.compress_type = info.external_attr, zipfile.ZIP_STORED
            out.writestr(copy, src.read(info))


def prepare(dest: Path, python_version: str, platforms: list[str]) -> int:
    """Write the bundle to ``dest``: ``manifest.json`` and ``payload.tar.xz``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tlm-bundle-") as tmp:
        work = Path(tmp)
        downloads, payload = work / "downloads", work / "payload"
        (payload / "wheels").mkdir(parents=True)
        print(f"downloading wheels for CPython {python_version} on {', '.join(platforms)} ...", flush=True)
        versions = resolve(python_version, platforms)
        missing = [n for n in [*CORE, *NEEDED] if n not in versions]
        if missing:
            raise SystemExit(f"FAIL  prepare: the resolution holds no {', '.join(missing)}")
        names = [*CORE, *(n for n in CORE_COMPANIONS if n in versions), *NEEDED]
        specs = [f"{n}=={versions[n]}" for n in names] + [f"torchaudio=={TORCHAUDIO}"]
        pip_download(specs, downloads, python_version, platforms, binary=True)
        pip_download([f"deepspeed=={DEEPSPEED}"], downloads, python_version, platforms, binary=False)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
                str(REPO),
                "-w",
                str(downloads),
            ],
            check=True,
        )
        entries = []
        for path in sorted(downloads.iterdir()):
            name = _dist_name(path)
            role = {"llamafactory-tlm": "project", "deepspeed": "sdist", "torchaudio": "torchaudio"}.get(name)
            role = role or ("core" if name in CORE or name in CORE_COMPANIONS else "needed")
            spec = CORE[name][0] if name in CORE else NEEDED.get(name, "")
            entries.append(
                {
                    "name": name,
                    "file": path.name,
                    "sha256": sha256(path),
                    "role": role,
                    "node_spec": spec,
                    "version": _dist_version(path),
                }
            )
            if path.suffix == ".whl":
                stored_copy(path, payload / "wheels" / path.name)
            else:
                shutil.copy2(path, payload / "wheels" / path.name)
        print("demo tokenizer and prompts ...", flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        assets = [sys.executable, "-m", "tlm_plugin.assets"]
        model = subprocess.run([*assets, "model"], env=env, capture_output=True, text=True, check=True, cwd=REPO)
        model_dir = Path(model.stdout.strip().splitlines()[-1])
        (payload / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, payload / "tokenizer" / name)
        subprocess.run(
            [*assets, "data", "--out", str(payload / "data"), "--n", str(DEMO_ROWS)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        shutil.copy2(HERE / "gpu_check.py", payload / "gpu_check.py")
        shutil.copy2(HERE / "bench_tlm.py", payload / "bench_tlm.py")
        shutil.copytree(REPO / "recipes" / "deepspeed", payload / "deepspeed")
        print("compressing (xz) ...", flush=True)
        archive = dest / "payload.tar.xz"
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            for item in sorted(payload.iterdir()):
                tar.add(item, arcname=item.name)
    shutil.copy2(HERE / "gpu_check.py", dest / "gpu_check.py")
    manifest = {
        "format": FORMAT,
        "python": python_version,
        "platforms": platforms,
        "packages": entries,
        "payload": {"file": archive.name, "sha256": sha256(archive), "bytes": archive.stat().st_size},
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    total = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
    print(f"bundle {dest}: {total / 2**20:.1f} MiB ({len(entries)} packages; limit {BUNDLE_LIMIT / 2**20:.0f} MiB)")
    if total > BUNDLE_LIMIT:
        print(f"FAIL  the bundle is {total / 2**20:.1f} MiB, over {BUNDLE_LIMIT / 2**20:.0f} MiB", flush=True)
        return 1
    return 0


def _dist_name(path: Path) -> str:
    base = path.name[: -len(".tar.gz")] if path.name.endswith(".tar.gz") else path.stem
    return base.split("-")[0].lower().replace("_", "-")


def _dist_version(path: Path) -> str:
    base = path.name[: -len(".tar.gz")] if path.name.endswith(".tar.gz") else path.stem
    return base.split("-")[1]


# ---------------------------------------------------------------------------------------------------------------
# --bundle: install


def _specifier(spec: str):
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.specifiers import SpecifierSet
    return SpecifierSet(spec)


def node_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def inside(version: str | None, spec: str) -> bool:
    if version is None:
        return False
    return not spec or _specifier(spec).contains(version.split("+")[0], prereleases=True)


def requirements(wheel: Path) -> dict[str, str]:
    """{name: version bounds} of ``wheel``'s unconditional requirements (METADATA ``Requires-Dist`` without a marker)."""
    import re

    out = {}
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(metadata).decode().splitlines():
            if not line.startswith("Requires-Dist:") or ";" in line:
                continue
            match = re.match(r"Requires-Dist:\s*([A-Za-z0-9_.\-]+)\s*(\[[^\]]*\])?\s*\(?([^)]*)\)?", line)
            if match:
                out[match.group(1).lower().replace("_", "-")] = match.group(3).strip()
    return out


def choose(manifest: dict, wheels: Path) -> tuple[list[dict], list[str]]:
    """The bundle entries to install on this node, and one line per decision.

    transformers / accelerate / peft: the node's copy inside the bounds, else the bundle's. The others the check
    imports: the node's copy inside the bounds, else the bundle's. Then every package taken from the bundle has its
    own requirements met, by the node's copy where it fits, else by the bundle's (LLaMA-Factory and this project
    excepted: they declare much more than the check imports).
    """
    by_name = {e["name"]: e for e in manifest["packages"]}
    chosen: dict[str, dict] = {}
    lines = []
    for name, (spec, _version) in CORE.items():
        have = node_version(name)
        if inside(have, spec):
            lines.append(f"{name:<16} node's {have} (inside {spec})")
        else:
            chosen[name] = by_name[name]
            lines.append(f"{name:<16} bundle's {by_name[name]['version']} (node: {have or 'none'}; bounds {spec})")
    kept = []
    for entry in manifest["packages"]:
        if entry["role"] == "needed":
            if inside(node_version(entry["name"]), entry["node_spec"]):
                kept.append(entry["name"])
            else:
                chosen[entry["name"]] = entry
        elif entry["role"] == "project":
            chosen[entry["name"]] = entry
    torch_version = node_version("torch") or "0"
    if node_version("torchaudio") is None:
        if not inside(torch_version, ">=2.11"):
            raise SystemExit(
                f"FAIL  setup: LLaMA-Factory imports torchaudio, which this node's torch {torch_version} lacks; "
                "bring the torchaudio wheel of the same torch release and install it first"
            )
        chosen["torchaudio"] = by_name["torchaudio"]
    unmet: list[str] = []
    pending = [n for n in chosen if n not in ("llamafactory", "llamafactory-tlm")]
    while pending:
        for dep, spec in requirements(wheels / chosen[pending.pop()]["file"]).items():
            satisfied = inside(chosen[dep]["version"], spec) if dep in chosen else inside(node_version(dep), spec)
            if satisfied:
                continue
            if dep in by_name and inside(by_name[dep]["version"], spec):
                chosen[dep] = by_name[dep]
                pending.append(dep)
            elif f"{dep} {spec}" not in unmet:
                unmet.append(f"{dep} {spec}".strip())
    for name in ("tokenizers", "huggingface-hub", "torchaudio"):
        if name in chosen:
            lines.append(f"{name:<16} bundle's {chosen[name]['version']} (node: {node_version(name) or 'none'})")
    others = sorted(n for n, e in chosen.items() if e["role"] == "needed")
    lines.append(f"{'others':<16} bundle's {', '.join(others) or '-'}; node's {', '.join(sorted(kept)) or '-'}")
    if unmet:
        lines.append(f"{'unmet':<16} neither the node nor the bundle has {'; '.join(unmet)} (imports may fail)")
    return list(chosen.values()), lines


def install(bundle: Path, target: Path, unpacked: Path) -> list[str]:
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise SystemExit(
            f"FAIL  setup: {bundle} is a bundle of format {manifest.get('format')}, this script reads {FORMAT}"
        )
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != here:
        raise SystemExit(
            f"FAIL  setup: the bundle holds wheels for Python {manifest['python']}, this is Python {here}: prepare it "
            f"again with --python-version {here}"
        )
    archive = bundle / manifest["payload"]["file"]
    if sha256(archive) != manifest["payload"]["sha256"]:
        raise SystemExit(f"FAIL  setup: {archive} does not match its checksum in the manifest (copied partly?)")
    if not (unpacked / "wheels").is_dir():
        with tarfile.open(archive, "r:xz") as tar:
            tar.extractall(unpacked, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(unpacked)
    chosen, lines = choose(manifest, unpacked / "wheels")
    target.mkdir(parents=True, exist_ok=True)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--target",
        str(target),
        "--upgrade",
    ]
    wheels = [str(unpacked / "wheels" / e["file"]) for e in chosen]
    subprocess.run(pip + wheels, check=True)
    if not inside(node_version("deepspeed"), ">=0.16"):
        sdist = next(e for e in manifest["packages"] if e["role"] == "sdist")
        env = {**os.environ, "DS_BUILD_OPS": "0", "PYTHONPATH": _pythonpath(target)}
        subprocess.run(pip + ["--no-build-isolation", str(unpacked / "wheels" / sdist["file"])], check=True, env=env)
        lines.append(f"{'deepspeed':<16} bundle's {sdist['version']}, built without ops")
    else:
        lines.append(f"{'deepspeed':<16} node's {node_version('deepspeed')}")
    boot = target / "_tlm_boot"
    boot.mkdir(exist_ok=True)
    # The plugin starts through a .pth file, which Python reads in site directories only: make the target one.
    (boot / "sitecustomize.py").write_text(
        "import os, site, sys\n"
        "for d in os.environ.get('TLM_SITE_DIRS', '').split(os.pathsep):\n"
        "    if d:\n"
        "        site.addsitedir(d)\n"
        "        sys.path.remove(d); sys.path.insert(0, d)\n",
        encoding="utf-8",
    )
    return lines


def _pythonpath(target: Path) -> str:
    return os.pathsep.join([str(target), str(target / "_tlm_boot"), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )


# ---------------------------------------------------------------------------------------------------------------
# Runs


class Env:
    target: Path | None = None


def env_for(extra: dict[str, str] | None = None) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    env.update({"LLAMAFACTORY_VERBOSITY": "WARN", "DISABLE_VERSION_CHECK": "1", "HF_DATASETS_OFFLINE": "1"})
    env.update(
        {"TOKENIZERS_PARALLELISM": "false", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    )
    env.setdefault("CUDA_VISIBLE_DEVICES", "0")
    if Env.target is not None:
        env["PYTHONPATH"] = _pythonpath(Env.target)
        env["TLM_SITE_DIRS"] = str(Env.target)
    if CPU["on"]:
        env.update({"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"})
    for key in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "LLAMAFACTORY_TLM_DISABLE", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


CLI = [sys.executable, "-m", "llamafactory.cli"]


def base_recipe(ctx, data: Path, dataset: str, out: Path, **overrides) -> dict:
    recipe = {
        "model_name_or_path": str(ctx.model),
        "stage": "tlm",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_target": "all",
        "dataset": dataset,
        "dataset_dir": str(data),
        "template": "smollm2",
        "cutoff_len": 1024,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 1,
        "learning_rate": 2.0e-3,
        "num_train_epochs": 1.0,
        "lr_scheduler_type": "constant",
        "bf16": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 42,
        "do_predict": True,
        "per_device_eval_batch_size": 8,
        "do_sample": False,
        "max_new_tokens": 16,
        "dataloader_num_workers": 0,
        "tlm_log_p0": ctx.log_p0,
        "ddp_timeout": 3600,
    }
    recipe.update(overrides)
    if CPU["on"]:
        recipe.update(bf16=False, fp16=False)
    return {k: v for k, v in recipe.items() if v is not None}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=1), encoding="utf-8")  # JSON is YAML: no yaml needed here
    return path


def launch(recipe: dict, work: Path, name: str, env: dict | None = None, command: list[str] | None = None):
    path = write_recipe(work / f"{name}.yaml", recipe)
    log = work / f"{name}.log"
    cmd = (command or [*CLI, "train"]) + [str(path)]
    with log.open("w", encoding="utf-8") as out:
        # cwd: the case's own folder (``python -m`` puts the cwd first on sys.path, where any folder named like a
        # package, e.g. Ray's /tmp/ray, would shadow it)
        code = subprocess.run(
            cmd, env=env_for(env), stdout=out, stderr=subprocess.STDOUT, check=False, cwd=work
        ).returncode
    return code, log


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tail(log: Path, lines: int = 8) -> str:
    text = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    return " | ".join(line.strip() for line in text[-lines:])


class CheckFailed(Exception):
    pass


class CheckSkipped(Exception):
    """The node lacks what the case needs (e.g. vLLM, which no bundle can carry); said, not failed."""


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


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / max(len(values), 1)


# ---------------------------------------------------------------------------------------------------------------
# The models and data, built on the node


GIBBERISH_SEED = 7


def gibberish_rows(n: int) -> list[dict]:
    """Prompts of made-up words: text the taught model has never seen (its log-perplexity stays high)."""
    rng = random.Random(GIBBERISH_SEED)
    letters = "bcdfghjklmnpqrstvwxz"
    vowels = "aeiouy"

    def word() -> str:
        return "".join(rng.choice(letters) + rng.choice(vowels) for _ in range(rng.randint(1, 3))) + rng.choice(
            letters
        )

    return [
        {"instruction": " ".join(word() for _ in range(rng.randint(8, 16))) + "?", "input": "", "output": word()}
        for _ in range(n)
    ]


TTSI_REPLY = "### Example 1\nInput: Name a primary colour.\nOutput: Red.\n"


def build_models(ctx) -> None:
    """The tiny Llama with the demo tokenizer, taught (a) the demo prompts as stage tlm encodes them and (b) to
    answer TT-SI's example-writing prompt with one well-formed example; and P0 between the taught prompts'
    log-perplexity and the made-up ones'. Plus the random ~1B model of the timing (GPU only)."""
    import torch
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tlm_plugin.selectors.generate import DEFAULT_PROMPT
    from tlm_plugin.train.data import Encoder

    device = torch.device("cpu" if CPU["on"] else "cuda")
    tokenizer = AutoTokenizer.from_pretrained(ctx.tokenizer)
    data_args = DataArguments(template="smollm2", cutoff_len=1024)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    encoder = Encoder(template, tokenizer, data_args)
    demo = json.loads((ctx.data / "tlm_demo.json").read_text(encoding="utf-8"))[:KNOWN_ROWS]
    known = [encoder.prompt_ids([{"role": "user", "content": _content(r)}]) for r in demo]
    unknown = [encoder.prompt_ids([{"role": "user", "content": _content(r)}]) for r in gibberish_rows(16)]
    reply = tokenizer.encode(TTSI_REPLY, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    example_prompts = [
        encoder.prompt_ids(
            [{"role": "user", "content": DEFAULT_PROMPT.replace("{prompt}", _content(r)).replace("{k}", "1")}]
        )
        + reply
        for r in demo
    ]
    torch.manual_seed(0)
    config = llama_config(tokenizer, hidden=128, intermediate=384, layers=2, heads=4, kv_heads=2, tied=False)
    model = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = 8  # half known prompts, half example-writing prompts with the one reply
    steps = 100 if CPU["on"] else 400
    model.train()
    for step in range(steps):
        half = batch // 2
        rows = [known[(step * half + i) % len(known)] for i in range(half)]
        rows += [example_prompts[(step * half + i) % len(example_prompts)] for i in range(half)]
        loss = _lm_loss(model, rows, tokenizer.pad_token_id, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        k = [float(_lm_loss(model, [r], tokenizer.pad_token_id, device)) for r in known]
        u = [float(_lm_loss(model, [r], tokenizer.pad_token_id, device)) for r in unknown]
    expect(max(k) < min(u), f"taught prompts {max(k):.2f} vs made-up {min(u):.2f}: not separated")
    ctx.log_p0 = round((max(k) + min(u)) / 2, 3)
    ctx.separation = (max(k), min(u))
    model.save_pretrained(ctx.model)
    tokenizer.save_pretrained(ctx.model)
    if not CPU["on"]:
        big = llama_config(tokenizer, hidden=2048, intermediate=5632, layers=16, heads=32, kv_heads=8, tied=True)
        with torch.device("cuda"):
            LlamaForCausalLM(big).to(torch.bfloat16).save_pretrained(ctx.big_model)
        tokenizer.save_pretrained(ctx.big_model)


def llama_config(tokenizer, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool):
    """A Llama-shaped config over the demo tokenizer's vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def _content(row: dict) -> str:
    return "\n".join(part for part in (row.get("instruction"), row.get("input")) if part)


def _lm_loss(model, rows: list[list[int]], pad_id: int, device):
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, device=device)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.float()


def write_data(ctx) -> None:
    """Datasets of the cases: known (demo) and made-up prompts, mixed, and as a two-chunk stream."""
    demo = json.loads((ctx.data / "tlm_demo.json").read_text(encoding="utf-8"))
    made_up = gibberish_rows(16)
    folder = ctx.work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    sets = {
        "mixed": [row for pair in zip(demo[:12], made_up[:12]) for row in pair],  # 24 rows, every other made up
        "stream": demo[:8] + made_up[:8],  # chunk 0 known, chunk 1 made up
        "known": demo[:12],
    }
    info = {}
    for name, rows in sets.items():
        (folder / f"{name}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
        info[name] = {"file_name": f"{name}.json"}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    ctx.sets = folder
    ctx.made_up = {_content(r) for r in made_up}


# ---------------------------------------------------------------------------------------------------------------
# Cases


def offline_checks(ctx, out: Path, reference: dict | None = None) -> str:
    s = read_json(out / "tlm_summary.json")
    rows = read_jsonl(out / "tlm_scores.jsonl")
    n = len(rows)
    expect(
        [bool(r["selected"]) for r in rows] == [i % 2 == 1 for i in range(n)], "selected rows are not the made-up ones"
    )
    expect(
        s["optimizer_steps"] == s["n_selected"] == n // 2,
        f"steps {s['optimizer_steps']} vs selected {s['n_selected']}",
    )
    drop = s["mean_log_ppl_before_selected"] - s["mean_log_ppl_after_selected"]
    expect(drop > 0.1, f"log-perplexity of the learned prompts fell by {drop:.3f} only")
    expect(lora_b_norm(out) > 0, "LoRA B did not move")
    expect(len(read_jsonl(out / "generated_predictions.jsonl")) == n, "prediction count")
    if reference is not None:
        worst = max(abs(a - b) for a, b in zip([r["log_ppl"] for r in rows], reference["scores"]))
        expect(worst < 2e-2, f"scores differ from bf16_offline by up to {worst:.4f}")
        expect(drop > 0.5 * reference["drop"], f"log-ppl fell by {drop:.3f}, bf16_offline by {reference['drop']:.3f}")
    return f"{s['n_selected']}/{n} selected (the made-up ones), log-ppl of those {s['mean_log_ppl_before_selected']:.2f} -> {s['mean_log_ppl_after_selected']:.2f}"


def case_bf16_offline(ctx) -> str:
    out = run_ok(base_recipe(ctx, ctx.sets, "mixed", ctx.work / "bf16"), ctx.work, "bf16_offline")
    detail = offline_checks(ctx, out)
    s = read_json(out / "tlm_summary.json")
    ctx.reference = {
        "scores": [r["log_ppl"] for r in read_jsonl(out / "tlm_scores.jsonl")],
        "drop": s["mean_log_ppl_before_selected"] - s["mean_log_ppl_after_selected"],
    }
    ctx.reference_ready.set()
    return detail


def case_fp16_online(ctx) -> str:
    recipe = base_recipe(
        ctx, ctx.sets, "stream", ctx.work / "fp16", bf16=False, fp16=not CPU["on"], tlm_mode="online", tlm_chunk_size=8
    )
    out = run_ok(recipe, ctx.work, "fp16_online")
    s = read_json(out / "tlm_summary.json")
    rows = read_jsonl(out / "tlm_scores.jsonl")
    expect(not any(r["selected"] for r in rows[:8]), "a known prompt of chunk 0 was selected")
    expect(all(r["selected"] for r in rows[8:]), "a made-up prompt of chunk 1 was not selected")
    expect(s["skipped_steps"] == 8, f"{s['skipped_steps']} skipped updates, expected the 8 of chunk 0")
    expect(
        s["optimizer_steps"] + s["overflow_steps"] == 8 and s["optimizer_steps"] > 0,
        f"chunk 1: {s['optimizer_steps']} steps, {s['overflow_steps']} overflows for 8 selected",
    )
    before, after = mean(r["log_ppl"] for r in rows[8:]), mean(r["log_ppl_after"] for r in rows[8:])
    expect(after < before - 0.1, f"learned prompts' log-ppl {before:.2f} -> {after:.2f}")
    expect(lora_b_norm(out) > 0, "LoRA B did not move")
    expect(len(read_jsonl(out / "generated_predictions.jsonl")) == 16, "prediction count")
    precision = "fp16" if not CPU["on"] else "fp32"
    return (
        f"{precision}: chunk 0 skipped 8/8, chunk 1 {s['optimizer_steps']} steps + {s['overflow_steps']} "
        f"overflows, log-ppl {before:.2f} -> {after:.2f}"
    )


def _deepspeed(ctx, stage: int) -> str:
    # the stage's config with DeepSpeed's own optimizer and scheduler (`auto` values), as users often write it
    config = read_json(ctx.repo_files / "deepspeed" / f"ds_z{stage}.json")
    own = read_json(ctx.repo_files / "deepspeed" / "ds_z3_own_optimizer.json")
    config.update(optimizer=own["optimizer"], scheduler=own["scheduler"])
    path = ctx.work / f"ds_z{stage}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    recipe = base_recipe(
        ctx, ctx.sets, "mixed", ctx.work / f"z{stage}", deepspeed=str(path), lr_scheduler_type="linear", warmup_steps=1
    )
    out = run_ok(recipe, ctx.work, f"deepspeed_z{stage}", env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"})
    ctx.reference_ready.wait()
    return f"ZeRO-{stage}: " + offline_checks(ctx, out, ctx.reference)


def case_deepspeed_zero2(ctx) -> str:
    return _deepspeed(ctx, 2)


def case_deepspeed_zero3(ctx) -> str:
    return _deepspeed(ctx, 3)


FSDP2_CONFIG = {  # LLaMA-Factory 0.9.5's examples/accelerate/fsdp2_config.yaml settings, on one process
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "FSDP",
    "downcast_bf16": "no",
    "fsdp_config": {
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_offload_params": False,
        "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_version": 2,
    },
    "machine_rank": 0,
    "main_training_function": "main",
    "mixed_precision": "bf16",
    "num_machines": 1,
    "num_processes": 1,
    "rdzv_backend": "static",
    "same_network": True,
    "use_cpu": False,
}


def case_fsdp2(ctx) -> str:
    import importlib.util

    config = ctx.work / "fsdp2.yaml"
    config.write_text(json.dumps(FSDP2_CONFIG, indent=1), encoding="utf-8")
    launcher = importlib.util.find_spec("llamafactory.launcher").origin
    port = str(29600 + os.getpid() % 300)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--main_process_port",
        port,
        launcher,
    ]
    out = run_ok(base_recipe(ctx, ctx.sets, "mixed", ctx.work / "fsdp2"), ctx.work, "fsdp2", command=command)
    ctx.reference_ready.wait()
    return "FSDP2 (cpu_ram_efficient_loading): " + offline_checks(ctx, out, ctx.reference)


def case_per_prompt_sift(ctx) -> str:
    recipe = base_recipe(
        ctx,
        ctx.sets,
        "mixed",
        ctx.work / "sift",
        tlm_selector="sift",
        tlm_mode="per_prompt",
        tlm_sift_budget=4,
        tlm_log_p0=None,
        max_samples=12,
    )
    out = run_ok(recipe, ctx.work, "per_prompt_sift")
    s = read_json(out / "tlm_summary.json")
    lines = read_jsonl(out / "tlm_sift_selection.jsonl")
    expect([x["index"] for x in lines] == list(range(s["n_prompts"])), "each prompt once, in order")
    expect(all(x["steps"] + x.get("overflow_steps", 0) == 4 for x in lines), "4 steps per prompt")
    expect(s["mean_log_ppl_after"] < s["mean_log_ppl_before"], "per-prompt learning did not lower log-ppl")
    expect(lora_b_norm(out) == 0.0, "the saved adapter is not the restored starting adapter")
    return f"{s['n_prompts']} prompts, 4 steps each, log-ppl {s['mean_log_ppl_before']:.2f} -> {s['mean_log_ppl_after']:.2f}"


def build_tiny_encoder(ctx) -> Path:
    """A sentence encoder for the pool store case: a 2-layer random Llama on the demo tokenizer behind
    sentence-transformers' mean pooling and normalisation (no weights to ship)."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, LlamaModel

    folder = ctx.work / "models" / "encoder"
    if (folder / "modules.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(str(ctx.tokenizer))
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(0)
    raw = ctx.work / "models" / "encoder-hf"
    LlamaModel(llama_config(tok, 64, 128, 2, 4, 2, tied=False)).save_pretrained(str(raw))
    tok.save_pretrained(str(raw))
    word = models.Transformer(str(raw), max_seq_length=128)
    SentenceTransformer(modules=[word, models.Pooling(64, "mean"), models.Normalize()], device="cpu").save(str(folder))
    return folder


def case_per_prompt_pool_store(ctx) -> str:
    """A pool file embedded by a sentence encoder on the GPU in bf16 into a pool store (float16 shards, a faiss
    index), then per-prompt SIFT over it; the stored vectors are the encoder's own on the same device."""
    import importlib.util

    for name in ("sentence_transformers", "faiss"):
        if importlib.util.find_spec(name) is None:
            raise CheckSkipped(
                f"{name} is not installed on this node (pip install sentence-transformers faiss-cpu; they are too "
                "large for the bundle)"
            )
    import numpy as np
    import torch

    encoder = build_tiny_encoder(ctx)
    demo = json.loads((ctx.data / "tlm_demo.json").read_text(encoding="utf-8"))
    pool_rows = [
        {"instruction": f"{row['instruction']} (variant {v})", "output": row.get("output", "")}
        for v in range(20)
        for row in demo
    ]
    pool = ctx.work / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in pool_rows), encoding="utf-8")
    store = ctx.work / "pool-store"
    recipe = base_recipe(
        ctx,
        ctx.sets,
        "mixed",
        ctx.work / "pool_store",
        tlm_selector="sift",
        tlm_mode="per_prompt",
        tlm_sift_budget=4,
        tlm_sift_candidates=64,
        tlm_log_p0=None,
        max_samples=8,
        tlm_pool_dataset=str(pool),
        tlm_sift_embedder=str(encoder),
        tlm_pool_store=str(store),
        tlm_pool_shard_rows=512,
    )
    out = run_ok(recipe, ctx.work, "per_prompt_pool_store")
    s = read_json(out / "tlm_summary.json")
    manifest = read_json(store / "manifest.json")
    n = len(pool_rows)
    expect(
        manifest["rows"] == n and len(manifest["shards"]) == -(-n // 512), f"store manifest {manifest['rows']} rows"
    )
    expect(manifest["dtype"] == "float16" and manifest["index"]["kind"] == "flat", "float16 shards, flat index")
    lines = read_jsonl(out / "tlm_sift_selection.jsonl")
    expect(all(x["steps"] + x.get("overflow_steps", 0) == 4 for x in lines), "4 steps per prompt")
    expect(all(0 <= p < n for x in lines for p in x["picks"]), "picks inside the pool")
    expect(s["pool_store"]["rows"] == n, "the summary names the store")
    from sentence_transformers import SentenceTransformer

    device = "cpu" if CPU["on"] else "cuda"
    model = SentenceTransformer(str(encoder), device=device, local_files_only=True)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    texts = [f"{r['instruction']}\n{r['output']}" if r["output"] else r["instruction"] for r in pool_rows[:64]]
    want = np.asarray(model.encode(texts, normalize_embeddings=True, convert_to_numpy=True), dtype=np.float32)
    got = np.load(store / manifest["shards"][0]["file"])[:64].astype(np.float32)
    cosine = float(((want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)).min())
    expect(cosine > 0.999, f"stored vectors vs the encoder's own: min cosine {cosine:.5f}")
    return f"{n} pool rows in {len(manifest['shards'])} shards, {manifest['index']['kind']} index, min cosine {cosine:.5f}, {len(lines)} prompts x 4 steps"


def case_per_prompt_ttsi(ctx) -> str:
    recipe = base_recipe(
        ctx,
        ctx.sets,
        "known",
        ctx.work / "ttsi",
        tlm_mode="per_prompt",
        tlm_selector="generate",
        tlm_generator="self",
        tlm_gate="margin",
        tlm_gate_tau=0.99,
        tlm_generate_k=1,
        tlm_generate_max_tokens=48,
        tlm_generate_temperature=0.3,
        tlm_prompt_epochs=2,
        tlm_log_p0=None,
        max_samples=8,
    )
    out = run_ok(recipe, ctx.work, "per_prompt_ttsi")
    s = read_json(out / "tlm_summary.json")
    lines = read_jsonl(out / "tlm_generated.jsonl")
    expect([x["index"] for x in lines] == list(range(s["n_prompts"])), "each prompt once, in order")
    counts = s["per_prompt"]
    expect(counts.get("n_generator_failed", 0) == 0, f"{counts.get('n_generator_failed')} generator failures")
    trained = [x for x in lines if x["steps"] > 0]
    expect(
        len(trained) > 0,
        f"no prompt trained (flagged {counts['n_flagged']}, examples {counts.get('generated_examples')})",
    )
    expect(all(x["status"] == "ok" for x in trained), "a prompt trained without a usable example")
    expect(
        all(x["data_loss_after"] < x["data_loss_before"] for x in trained), "the loss on an own example did not fall"
    )
    expect(lora_b_norm(out) == 0.0, "the saved adapter is not the restored starting adapter")
    return f"{counts['n_flagged']}/{s['n_prompts']} flagged, {len(trained)} trained on their own example"


class StubEndpoint:
    """An OpenAI-compatible endpoint on 127.0.0.1 that answers every request with one well-formed example."""

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
            ctx,
            ctx.sets,
            "known",
            ctx.work / "ttd",
            tlm_mode="per_prompt",
            tlm_selector="generate",
            tlm_generator=teacher.url,
            tlm_gate="none",
            tlm_generate_k=1,
            tlm_prompt_epochs=3,
            tlm_log_p0=None,
            max_samples=8,
        )
        out = run_ok(recipe, ctx.work, "per_prompt_ttd_endpoint")
    s = read_json(out / "tlm_summary.json")
    lines = read_jsonl(out / "tlm_generated.jsonl")
    n = s["n_prompts"]
    expect([x["index"] for x in lines] == list(range(n)), "each prompt once, in order")
    expect(len(teacher.requests) == n, f"{len(teacher.requests)} requests to the teacher for {n} prompts")
    expect(all(x["steps"] + x.get("overflow_steps", 0) == 3 for x in lines), "3 steps per prompt")
    drops = [(x["data_loss_before"], x["data_loss_after"]) for x in lines]
    expect(all(b < a for a, b in drops), "the loss on the teacher's answer did not fall on every prompt")
    expect(lora_b_norm(out) == 0.0, "the saved adapter is not the restored starting adapter")
    a, b = drops[0]
    return f"{n} prompts trained on the teacher's example (first prompt's loss {a:.2f} -> {b:.2f})"


# LLaMA-Factory reads only the columns named once "columns" is given: the prompt and response must be named too
ALPACA_HISTORY = {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}


def write_history_dataset(folder: Path, name: str, rows: list[dict]) -> Path:
    """``rows`` (alpaca with a ``history``) as LLaMA-Factory dataset ``name`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    info = {name: {"file_name": f"{name}.json", "columns": ALPACA_HISTORY}}
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def case_per_prompt_fewshot(ctx) -> str:
    rows = json.loads((ctx.data / "tlm_demo.json").read_text(encoding="utf-8"))[:24]
    out_rows = []
    for i, row in enumerate(rows):  # 4 tasks of 6 prompts, each with 3 demonstrations (the next group's rows)
        donors = [rows[(6 * (i // 6 + 1) + j) % 24] for j in range(3)]
        out_rows.append(
            {
                "instruction": row["instruction"],
                "input": "",
                "output": row["output"],
                "history": [[d["instruction"], d["output"]] for d in donors],
            }
        )
    folder = write_history_dataset(ctx.work / "fewshot_data", "fewshot", out_rows)
    recipe = base_recipe(
        ctx,
        folder,
        "fewshot",
        ctx.work / "fewshot",
        tlm_mode="per_prompt",
        tlm_selector="demos",
        tlm_demo_orders=8,
        tlm_prompt_epochs=1,
        per_device_train_batch_size=4,
        tlm_log_p0=None,
    )
    out = run_ok(recipe, ctx.work, "per_prompt_fewshot")
    s = read_json(out / "tlm_summary.json")
    lines = read_jsonl(out / "tlm_demos.jsonl")
    expect([x["index"] for x in lines] == list(range(24)), "each prompt once, in order")
    expect(all(x["n_demos"] == 3 for x in lines), "demonstrations not found in the history")
    trained = [x for x in lines if x["steps"] > 0]
    expect([x["index"] for x in trained] == [0, 6, 12, 18], f"tasks trained at {[x['index'] for x in trained]}")
    expect(s["per_prompt"]["n_cache_hits"] == 20, f"{s['per_prompt']['n_cache_hits']} cache hits, expected 20")
    expect(
        all(x["data_loss_after"] < x["data_loss_before"] for x in trained), "a task's demonstration loss did not fall"
    )
    expect(lora_b_norm(out) == 0.0, "the saved adapter is not the restored starting adapter")
    return "4 task adapters, 20 reuses; demo-answer loss " + ", ".join(
        f"{x['data_loss_before']:.2f}->{x['data_loss_after']:.2f}" for x in trained
    )


def _grid_text(grid) -> str:
    return "\n".join(" ".join(str(c) for c in row) for row in grid)


def _parse_grid(text: str):
    rows = [line.strip().split(" ") for line in text.strip().split("\n")]
    if not rows or any(not all(c.isdigit() and len(c) == 1 for c in row) for row in rows):
        return None
    return [[int(c) for c in row] for row in rows] if len({len(r) for r in rows}) == 1 else None


# each symmetry's inverse, written here independently of tlm_plugin.grids
_UNDO = {
    "rot90": lambda g: [list(r) for r in zip(*g)][::-1],
    "rot180": lambda g: [r[::-1] for r in g[::-1]],
    "rot270": lambda g: [list(r) for r in zip(*g[::-1])],
    "flip_h": lambda g: [r[::-1] for r in g],
    "flip_v": lambda g: [list(r) for r in g[::-1]],
    "transpose": lambda g: [list(r) for r in zip(*g)],
    "transpose_anti": lambda g: [list(r) for r in zip(*[r[::-1] for r in g[::-1]])],
}


def case_per_prompt_arc_augmented(ctx) -> str:
    rng = random.Random(0)
    rows = []
    for _ in range(2):  # 2 grid tasks (output: the input mirrored), 3 demonstrations, 2 test inputs each
        grids = [[[rng.randrange(4) for _ in range(3)] for _ in range(3)] for _ in range(5)]
        history = [[_grid_text(g), _grid_text([r[::-1] for r in g])] for g in grids[:3]]
        for g in grids[3:]:
            mirrored = _grid_text([r[::-1] for r in g])
            rows.append({"instruction": _grid_text(g), "input": "", "output": mirrored, "history": history})
    folder = write_history_dataset(ctx.work / "arc_data", "arc", rows)
    recipe = base_recipe(
        ctx,
        folder,
        "arc",
        ctx.work / "arc",
        tlm_mode="per_prompt",
        tlm_selector="demos",
        tlm_demo_orders=4,
        tlm_demo_augment="dihedral,colors",
        tlm_demo_max_sequences=32,
        tlm_demo_vote_augment=True,
        tlm_demo_votes=2,
        tlm_prompt_epochs=6,  # enough for the tiny model to answer in grids, so that answers are mapped back
        learning_rate=5.0e-3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=18,
        max_new_tokens=24,
        tlm_log_p0=None,
    )
    out = run_ok(recipe, ctx.work, "per_prompt_arc_augmented")
    lines = read_jsonl(out / "tlm_demos.jsonl")
    predictions = read_jsonl(out / "generated_predictions.jsonl")
    expect([x["index"] for x in lines] == [0, 1, 2, 3], "each prompt once, in order")
    expect([x["cache_hit"] for x in lines] == [False, True, False, True], "the second test input reuses its task")
    expect(all(x["steps"] == 48 for x in lines[::2]), "32 sequences in batches of 4, 6 epochs: 48 steps per task")
    expect(all(len(x["vote_answers"]) == 18 for x in lines), "9 versions x 2 orders answered per test input")
    mapped = 0
    for x in lines:
        for vote in x["vote_answers"]:
            grid = _parse_grid(vote["raw"])
            if vote["augment"] in _UNDO and grid is not None:
                expect(vote["answer"] == _grid_text(_UNDO[vote["augment"]](grid)), f"{vote} mapped back wrongly")
                mapped += 1
    expect(mapped > 0, "no answer was a grid: nothing was mapped back")
    for x, p in zip(lines, predictions):
        winner = x["candidates"][0]["answer"] if x["candidates"] else None
        expect(winner is None or p["predict"].strip() == winner, "the prediction is not the vote's winner")
    expect(all(x["data_loss_after"] < x["data_loss_before"] for x in lines[::2]), "a task's loss did not fall")
    expect(lora_b_norm(out) == 0.0, "the saved adapter is not the restored starting adapter")
    return f"2 tasks x 2 inputs, 18 answers each in one batched generate, {mapped} grid answers mapped back"


def case_resume_after_kill(ctx) -> str:
    common = dict(tlm_mode="online", tlm_chunk_size=4, save_strategy="steps", overwrite_output_dir=False)
    ref = run_ok(base_recipe(ctx, ctx.sets, "mixed", ctx.work / "ref", **common), ctx.work, "resume_reference")
    out = ctx.work / "killed"
    recipe = base_recipe(ctx, ctx.sets, "mixed", out, **common)
    path = write_recipe(ctx.work / "resume_killed.yaml", recipe)
    predictions = out / "generated_predictions.jsonl"
    with (ctx.work / "resume_killed.log").open("w") as log:
        proc = subprocess.Popen(
            [*CLI, "train", str(path)],
            env=env_for(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ctx.work,
        )
        while proc.poll() is None:
            if predictions.is_file() and len(predictions.read_text().splitlines()) >= 10:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
    killed_at = len(predictions.read_text().splitlines()) if predictions.is_file() else 0
    expect(proc.returncode == -signal.SIGKILL and killed_at < 24, "the run finished before it could be killed")
    run_ok(recipe, ctx.work, "resume_rerun")
    a, b = read_jsonl(ref / "generated_predictions.jsonl"), read_jsonl(predictions)
    expect(len(b) == len(a) == 24, f"{len(b)} predictions after resuming, {len(a)} uninterrupted")
    expect([x["prompt"] for x in a] == [x["prompt"] for x in b], "prompts out of order or duplicated")
    sa, sb = read_jsonl(ref / "tlm_scores.jsonl"), read_jsonl(out / "tlm_scores.jsonl")
    expect([r["index"] for r in sb] == list(range(24)), "records missing or duplicated")
    expect([r["selected"] for r in sa] == [r["selected"] for r in sb], "the resumed run selected other rows")
    same = sum(x["predict"] == y["predict"] for x, y in zip(a, b))
    return f"killed at {killed_at}/24 answers; after resuming 24 answers and records, {same}/24 answers equal"


# ---------------------------------------------------------------------------------------------------------------
# The learning server (tlm_mode: serve under llamafactory-cli api)


def _http(url: str, body: dict | None = None, timeout: float = 300.0) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, {"detail": err.read().decode(errors="replace")}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    def __init__(self, ctx, recipe: dict, name: str) -> None:
        self.path = write_recipe(ctx.work / f"{name}.yaml", recipe)
        self.log = ctx.work / f"{name}.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = ctx.work
        self.proc = None

    def start(self) -> "_Server":
        env = env_for({"API_HOST": "127.0.0.1", "API_PORT": str(self.port), "API_VERBOSE": "0"})
        with self.log.open("a", encoding="utf-8") as out:
            self.proc = subprocess.Popen(
                [*CLI, "api", str(self.path)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.work,
            )
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            expect(self.proc.poll() is None, f"the server exited: {tail(self.log)}")
            try:
                if _http(self.url + "/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        raise CheckFailed(f"the server did not answer: {tail(self.log)}")

    def status(self) -> dict:
        return _http(self.url + "/tlm/status")[1]

    def ask(self, row: dict) -> tuple[int, dict]:
        body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": _content(row)}], "do_sample": False}
        return _http(self.url + "/v1/chat/completions", body)

    def wait(self, predicate, what: str, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.5)
        raise CheckFailed(f"timed out waiting for {what}: {self.status()} | {tail(self.log)}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def serve_recipe(ctx, out: Path, **overrides) -> dict:
    recipe = base_recipe(
        ctx,
        ctx.sets,
        "known",
        out,
        tlm_mode="serve",
        tlm_chunk_size=4,
        tlm_probe_dataset="known",
        tlm_probe_tolerance=1.0,
        overwrite_output_dir=False,
        learning_rate=1.0e-3,
        **overrides,
    )
    for key in ("dataset", "do_train", "do_predict", "num_train_epochs", "save_strategy", "logging_steps"):
        recipe.pop(key, None)
    return recipe


def _replay(server: _Server, rows: list[dict], clients: int = 1) -> tuple[list[int], list[float]]:
    import threading

    queue, lock, versions, latencies, failed = list(rows), threading.Lock(), [], [], []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                row = queue.pop(0)
            start = time.perf_counter()
            code, body = server.ask(row)
            with lock:
                if code != 200:
                    failed.append(f"{code} {body}")
                else:
                    latencies.append(time.perf_counter() - start)
                    versions.append(int(body["system_fingerprint"].removeprefix("tlm-v")))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expect(not failed, f"failed requests: {failed[:3]}")
    return versions, latencies


def _serve_case(ctx, name: str, **overrides) -> str:
    """16 prompts (8 known, 8 made up) through a learning server: every answer 200 with a growing version, four
    windows, the made-up prompts selected, swaps under 50 ms; then kill -9 and restart: nothing lost."""
    stream = json.loads((ctx.sets / "stream.json").read_text(encoding="utf-8"))
    out = ctx.work / name
    server = _Server(ctx, serve_recipe(ctx, out, **overrides), name).start()
    try:
        versions, latencies = _replay(server, stream)
        expect(versions == sorted(versions), f"versions went back: {versions}")
        status = server.wait(lambda s: s["windows"] == 4, "4 windows")
        records = read_jsonl(out / "tlm_scores.jsonl")
        expect([r["index"] for r in records] == list(range(16)), "records missing or duplicated")
        made_up = [bool(r["selected"]) for r in records[8:]]
        expect(sum(made_up) >= 6 and not any(r["selected"] for r in records[:8]), f"selection {made_up}")
        swap = status["swap_ms"]
        expect(swap["count"] >= 1 and swap["max"] < 50, f"swaps {swap}")
        server.stop(kill=True)
        server.start()
        again = server.status()
        expect(again["received"] == 16 and again["windows"] == 4, f"after kill -9: {again}")
        expect(again["current_version"] == status["current_version"], "another version is current after the restart")
    finally:
        server.stop()
    p50 = sorted(latencies)[len(latencies) // 2]
    return (
        f"16 answers, versions {versions[0]}..{versions[-1]}, {status['selected']} selected, swap max "
        f"{swap['max']:.1f} ms, p50 {p50:.2f} s; kill -9 + restart: nothing lost"
    )


def case_serve_hf(ctx) -> str:
    return _serve_case(ctx, "serve_hf", infer_backend="huggingface")


def case_serve_vllm(ctx) -> str:
    """The same with the vLLM engine (each version a new LoRARequest), then answer latency with learning on and off
    for 4 concurrent clients (reported, the target is p50 ratio <= 1.15)."""
    import importlib.util

    if CPU["on"] or importlib.util.find_spec("vllm") is None:
        raise CheckSkipped("vLLM is not installed on this node (no bundle can carry it)")
    vllm = dict(infer_backend="vllm", vllm_enforce_eager=True, vllm_gpu_util=0.3, vllm_maxlen=2048)
    detail = _serve_case(ctx, "serve_vllm", **vllm)
    demo = json.loads((ctx.data / "tlm_demo.json").read_text(encoding="utf-8"))[:32]
    p50 = {}
    for learn in (False, True):
        name = f"serve_vllm_latency_{'on' if learn else 'off'}"
        server = _Server(ctx, serve_recipe(ctx, ctx.work / name, tlm_learn=learn, **vllm), name).start()
        try:
            _, latencies = _replay(server, demo, clients=4)
        finally:
            server.stop()
        p50[learn] = sorted(latencies)[len(latencies) // 2]
    return (
        f"{detail}; K=4 p50 {p50[False]:.3f} s static, {p50[True]:.3f} s learning (ratio {p50[True] / p50[False]:.2f})"
    )


CASES = [
    case_bf16_offline,
    case_fp16_online,
    case_deepspeed_zero2,
    case_deepspeed_zero3,
    case_fsdp2,
    case_per_prompt_sift,
    case_per_prompt_pool_store,
    case_per_prompt_ttsi,
    case_per_prompt_ttd_endpoint,
    case_per_prompt_fewshot,
    case_per_prompt_arc_augmented,
    case_resume_after_kill,
    case_serve_hf,
    case_serve_vllm,
]


class Context:
    def __init__(self, work: Path, tokenizer: Path, data: Path, repo_files: Path) -> None:
        import threading

        self.work, self.tokenizer, self.data, self.repo_files = work, tokenizer, data, repo_files
        self.model, self.big_model = work / "models" / "tiny", work / "models" / "llama-1b-random"
        self.log_p0 = None
        self.reference: dict | None = None
        self.reference_ready = threading.Event()


def run_case(case, ctx) -> tuple[str, str, float, str]:
    name = case.__name__.removeprefix("case_")
    start = time.perf_counter()
    try:
        detail, verdict = case(ctx), "PASS"
    except CheckFailed as err:
        detail, verdict = str(err), "FAIL"
    except CheckSkipped as err:
        detail, verdict = str(err), "SKIP"
    except Exception as err:  # a crash of the check itself is a failure of that case, not of the report
        detail, verdict = f"{type(err).__name__}: {err}", "FAIL"
    finally:
        if name == "bf16_offline":
            ctx.reference_ready.set()
    return verdict, name, time.perf_counter() - start, detail


def run_bench(ctx, bench_script: Path) -> int:
    print("\nbench_tlm.py --gpu on a random ~1B Llama (stage tlm vs plain LoRA, bf16; target <= 1.10x):", flush=True)
    cmd = [
        sys.executable,
        str(bench_script),
        "--gpu",
        "--strict",
        "--model",
        str(ctx.big_model),
        "--data",
        str(ctx.data),
        "--n",
        str(DEMO_ROWS),
        "--cli",
        " ".join(CLI),
        "--out",
        str(ctx.work / "bench"),
    ]
    return subprocess.run(cmd, env=env_for(), check=False, cwd=ctx.work).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path, metavar="DIR", help="write the bundle to DIR (needs PyPI)")
    parser.add_argument(
        "--python-version",
        default=f"{sys.version_info.major}.{sys.version_info.minor}",
        help="--prepare: the GPU node's Python (default: this one's)",
    )
    parser.add_argument(
        "--platform",
        action="append",
        default=None,
        help="--prepare: wheel platform tags (default: manylinux 2.17 to 2.28, x86_64)",
    )
    parser.add_argument("--bundle", type=Path, metavar="DIR", help="install from the bundle in DIR and run the check")
    parser.add_argument("--target", type=Path, default=None, help="--bundle: install folder (default: WORK/site)")
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    parser.add_argument("--only", default=None, help="comma-separated case names to run")
    parser.add_argument("--no-bench", action="store_true", help="skip the timing")
    parser.add_argument(
        "--cpu", action="store_true", help="fp32 on the CPU (no FSDP, fp16 or bench): checks the script"
    )
    parser.add_argument("--jobs", type=int, default=None, help="cases run at once (default 4 on a GPU, 1 on the CPU)")
    args = parser.parse_args(argv)
    if args.prepare:
        platforms = args.platform or [f"manylinux_2_{n}_x86_64" for n in (28, 27, 24, 17)] + ["manylinux2014_x86_64"]
        return prepare(args.prepare.resolve(), args.python_version, platforms)
    CPU["on"] = args.cpu
    LANES["jobs"] = args.jobs or (1 if args.cpu else 4)
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="tlm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.bundle:
        bundle = args.bundle.resolve()
        unpacked = work / "bundle"
        Env.target = (args.target or work / "site").resolve()
        print(f"installing from {bundle} into {Env.target} (no network needed) ...", flush=True)
        for line in install(bundle, Env.target, unpacked):
            print(f"  {line}", flush=True)
        sys.path[:0] = [str(Env.target)]
        tokenizer, data = unpacked / "tokenizer", unpacked / "data"
        bench_script, repo_files = unpacked / "bench_tlm.py", unpacked
        _recipes_into(unpacked)
        print(f"installed in {time.perf_counter() - started:.0f} s", flush=True)
    else:  # from a checkout whose environment has everything (developers' machines with a GPU and PyPI)
        model_dir = (
            subprocess.run(
                [sys.executable, "-m", "tlm_plugin.assets", "model"],
                env=env_for(),
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        tokenizer = Path(model_dir)
        data = Path(
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tlm_plugin.assets",
                    "data",
                    "--out",
                    str(work / "demo"),
                    "--n",
                    str(DEMO_ROWS),
                ],
                env=env_for(),
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        bench_script, repo_files = HERE / "bench_tlm.py", REPO / "recipes"

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("FAIL  setup: no CUDA device visible to torch", flush=True)
        return 1
    versions = {name: node_version(name) for name in ("torch", "transformers", "accelerate", "peft", "deepspeed")}
    device = "CPU (script check)" if args.cpu else torch.cuda.get_device_name(0)
    import importlib

    importlib.invalidate_caches()
    print(f"device: {device}; " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    ctx = Context(work, tokenizer, data, repo_files)
    start = time.perf_counter()
    try:
        build_models(ctx)
    except CheckFailed as err:
        print(f"FAIL  setup: {err}", flush=True)
        return 1
    write_data(ctx)
    print(
        f"models built in {time.perf_counter() - start:.0f} s: taught prompts' log-ppl <= {ctx.separation[0]:.2f}, "
        f"made-up >= {ctx.separation[1]:.2f}, P0 = {ctx.log_p0}",
        flush=True,
    )

    wanted = set(args.only.split(",")) if args.only else None
    cases = [c for c in CASES if (wanted is None or c.__name__.removeprefix("case_") in wanted)]
    if args.cpu:
        cases = [c for c in cases if c is not case_fsdp2]
    if not any(c is case_bf16_offline for c in cases):
        ctx.reference_ready.set()
    failures = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=LANES["jobs"]) as pool:
        for verdict, name, seconds, detail in pool.map(lambda c: run_case(c, ctx), cases):
            failures += verdict == "FAIL"
            print(f"{verdict}  {name:<26} {seconds:7.1f} s  {detail}", flush=True)
    if not args.no_bench and not wanted and not args.cpu:
        failures += run_bench(ctx, bench_script) != 0
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n{'all cases passed' if failures == 0 else f'{failures} failed'} in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return 1 if failures else 0


def _recipes_into(unpacked: Path) -> None:
    """The bundle's own copies of the DeepSpeed configs (written by --prepare from recipes/deepspeed)."""
    folder = unpacked / "deepspeed"
    if not folder.is_dir():
        raise SystemExit(f"FAIL  setup: {folder} is missing from the bundle")


if __name__ == "__main__":
    sys.exit(main())
