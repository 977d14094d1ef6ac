"""adapteval ttft: the test/pool split of a data file, the cells it plans, resuming, and its report."""

import json
import statistics
from pathlib import Path

import pytest
import yaml

from adapteval import ttft


def _rows(n: int = 40) -> list[dict]:
    rows = [{"instruction": f"question {i}?", "input": "", "output": f"answer {i}"} for i in range(n)]
    # the same questions again with other answers (wealth-alpaca holds several answers to one question)
    rows += [{"instruction": f"question {i}?", "input": "", "output": f"another answer {i}"} for i in range(0, n, 4)]
    rows.append({"instruction": "question 3?  ", "input": None, "output": "spaced"})  # same prompt, other spacing
    return rows


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_pool_never_holds_a_test_row_or_another_answer_to_its_prompt(seed):
    rows = _rows()
    test, pool = ttft.split_rows(rows, 12, seed)
    assert len(test) == 12 == len(set(test)) and test == sorted(test)
    assert not set(test) & set(pool)
    asked = {" ".join(rows[i]["instruction"].split()) for i in test}
    expected_pool = [i for i in range(len(rows)) if i not in test and rows[i]["instruction"].strip() not in asked]
    assert pool == expected_pool
    assert ttft.split_rows(rows, 12, seed) == (test, pool)  # the seed fixes the split


def test_prepare_file_writes_the_split_llamafactory_reads(tmp_path):
    source = tmp_path / "qa.json"
    rows = _rows()
    source.write_text(json.dumps(rows))
    name, data = ttft.prepare_file(source, tmp_path / "out", 10, 0)
    split = json.loads((data / "rows.json").read_text())
    test_rows = json.loads((data / "test.json").read_text())
    pool_rows = json.loads((data / "pool.json").read_text())
    assert name == "qa" and [r["output"] for r in test_rows] == [rows[i]["output"] for i in split["test"]]
    assert [r["output"] for r in pool_rows] == [rows[i]["output"] for i in split["pool"]]
    assert split["excluded_same_prompt"] == len(rows) - 10 - len(pool_rows) > 0
    test_prompts = {r["instruction"].strip() for r in test_rows}
    assert not any(r["instruction"].strip() in test_prompts for r in pool_rows)
    assert json.loads((data / "dataset_info.json").read_text()) == {
        "qa_test": {"file_name": "test.json"},
        "qa_pool": {"file_name": "pool.json"},
    }


def test_bad_files_and_sizes_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ValueError, match="bad.json: expected a JSON list of alpaca rows"):
        ttft.prepare_file(bad, tmp_path, 1, 0)
    with pytest.raises(ValueError, match="--test-rows must be between 1 and 40"):
        ttft.split_rows(_rows()[:41], 41, 0)


class FakeTrain:
    """Writes what a stage-tlm run with tlm_eval_answers leaves behind; answer bits per byte from the method."""

    BPB = {"base": 1.0, "sift": 0.8, "nearest": 0.85, "random": 0.9, "tlm": 0.95}

    def __init__(self):
        self.recipes = []

    def __call__(self, recipe_path: Path, log_path: Path, env) -> int:
        recipe = yaml.safe_load(recipe_path.read_text())
        method = recipe_path.parent.name
        self.recipes.append((method, recipe))
        out = Path(recipe["output_dir"])
        out.mkdir(parents=True)
        n = len(json.loads((Path(recipe["dataset_dir"]) / "test.json").read_text()))
        lines = [
            {
                "index": i,
                "answer_bpb": self.BPB[method] + 0.01 * i,
                "answer_bpb_base": 1.0 + 0.01 * i,
                "answer_content_bpb": 0.5,
                "answer_content_bpb_base": 0.5,
            }
            for i in range(n)
        ]
        (out / "tlm_scores.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (out / "tlm_summary.json").write_text(json.dumps({"optimizer_steps": 0 if method == "base" else n}))
        log_path.write_text("ok\n")
        return 0


def test_cells_are_planned_run_once_resumed_and_reported(tmp_path, monkeypatch):
    source = tmp_path / "qa.json"
    source.write_text(json.dumps(_rows()))
    fake = FakeTrain()
    kwargs = dict(model="m", template="chatml", test_rows=6, budget=3, encoder="enc", launcher=fake)
    records = ttft.run(tmp_path / "out", [source], "base,sift,nearest,random,tlm", **kwargs)
    assert [r["method"] for r in records] == ["base", "sift", "nearest", "random", "tlm"]
    by = dict(fake.recipes)
    for method in ("sift", "nearest", "random"):
        r = by[method]
        assert (r["tlm_mode"], r["tlm_sift_budget"], r["tlm_pool_dataset"]) == ("per_prompt", 3, "qa_pool")
        assert (r["tlm_prompt_epochs"], r["lr_scheduler_type"], r["per_device_train_batch_size"]) == (1, "constant", 1)
        assert r["dataset"] == "qa_test" and r["tlm_eval_answers"] is True
        assert r["tlm_selector"] == method
    assert by["base"]["do_train"] is False
    assert (by["tlm"]["tlm_mode"], by["tlm"]["tlm_selector"], by["tlm"]["tlm_log_p0"]) == (
        "offline",
        "perplexity",
        3.0,
    )

    # a rerun reuses every finished cell; a cell without cell.json (interrupted) runs again
    (tmp_path / "out" / "cells" / "qa" / "random" / "cell.json").unlink()
    fake.recipes.clear()
    again = ttft.run(tmp_path / "out", [source], "base,sift,nearest,random,tlm", **kwargs)
    assert len(fake.recipes) == 1 and [r["answer_bpb"] for r in again] == [r["answer_bpb"] for r in records]
    with pytest.raises(ValueError, match="another configuration"):
        ttft.run(tmp_path / "out", [source], "sift", **{**kwargs, "budget": 5})

    # the report: means, paired changes vs base and vs nearest, computed here from the per-row values
    results = ttft.report(again)
    rows = {r["method"]: r for r in results["rows"]}
    base_rows = [1.0 + 0.01 * i for i in range(6)]
    assert rows["sift"]["bpb"] == pytest.approx(statistics.mean(0.8 + 0.01 * i for i in range(6)))
    assert rows["sift"]["vs_base"]["diff"] == pytest.approx(-0.2)
    assert rows["sift"]["relative_change"] == pytest.approx(-0.2 / statistics.mean(base_rows))
    assert rows["random"]["vs_nearest"]["diff"] == pytest.approx(0.05)
    assert "vs_nearest" not in rows["tlm"] and "vs_base" not in rows["base"]
    markdown = ttft.markdown(results)
    assert "| qa | sift | 6 | 0.8250 |" in markdown and "-0.2000 [-0.2000, -0.2000]*" in markdown


def test_the_report_shows_the_sign_of_a_small_change():
    row = {"name": "qa", "method": "sift", "n": 6, "bpb": 0.99996, "content_bpb": None, "optimizer_steps": 18}
    row |= {
        "run_s": 3.0,
        "relative_change": -0.00004,
        "vs_base": {"diff": -0.00004, "ci_low": -0.00006, "ci_high": 0.0},
    }
    markdown = ttft.markdown({"rows": [row]})
    # before: "| -0.0000 [-0.0001, +0.0000] | -0.00% |": a change and an interval that look like 0
    assert "| qa | sift | 6 | 1.0000 | - | -0.00004 [-0.00006, +0.00000] | -0.004% | - | 18 | 3 |" in markdown
