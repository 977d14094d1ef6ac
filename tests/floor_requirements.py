"""The declared floors of pyproject.toml as exact pins, for ``make test-floor``.

``python tests/floor_requirements.py`` prints one requirement per line: every ``>=`` lower bound of the core
dependencies and of the extras the floor suite uses as ``==``, plus the pins that keep the floor environment installable (torch's companions of the same
release, which LLaMA-Factory imports). ``--check`` compares what is installed with those pins and exits 1 on a
difference (the versions the floor suite actually ran at are printed either way).
"""

import argparse
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path


PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# torch's own companions, at the release of the torch floor (LLaMA-Factory imports torchaudio and torchvision)
COMPANIONS = {"2.6.0": {"torchaudio": "2.6.0", "torchvision": "0.21.0"}}


EXTRAS = (
    "demo",
    "dev",
    "adapteval",
)  # the extras the floor suite installs (demo model conversion, pytest, deepspeed, sacrebleu)


def floors() -> dict[str, str]:
    """{distribution: floor version} for every dependency (core and :data:`EXTRAS`) with a ``>=`` bound."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    pins: dict[str, str] = {}
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower()
        floor = re.search(r">=\s*([0-9][A-Za-z0-9.]*)", requirement)
        if floor:  # "2.4" -> "2.4.0": the release pip installs for ==2.4, as the installed version reads
            parts = floor.group(1).split(".")
            pins[name] = ".".join(parts + ["0"] * (3 - len(parts)))
    for name, version in COMPANIONS.get(pins.get("torch", ""), {}).items():
        pins.setdefault(name, version)
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the installed versions with the floors")
    args = parser.parse_args()
    pins = floors()
    if not args.check:
        print("\n".join(f"{name}=={version}" for name, version in pins.items()))
        return 0
    wrong = 0
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        same = installed.split("+")[0] == version
        wrong += not same
        print(f"{'ok  ' if same else 'DIFF'} {name:<16} floor {version:<10} installed {installed}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
