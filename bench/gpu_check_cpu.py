# Run: make gpu-check-cpu   (as root, with PyPI access; about 40 minutes on 2 CPU cores)
"""The air-gapped path of bench/gpu_check.py, proven on this CPU.

1. ``gpu_check.py --prepare`` writes the bundle (PyPI needed here); its size is printed and checked (<= 64 MiB).
2. A "node" venv is made that holds only torch, transformers, accelerate and peft (their newest releases, which are
   newer than LLaMA-Factory 0.9.5 supports: the bundle's own copies must then be used).
3. ``gpu_check.py --bundle --cpu`` runs with that venv's python inside a network namespace without any network
   (``unshare -n``, loopback only), installing into a fresh target folder, and must pass every CPU case.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
NODE_VENV = REPO / ".venv-gpucheck-node"
LIMIT = 64 * 2**20


def node_python() -> Path:
    python = NODE_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(NODE_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch"], check=True)
        subprocess.run([*pip, "transformers", "accelerate", "peft"], check=True)
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="keep the bundle and the runs here")
    parser.add_argument("--only", default=None, help="cases to run (default: every CPU case)")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("gpu-check-cpu needs root and unshare (util-linux) for a network namespace", file=sys.stderr)
        return 2
    work = (args.work or Path(tempfile.mkdtemp(prefix="tlm-gpu-check-cpu-"))).resolve()
    bundle = work / "bundle"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--prepare", str(bundle)], check=True)
    size = sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())
    print(
        f"bundle: {size / 2**20:.1f} MiB (limit 64 MiB), prepared in {time.perf_counter() - start:.0f} s", flush=True
    )
    if size > LIMIT:
        return 1
    python = node_python()
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    core = [
        line
        for line in listed.stdout.splitlines()
        if line.split("==")[0].lower()
        in ("torch", "transformers", "accelerate", "peft", "llamafactory", "datasets", "deepspeed")
    ]
    print(f"node venv {NODE_VENV}: {', '.join(core)}", flush=True)
    target = work / "site"
    shutil.rmtree(target, ignore_errors=True)
    check = [
        str(python),
        str(bundle / "gpu_check.py"),
        "--bundle",
        str(bundle),
        "--cpu",
        "--target",
        str(target),
        "--keep",
        str(work / "runs"),
    ]
    if args.only:
        check += ["--only", args.only]
    # No network at all: a new namespace with only a loopback device (torchrun, the stub teacher), brought up first.
    script = "ip link set lo up && exec " + " ".join(f"'{part}'" for part in check)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    code = subprocess.run(["unshare", "-n", "sh", "-c", script], env=env, check=False).returncode
    print(f"gpu_check --bundle --cpu without network: exit {code} after {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
