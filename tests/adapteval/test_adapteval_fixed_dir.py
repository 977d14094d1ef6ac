"""Builds that read the released AdaptEval files (Medicine, Finance, GSM8K) from ../shared/data/adapteval."""

import json

import pytest

from adapteval import build, score_predictions
from adapteval.datasets._prompts import COT_TEMPLATE
from adapteval.extract import last_number


def _rows(out, name):
    return json.loads((out / f"{name}.json").read_text(encoding="utf-8"))


def test_offline_benches_include_the_released_files(fixed_dir, tmp_path):
    manifest = build("domain,reasoning", tmp_path, n=5000, offline=True, fixed_dir=fixed_dir)
    records = manifest["datasets"]
    for name, file_name in [
        ("medicine", "GenMedGPT_random_5k.json"),
        ("finance", "wealth-alpaca_lora_random_5k.json"),
        ("gsm8k", "gsm8k_random_5k.json"),
    ]:
        record = records[name]
        assert record["source_kind"] == "fixed" and record["rows"] == 5000
        assert record["selection"] == "all rows, in file order"
        released = json.loads((fixed_dir / file_name).read_text(encoding="utf-8"))
        rows = _rows(tmp_path, name)
        assert [(r["instruction"], r["input"], r["output"]) for r in rows] == [
            (r["instruction"], r["input"], r["output"]) for r in released
        ]
        assert rows[7]["source_file"] == file_name and rows[7]["source_row"] == 7
    assert {"medicine_evals", "gsm_symbolic", "logiqa_evals"} <= set(records)


def test_a_smaller_n_samples_the_released_file_in_order(fixed_dir, tmp_path):
    manifest = build("medicine", tmp_path, n=50, seed=5, offline=True, fixed_dir=fixed_dir)
    rows = _rows(tmp_path, "medicine")
    indices = [row["source_row"] for row in rows]
    assert len(rows) == 50 and indices == sorted(indices) and len(set(indices)) == 50
    assert manifest["datasets"]["medicine"]["seed"] == 5
    again = build("medicine", tmp_path / "again", n=50, seed=5, offline=True, fixed_dir=fixed_dir)
    assert again["datasets"]["medicine"]["sha256"] == manifest["datasets"]["medicine"]["sha256"]


def test_our_gsm8k_prompt_is_the_released_one(fixed_dir):
    released = json.loads((fixed_dir / "gsm8k_random_5k.json").read_text(encoding="utf-8"))
    prefix, suffix = COT_TEMPLATE.split("{question}")
    assert all(row["instruction"].startswith(prefix) and row["instruction"].endswith(suffix) for row in released)


def test_released_gsm8k_labels_with_separators_can_match(fixed_dir):
    released = json.loads((fixed_dir / "gsm8k_random_5k.json").read_text(encoding="utf-8"))
    references = [row["output"] for row in released]
    with_separator = [reference for reference in references if "," in reference]
    assert len(with_separator) == 52  # the rows the reference scorer could never match
    predictions = [f"... so the answer is {last_number(reference)}." for reference in references]
    assert score_predictions("gsm8k", predictions, references)["score"] == pytest.approx(1.0)
    assert score_predictions("gsm8k", references, references)["score"] == pytest.approx(1.0)
