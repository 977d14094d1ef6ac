"""The dataset registry: every builder's metadata, bench membership, name resolution and its errors."""

import pytest

from adapteval.datasets._base import PAPER_BENCHES as BENCHES
from adapteval.errors import DataUnavailableError, UnknownNameError
from adapteval.registry import DATASETS, bench_datasets, resolve, specs


PAPER = {
    "domain": ["geography", "agriculture", "medicine", "finance"],
    "instruction": ["dolly", "alpaca_gpt4", "instruction_wild"],
    "reasoning": ["gsm8k", "metamath", "logiqa"],
}
OFFLINE = {
    "domain": ["medicine_evals", "finance_evals", "geography_evals"],
    "instruction": ["chatterbot"],
    "reasoning": ["gsm_symbolic", "logiqa_evals"],
}
FEWSHOT = ["logiqa_fewshot", "gsm_fewshot"]
ARC = ["arc", "arc_train"]
HEADLINE = {"reasoning": "em", "fewshot": "em", "arc": "pass@2", "arc-dev": "pass@2", "arc-sft": "pass@2"}


def test_every_builder_has_a_version_and_a_consistent_spec():
    for name, module in DATASETS.items():
        assert isinstance(module.VERSION, str) and module.VERSION, name
        assert module.SPEC.name == name
        assert callable(module.load_parts) and callable(module.format_row)
        assert module.SPEC.metric == HEADLINE.get(module.SPEC.bench, "rougeLsum")
        assert module.SPEC.shots == (module.SPEC.bench == "fewshot")
        assert module.SPEC.needs_hub == (module.SPEC.fixed_file is not None)


def test_the_ten_paper_datasets_and_their_benches():
    for bench in BENCHES:
        assert bench_datasets(bench) == PAPER[bench]
        assert bench_datasets(bench, offline=True) == OFFLINE[bench]
    assert sum(spec.needs_hub for spec in specs()) == 10
    assert bench_datasets("fewshot", offline=True) == FEWSHOT  # our addition: never part of "all"
    assert resolve("fewshot", offline=True) == FEWSHOT and not set(FEWSHOT) & set(resolve("all", offline=True))


def test_benches_without_paper_datasets_are_their_offline_packs_with_or_without_offline():
    for bench, members in (
        ("fewshot", FEWSHOT),
        ("arc", ["arc"]),
        ("arc-dev", ["arc_train"]),
        ("arc-sft", ["arc_sft"]),
    ):
        assert bench_datasets(bench) == bench_datasets(bench, offline=True) == members
    assert resolve("arc,arc-dev,arc-sft", offline=True) == [*ARC, "arc_sft"]
    everything = set(resolve("all")) | set(resolve("all", offline=True))
    assert not everything & {*ARC, "arc_sft"}  # never part of "all"


def test_resolve_mixes_benches_and_datasets_without_repeats():
    assert resolve("reasoning,gsm8k, dolly") == ["gsm8k", "metamath", "logiqa", "dolly"]
    assert resolve(["ALL"]) == [name for bench in BENCHES for name in PAPER[bench]]
    assert resolve("all", offline=True) == [name for bench in BENCHES for name in OFFLINE[bench]]
    assert resolve("chatterbot") == ["chatterbot"]  # offline packs never need the hub


def test_offline_benches_add_the_released_files_found(tmp_path):
    (tmp_path / "gsm8k_random_5k.json").write_text("[]")
    assert resolve("reasoning", offline=True, fixed_dir=tmp_path) == ["gsm8k", "gsm_symbolic", "logiqa_evals"]
    assert resolve("gsm8k", offline=True, fixed_dir=tmp_path) == ["gsm8k"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as error:
        resolve("domain,reasonin")
    message = str(error.value)
    assert "'reasonin'" in message
    assert "valid benches: domain, instruction, reasoning, fewshot, arc, arc-dev, arc-sft, all" in message
    assert "gsm8k" in message and "chatterbot" in message
    with pytest.raises(UnknownNameError, match="no dataset or bench named"):
        resolve(" , ")


def test_offline_paper_dataset_without_its_file_says_what_to_do(tmp_path):
    with pytest.raises(
        DataUnavailableError, match=r"dolly needs the Hugging Face Hub.*dolly_random_5k\.json.*--fixed-dir"
    ):
        resolve("dolly", offline=True, fixed_dir=tmp_path)
