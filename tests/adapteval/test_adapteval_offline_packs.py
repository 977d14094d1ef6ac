"""Offline packs: every bench built from data that PyPI packages ship, no hub access, files LLaMA-Factory reads."""

import json
import re
import sys

import pytest

from adapteval import build, score_predictions
from adapteval.builder import ROW_KEYS
from adapteval.datasets import _packages
from adapteval.datasets._prompts import COT_TEMPLATE
from adapteval.errors import MissingPackageError


@pytest.fixture(scope="module")
def offline_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("offline")
    manifest = build("all", out, n=40, seed=0, offline=True)
    return out, manifest


def _rows(out, name):
    return json.loads((out / f"{name}.json").read_text(encoding="utf-8"))


def test_each_bench_has_offline_datasets_with_provenance(offline_build):
    out, manifest = offline_build
    records = manifest["datasets"]
    assert {name: record["bench"] for name, record in records.items()} == {
        "medicine_evals": "domain",
        "finance_evals": "domain",
        "geography_evals": "domain",
        "chatterbot": "instruction",
        "gsm_symbolic": "reasoning",
        "logiqa_evals": "reasoning",
    }
    for name, record in records.items():
        assert record["rows"] == 40, name
        assert record["source_kind"] == "package" and record["seed"] == 0
        assert record["builder_version"] and record["builder"] == f"adapteval.datasets.{name}"
        for row in _rows(out, name):
            assert tuple(row) == ROW_KEYS
            assert row["instruction"].strip() and row["output"].strip()
            assert isinstance(row["source_row"], int) and row["source_version"]
    assert "evals" not in sys.modules  # located through find_spec, never imported


def test_provenance_points_at_the_real_package_rows(offline_build):
    out, _ = offline_build
    row = _rows(out, "medicine_evals")[0]
    assert row["source"] == "evals" and row["source_version"] == "3.0.1.post1"
    path = _packages.package_dir("evals").parent / row["source_file"]
    upstream = json.loads(
        [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][row["source_row"]]
    )
    assert upstream["ideal"] == row["output"]
    assert upstream["input"][-1]["content"].strip() == row["input"]


def test_reasoning_packs_use_the_adapteval_prompts(offline_build):
    out, _ = offline_build
    prefix, suffix = COT_TEMPLATE.split("{question}")
    for row in _rows(out, "gsm_symbolic"):
        assert row["instruction"].startswith(prefix) and row["instruction"].endswith(suffix)
        assert "Give the result as your final answer" not in row["instruction"]
        assert score_predictions("gsm_symbolic", [f"so it is {row['output']}."], [row["output"]])["score"] == 1.0
    for row in _rows(out, "logiqa_evals"):
        assert row["instruction"].startswith("Write a multi-choice question for the following article:\n Article: ")
        assert "\n Options: A. " in row["instruction"] and row["instruction"].endswith("\n\n Answer:")
        assert "A. A." not in row["instruction"]  # the evals file's doubled labels are removed
        assert row["output"] in {"A", "B", "C", "D"}


def test_known_data_defects_are_handled(tmp_path):
    manifest = build("logiqa_evals,chatterbot,geography_evals", tmp_path, n=5000, offline=True)
    records = manifest["datasets"]
    assert records["logiqa_evals"]["rows"] == 677 and records["logiqa_evals"]["skipped_duplicate"] == 677
    assert records["geography_evals"]["skipped_invalid"] == 56  # non-Latin-script answers ROUGE cannot score
    chatter = _rows(tmp_path, "chatterbot")
    assert sum(row["source_file"].endswith("tech_support.yml") for row in chatter) == 10  # of 1,050 listed


@pytest.mark.parametrize(
    ("package", "names", "pip_command"),
    [
        ("evals", "domain", "pip install --no-deps evals==3.0.1.post1"),
        ("reasoning_gym", "gsm_symbolic", "pip install reasoning-gym==0.1.25"),
        ("chatterbot_corpus", "instruction", "pip install chatterbot-corpus==1.3.3"),
    ],
)
def test_missing_package_error_names_the_pip_command(monkeypatch, tmp_path, package, names, pip_command):
    real_find_spec = _packages.importlib.util.find_spec
    monkeypatch.setattr(
        _packages.importlib.util, "find_spec", lambda name: None if name == package else real_find_spec(name)
    )
    with pytest.raises(MissingPackageError, match=re.escape(f"run `{pip_command}`")):
        build(names, tmp_path, n=5, offline=True)
    assert not (tmp_path / "manifest.json").exists()


def test_every_missing_package_is_named_in_one_error(monkeypatch, tmp_path):
    absent = {"evals", "reasoning_gym", "chatterbot_corpus"}
    real_find_spec = _packages.importlib.util.find_spec
    monkeypatch.setattr(
        _packages.importlib.util, "find_spec", lambda name: None if name in absent else real_find_spec(name)
    )
    with pytest.raises(MissingPackageError) as error:
        build("all", tmp_path, n=5, offline=True)
    message = str(error.value)
    assert (
        "pip install reasoning-gym==0.1.25 chatterbot-corpus==1.3.3 && pip install --no-deps evals==3.0.1.post1"
        in (message)
        or "pip install chatterbot-corpus==1.3.3 reasoning-gym==0.1.25 && pip install --no-deps evals==3.0.1.post1"
        in (message)
    )
    for dataset in ("medicine_evals", "gsm_symbolic", "chatterbot", "logiqa_evals"):
        assert dataset in message
    assert not (tmp_path / "manifest.json").exists()


def test_llamafactory_reads_the_build(offline_build):
    import datasets
    from llamafactory.data.converter import AlpacaDatasetConverter
    from llamafactory.data.parser import get_dataset_list

    out, manifest = offline_build
    attrs = get_dataset_list(list(manifest["datasets"]), str(out))
    for attr in attrs:
        assert attr.load_from == "file" and attr.formatting == "alpaca"
        assert (attr.prompt, attr.query, attr.response) == ("instruction", "input", "output")
        # the same json loader LLaMA-Factory uses for a local file, then its alpaca converter
        table = datasets.load_dataset("json", data_files=[str(out / attr.dataset_name)], split="train")
        converted = AlpacaDatasetConverter(dataset_attr=attr, data_args=None)(table[0])
        expected_user = "\n".join(part for part in (table[0]["instruction"], table[0]["input"]) if part)
        assert converted["_prompt"] == [{"role": "user", "content": expected_user}]
        assert converted["_response"] == [{"role": "assistant", "content": table[0]["output"]}]


def test_fewshot_prompts_carry_k_demonstrations_that_are_never_their_own_rows(tmp_path):
    manifest = build("fewshot", tmp_path, n=30, seed=3, offline=True, shots=4)
    for name in ("logiqa_fewshot", "gsm_fewshot"):
        rows = _rows(tmp_path, name)
        record = manifest["datasets"][name]
        assert len(rows) == 30 and record["shots"] == 4
        history = rows[0]["history"]
        assert len(history) == 4 and all(row["history"] == history for row in rows)  # one task per dataset
        # a demonstration is a row of the same source, written as LLaMA-Factory's user turn + answer ...
        assert all(isinstance(x, str) and x and isinstance(y, str) and y for x, y in history)
        # ... and never one of the test rows: neither by source row number nor by text
        assert not set(record["demonstration_rows"]) & {row["source_row"] for row in rows}
        turns = {("\n".join(p for p in (row["instruction"], row["input"]) if p), row["output"]) for row in rows}
        assert not {(x, y) for x, y in history} & turns
    again = build("fewshot", tmp_path / "again", n=30, seed=3, offline=True, shots=4)  # fixed seed: same demos
    assert (
        again["datasets"]["gsm_fewshot"]["demonstration_rows"]
        == manifest["datasets"]["gsm_fewshot"]["demonstration_rows"]
    )
