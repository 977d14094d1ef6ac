"""``adapteval run`` / ``report``: cells, cache, scoring checks and tables.

The slow tests run the real thing once (tiny random Llama, two ``llamafactory-cli`` runs); the others replace the
launcher by a fake that writes ``generated_predictions.jsonl`` itself, so they cost no subprocess.
"""

import json
import re
from pathlib import Path

import pytest
import yaml
from adapteval_testing import DATASET, SUBPROCESS_ENV, FakeLauncher, fake_run, write_tiny_recipe

from adapteval import builder, cli, launch, plan, runner
from adapteval.errors import CacheConflictError, DataUnavailableError, RunnerError, UnknownNameError
from adapteval.methods import METHODS, Method, register_method
from adapteval.methods import trains as recipe_trains
from adapteval.tables import build_results, format_score, results_markdown


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adapteval-data")
    builder.build(DATASET, path, n=6, seed=0, offline=True)
    return path


def run_args(out: Path, data: Path, recipe: Path, *extra: str) -> list[str]:
    return ["run", "--template", "chatml", "--bench", DATASET, "--methods", "base,tlm", "--limit", "4"] + [
        "--out",
        str(out),
        "--data",
        str(data),
        "--recipe",
        str(recipe),
        *extra,
    ]


def fail_if_launched(*args, **kwargs):
    raise AssertionError("a cached cell was launched again")


# ----------------------------------------------------------------------------------------------------------------
# The real run (two llamafactory-cli subprocesses, shared by the slow tests)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_model, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapteval-run")
    recipe = write_tiny_recipe(tiny_model, root / "tiny.yaml")
    args = run_args(root / "results", data_dir, recipe)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in SUBPROCESS_ENV.items():
            patch.setenv(key, value)
        code = cli.main(args)
    log = root / "results" / "cells" / DATASET / "tlm" / "run.log"
    assert code == 0, log.read_text()[-3000:] if log.exists() else "no log"
    return root / "results", args


@pytest.mark.slow
def test_run_writes_cells_and_paper_layout_tables(finished_run, data_dir):
    out, _ = finished_run
    for method, trains in (("base", False), ("tlm", True)):
        cell_dir = out / "cells" / DATASET / method
        recipe_text = (cell_dir / "recipe.yaml").read_text()
        assert recipe_text.startswith("# llamafactory-cli train ")
        recipe = yaml.safe_load(recipe_text)
        assert recipe["stage"] == "tlm" and recipe["do_train"] is trains and recipe["do_predict"] is True
        assert len(json.loads((cell_dir / "data" / f"{DATASET}.json").read_text())) == 4
        cell = json.loads((cell_dir / "cell.json").read_text())
        assert cell["format"] == plan.CELL_FORMAT
        assert (cell["dataset"], cell["method"], cell["metric"], cell["n"], cell["limit"]) == (
            DATASET,
            method,
            "rougeLsum",
            4,
            4,
        )
        assert 0.0 <= cell["score"] <= 1.0 and len(cell["per_sample"]) == 4
        assert cell["log_ppl_before"] > 0 and cell["log_ppl_after"] > 0
        assert cell["timings"]["run_s"] > 0
    assert len(json.loads((data_dir / f"{DATASET}.json").read_text())) == 6  # the full data is untouched

    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "adapteval-results/1"
    assert results["settings"]["methods"] == ["base", "tlm"] and results["settings"]["datasets"] == [DATASET]
    assert [(c["dataset"], c["method"]) for c in results["cells"]] == [(DATASET, "base"), (DATASET, "tlm")]
    assert (out / "results.csv").read_text().splitlines()[0].startswith("bench,dataset,method,metric,score")
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"

    table = (out / "results.md").read_text().splitlines()
    header = table.index("| Bench | Dataset | Metric | n | base | tlm |")
    assert table[header + 1] == "|---|---|---|---:|---:|---:|"
    assert re.fullmatch(
        r"\| InstructionBench \| chatterbot \| ROUGE-Lsum \| 4 \| \d\.\d{4} \| \d\.\d{4}( \([+-]\d+\.\d%\))? \|",
        table[header + 2],
    ), table[header + 2]


@pytest.mark.slow
def test_rerun_reuses_cells_and_report_rebuilds_identical_tables(finished_run, monkeypatch, capsys):
    out, args = finished_run
    cell_files = sorted(out.glob("cells/*/*/cell.json"))
    stamps = [path.stat().st_mtime_ns for path in cell_files]
    before = {name: (out / f"results.{name}").read_text() for name in ("json", "csv", "md")}

    monkeypatch.setattr(launch, "launch_llamafactory", fail_if_launched)
    capsys.readouterr()
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count(" cached") == 2
    assert [path.stat().st_mtime_ns for path in cell_files] == stamps

    for name in before:
        (out / f"results.{name}").unlink()
    (out / "results.png").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert {name: (out / f"results.{name}").read_text() for name in before} == before
    assert (out / "results.png").is_file()


@pytest.mark.slow
def test_a_changed_configuration_is_refused(finished_run, monkeypatch, capsys):
    out, args = finished_run
    monkeypatch.setattr(launch, "launch_llamafactory", fail_if_launched)
    assert cli.main([*args, "--set", "learning_rate=0.5"]) == cli.EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert "different configuration" in error and "fresh --out" in error and "--force" in error


# ----------------------------------------------------------------------------------------------------------------
# A fake launcher: no subprocess, predictions written from the cell's own data
# ----------------------------------------------------------------------------------------------------------------


def test_a_missing_prediction_row_is_a_clear_error(tmp_path, data_dir):
    launcher = FakeLauncher(answer=lambda index, reference: None if index == 2 else reference)
    with pytest.raises(RunnerError, match=r"cell chatterbot/base: .* has 3 predictions for 4 input rows"):
        fake_run(tmp_path, data_dir, launcher)
    assert not (tmp_path / "out" / "cells" / DATASET / "base" / "cell.json").exists()


def test_an_empty_prediction_is_scored_zero_and_recorded(tmp_path, data_dir):
    launcher = FakeLauncher(answer=lambda index, reference: "" if index == 1 else reference)
    cells = fake_run(tmp_path, data_dir, launcher, methods="base")
    assert cells[0]["n_empty"] == 1 and cells[0]["empty_rows"] == [1]
    assert cells[0]["per_sample"] == [1.0, 0.0, 1.0, 1.0]
    assert cells[0]["score"] == pytest.approx(0.75)
    assert cells[0]["log_ppl_before"] is None  # no tlm_summary.json from the fake run
    assert "Empty predictions (scored 0): chatterbot/base: 1." in results_markdown(build_results(cells))


def test_a_failed_run_raises_with_its_log_tail(tmp_path, data_dir):
    with pytest.raises(RunnerError, match=r"(?s)chatterbot/base: llamafactory-cli exited with status 1.*boom"):
        fake_run(tmp_path, data_dir, FakeLauncher(fail_on=1))


def test_an_interrupted_run_resumes_with_the_unfinished_cells(tmp_path, data_dir):
    with pytest.raises(RunnerError):
        fake_run(tmp_path, data_dir, FakeLauncher(fail_on=2))
    assert (tmp_path / "out" / "cells" / DATASET / "base" / "cell.json").is_file()
    assert not (tmp_path / "out" / "cells" / DATASET / "tlm" / "cell.json").exists()
    launcher = FakeLauncher()
    cells = fake_run(tmp_path, data_dir, launcher)
    assert [recipe["do_train"] for recipe in launcher.recipes] == [True]  # only the tlm cell ran
    assert [cell["method"] for cell in cells] == ["base", "tlm"]


def test_force_reruns_cells_of_another_configuration(tmp_path, data_dir):
    fake_run(tmp_path, data_dir, FakeLauncher())
    with pytest.raises(CacheConflictError, match="different configuration"):
        fake_run(tmp_path, data_dir, FakeLauncher(), limit=3)
    launcher = FakeLauncher()
    cells = fake_run(tmp_path, data_dir, launcher, limit=3, force=True)
    assert len(launcher.recipes) == 2 and [cell["n"] for cell in cells] == [3, 3]


def test_recipe_layers_method_overrides_and_scoped_sets(tmp_path, data_dir):
    launcher = FakeLauncher()
    fake_run(
        tmp_path,
        data_dir,
        launcher,
        methods="base,tlm,tlm-online",
        overrides=["learning_rate=5e-5", "tlm-online:tlm_chunk_size=2"],
    )
    base, tlm, online = launcher.recipes
    assert base["do_train"] is False and "tlm_mode" not in base
    assert (tlm["tlm_mode"], tlm["lr_scheduler_type"], tlm["tlm_log_p0"]) == ("offline", "cosine", 3.0)
    assert (online["tlm_mode"], online["lr_scheduler_type"], online["tlm_chunk_size"]) == ("online", "constant", 2)
    assert "tlm_chunk_size" not in tlm
    assert {recipe["learning_rate"] for recipe in launcher.recipes} == {5e-5}
    assert {recipe["dataset"] for recipe in launcher.recipes} == {DATASET}


def test_without_a_recipe_the_paper_settings_are_used(tmp_path, data_dir):
    launcher = FakeLauncher()
    fake_run(tmp_path, data_dir, launcher, methods="tlm", recipe=None, model="some/model")
    recipe = launcher.recipes[0]
    assert (recipe["lora_rank"], recipe["lora_alpha"], recipe["lora_target"]) == (8, 16, "q_proj,v_proj")
    assert recipe["learning_rate"] == 5e-5  # InstructionBench
    assert (recipe["max_new_tokens"], recipe["do_sample"], recipe["cutoff_len"]) == (512, False, 4096)


def test_every_bench_plans_its_cells_with_and_without_a_recipe(tmp_path):
    data = tmp_path / "data"
    builder.build("logiqa_fewshot,gsm_symbolic", data, n=4, seed=0, offline=True, shots=2)
    for recipe in (None, write_tiny_recipe(Path("tiny"), tmp_path / "tiny.yaml")):
        launcher = FakeLauncher()
        out = tmp_path / ("paper" if recipe is None else "tiny")
        runner.run(
            out,
            "logiqa_fewshot,gsm_symbolic",
            "icl,fewshot-ttt",
            data_dir=data,
            launcher=launcher,
            recipe=recipe,
            model="tiny",
            template="chatml",
            limit=2,
        )
        rates = {(r["dataset"], r.get("tlm_selector")): r["learning_rate"] for r in launcher.recipes}
        tiny_rate = yaml.safe_load((tmp_path / "tiny.yaml").read_text())["learning_rate"]
        assert rates[("logiqa_fewshot", None)] == (1e-4 if recipe is None else tiny_rate)  # icl: the bench's rate
        assert rates[("logiqa_fewshot", "demos")] == 1e-4  # fewshot-ttt: the paper's, always
        assert rates[("gsm_symbolic", None)] == (1e-6 if recipe is None else tiny_rate)


def test_a_registered_method_plugs_in_with_overrides_only(tmp_path, data_dir):
    register_method(Method("tlm-all", "TLM on every prompt, weight 1", {"stage": "tlm", "tlm_selector": "all"}))
    try:
        launcher = FakeLauncher()
        cells = fake_run(tmp_path, data_dir, launcher, methods="base,tlm-all")
        assert launcher.recipes[1]["tlm_selector"] == "all"
        assert "| base | tlm-all |" in results_markdown(build_results(cells))
    finally:
        del METHODS["tlm-all"]


def test_unknown_methods_bad_sets_and_vllm_are_user_errors(tmp_path, data_dir, capsys):
    base = ["run", "--model", "m", "--template", "chatml", "--bench", DATASET, "--out", str(tmp_path)]
    base += ["--data", str(data_dir)]
    assert cli.main([*base, "--methods", "base,tlmm"]) == cli.EXIT_USER_ERROR
    assert "unknown AdaptEval method 'tlmm'" in capsys.readouterr().err
    assert cli.main([*base, "--set", "output_dir=x"]) == cli.EXIT_USER_ERROR
    assert "the runner sets" in capsys.readouterr().err
    assert cli.main([*base, "--backend", "vllm"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "--backend vllm needs the vllm package" in err and "--backend hf" in err
    assert not (tmp_path / "cells").exists()


def test_benches_resolve_against_the_build_folder(data_dir):
    assert plan.prepare_data("instruction", Path("unused"), data_dir, False, None) == (data_dir, [DATASET])
    assert plan.prepare_data("all", Path("unused"), data_dir, False, None)[1] == [DATASET]
    with pytest.raises(UnknownNameError, match="names no dataset built"):
        plan.prepare_data("reasoning", Path("unused"), data_dir, False, None)
    with pytest.raises(DataUnavailableError, match="gsm8k is not in"):
        plan.prepare_data("gsm8k", Path("unused"), data_dir, False, None)


def test_without_data_the_datasets_are_built_once_into_out(tmp_path):
    data, names = plan.prepare_data("instruction", tmp_path, None, True, None)
    assert (data, names) == (tmp_path / "data", [DATASET])
    stamp = (data / f"{DATASET}.json").stat().st_mtime_ns
    plan.prepare_data("instruction", tmp_path, None, True, None)
    assert (data / f"{DATASET}.json").stat().st_mtime_ns == stamp


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------


def synthetic_cell(dataset: str, bench: str, method: str, score: float, metric: str = "rougeLsum") -> dict:
    return {"dataset": dataset, "bench": bench, "method": method, "metric": metric, "score": score, "n": 5000}


def test_methods_that_train_nothing_say_so():
    assert [name for name, method in METHODS.items() if not method.trains] == ["base", "tt-icl", "icl"]
    assert recipe_trains({"do_train": True, "tlm_selector": "generate", "tlm_generate_use": "icl"}) is False
    assert recipe_trains({"do_train": True, "tlm_selector": "generate", "tlm_generate_use": "train"}) is True
    assert recipe_trains({"tlm_generate_use": "icl"}) is True  # the key acts only with tlm_selector: generate
    assert recipe_trains({"stage": "tlm"}) is True  # do_train left to the base recipe: counted as training


def test_relative_change_is_formatted_as_in_the_paper():
    assert format_score(0.3212, 0.2450, is_base=False) == "0.3212 (+31.1%)"
    assert format_score(0.2000, 0.2500, is_base=False) == "0.2000 (-20.0%)"
    assert format_score(0.2450, 0.2450, is_base=True) == "0.2450"
    assert format_score(0.1, 0.0, is_base=False) == "0.1000"  # no relative change from a zero base
    assert format_score(None, 0.2, is_base=False) == "-"


def test_markdown_groups_datasets_by_bench_with_averages():
    cells = [
        synthetic_cell("gsm8k", "reasoning", "base", 0.7610, "em"),
        synthetic_cell("gsm8k", "reasoning", "tlm", 0.8074, "em"),
        synthetic_cell("geography", "domain", "base", 0.2450),
        synthetic_cell("geography", "domain", "tlm", 0.3212),
        synthetic_cell("medicine", "domain", "base", 0.1265),
        synthetic_cell("medicine", "domain", "tlm", 0.2372),
    ]
    table = results_markdown(build_results(cells)).splitlines()
    start = table.index("| Bench | Dataset | Metric | n | base | tlm |")
    assert table[start + 2 :] == [
        "| DomainBench | geography | ROUGE-Lsum | 5000 | 0.2450 | 0.3212 (+31.1%) |",
        "|  | medicine | ROUGE-Lsum | 5000 | 0.1265 | 0.2372 (+87.5%) |",
        "|  | **Avg.** |  | 2 sets | 0.1857 | 0.2792 (+50.3%) |",
        "| ReasoningBench | gsm8k | EM | 5000 | 0.7610 | 0.8074 (+6.1%) |",
    ]


@pytest.mark.slow
def test_fewshot_bench_answers_only_runs_icl_and_fewshot_ttt_end_to_end(tiny_model, tmp_path, monkeypatch):
    data = tmp_path / "data"
    builder.build("logiqa_fewshot", data, n=3, seed=0, offline=True, shots=2)
    recipe = write_tiny_recipe(tiny_model, tmp_path / "tiny.yaml")
    out = tmp_path / "results"
    for key, value in SUBPROCESS_ENV.items():
        monkeypatch.setenv(key, value)
    args = ["run", "--template", "chatml", "--bench", "logiqa_fewshot", "--methods", "icl,fewshot-ttt"]
    args += ["--answers-only", "--limit", "3", "--out", str(out), "--data", str(data), "--recipe", str(recipe)]
    code = cli.main(args)
    cells = {m: out / "cells" / "logiqa_fewshot" / m for m in ("icl", "fewshot-ttt")}
    assert code == 0, (cells["fewshot-ttt"] / "run.log").read_text()[-3000:]
    icl, ttt = (json.loads((cells[m] / "cell.json").read_text()) for m in ("icl", "fewshot-ttt"))
    for cell in (icl, ttt):
        assert cell["metric"] == "answer_bpb" and cell["n"] == 3 and len(cell["per_sample"]) == 3
        assert not (cells[cell["method"]] / "output" / "generated_predictions.jsonl").exists()  # nothing generated
    # icl never trains: its answers are measured under the base model, which is also fewshot-ttt's "before"
    assert icl["answer_bpb_per_row"] == pytest.approx(icl["answer_bpb_base_per_row"])
    assert ttt["answer_bpb_base_per_row"] == pytest.approx(icl["answer_bpb_per_row"], rel=1e-5)
    assert ttt["answer_bpb_per_row"] != pytest.approx(ttt["answer_bpb_base_per_row"], rel=1e-5)  # it learned
    demos = [json.loads(line) for line in (cells["fewshot-ttt"] / "output" / "tlm_demos.jsonl").open()]
    assert [(d["n_demos"], d["cache_hit"]) for d in demos] == [(2, False), (2, True), (2, True)]  # one task
    assert "bits per byte" in (out / "results.md").read_text()
