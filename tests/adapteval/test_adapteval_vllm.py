"""``adapteval run --backend vllm``: offline cells adapt, then answer in a second step on an LLaMA-Factory engine.

vLLM itself needs GPUs, so the engine here is LLaMA-Factory's ``HuggingfaceEngine``: the same ``async chat``
interface as its ``VllmEngine``, built from the same inference arguments. What is tested is everything around the
engine: which cells split, the inference arguments (adapter, stage, no training keys), the prompts (token for token
those of LLaMA-Factory's HF predict path), the order of the answers and the files written.
"""

import asyncio
import json
import random
from pathlib import Path

import pytest
import yaml
from adapteval_testing import DATASET, SUBPROCESS_ENV, FakeLauncher, fake_run, write_tiny_recipe

from adapteval import builder, launch, runner, vllm_predict
from adapteval.errors import CacheConflictError, RunnerError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adapteval-data")
    builder.build(DATASET, path, n=6, seed=0, offline=True)
    return path


@pytest.fixture()
def vllm_installed(monkeypatch):
    monkeypatch.setattr(launch, "vllm_installed", lambda: True)


def hf_engine(args):
    """LLaMA-Factory's HF chat engine for the same inference arguments (what VllmEngine gets, backend swapped)."""
    from llamafactory.chat.hf_engine import HuggingfaceEngine
    from llamafactory.hparams import get_infer_args

    return HuggingfaceEngine(*get_infer_args({**args, "infer_backend": "huggingface"}))


class FakePredictor:
    """Answers every row with its reference (from the cell's data) and records the predict.yaml it was given."""

    def __init__(self):
        self.args = []

    def __call__(self, predict_path: Path, log_path: Path, env) -> int:
        args = yaml.safe_load(predict_path.read_text())
        self.args.append(args)
        data = Path(args["dataset_dir"])
        info = json.loads((data / "dataset_info.json").read_text())[args["dataset"]]
        rows = json.loads((data / info["file_name"]).read_text())
        lines = [json.dumps({"prompt": r["instruction"], "predict": r["output"], "label": r["output"]}) for r in rows]
        Path(args["predictions_file"]).parent.mkdir(parents=True, exist_ok=True)
        Path(args["predictions_file"]).write_text("\n".join(lines) + "\n")
        with log_path.open("a") as log:
            log.write("vllm ok\n")
        return 0


class AdapterWritingLauncher(FakeLauncher):
    def __call__(self, recipe_path, log_path, env):
        code = super().__call__(recipe_path, log_path, env)
        recipe = self.recipes[-1]
        if recipe["do_train"]:
            (Path(recipe["output_dir"]) / "adapter_config.json").write_text("{}")
        if not recipe["do_predict"]:  # a real run with do_predict false writes no predictions
            (Path(recipe["output_dir"]) / "generated_predictions.jsonl").unlink()
        return code


def test_offline_cells_adapt_then_answer_with_vllm_online_cells_keep_hf(tmp_path, data_dir, vllm_installed):
    launcher, predictor = AdapterWritingLauncher(), FakePredictor()
    cells = fake_run(tmp_path, data_dir, launcher, methods="base,tlm,tlm-online", backend="vllm", predictor=predictor)
    assert [c["backend"] for c in cells] == ["vllm", "vllm", "hf"]
    # base trains nothing: no llamafactory-cli run at all; tlm adapts without predicting; online predicts in-run
    assert [(r["tlm_mode"], r["do_train"], r["do_predict"]) for r in launcher.recipes] == [
        ("offline", True, False),
        ("online", True, True),
    ]
    base_args, tlm_args = predictor.args
    out = tmp_path / "out" / "cells" / DATASET
    assert "adapter_name_or_path" not in base_args
    assert tlm_args["adapter_name_or_path"] == str((out / "tlm" / "output").resolve())
    for args in (base_args, tlm_args):
        assert args["infer_backend"] == "vllm" and args["stage"] == "sft"
        assert not [k for k in args if k.startswith("tlm_") or k in ("learning_rate", "output_dir", "do_train")]
        assert args["predictions_file"].endswith("output/generated_predictions.jsonl")
        assert args["template"] == "chatml" and args["max_new_tokens"] == 8
    assert (out / "tlm" / "predict.yaml").read_text().startswith("# python -m adapteval.vllm_predict ")
    assert "vllm ok" in (out / "tlm" / "run.log").read_text()

    # the backend is part of a vLLM cell's identity: the same cells with --backend hf are another configuration
    with pytest.raises(CacheConflictError, match="tlm/cell.json"):
        fake_run(tmp_path, data_dir, AdapterWritingLauncher(), methods="tlm", backend="hf")
    fake_run(tmp_path, data_dir, AdapterWritingLauncher(), methods="tlm-online", backend="hf")  # same cell: cached


def test_a_training_run_without_adapter_is_a_clear_error(tmp_path, data_dir, vllm_installed):
    class NoAdapter(FakeLauncher):
        pass

    with pytest.raises(RunnerError, match="saved no LoRA adapter"):
        fake_run(tmp_path, data_dir, NoAdapter(), methods="tlm", backend="vllm", predictor=FakePredictor())


def test_answers_keep_dataset_order_whatever_order_the_engine_finishes_in(tiny_model, tmp_path):
    from tlm_testing import write_dataset

    rows = [
        {"instruction": f"Question number {i}?", "input": "", "output": f"answer {i}", "system": "Be brief."}
        for i in range(7)
    ]
    data = write_dataset(
        tmp_path / "data",
        rows,
        columns={"prompt": "instruction", "query": "input", "response": "output", "system": "system"},
    )

    class ShuffledEngine:
        def __init__(self, args):
            self.args, self.seen = args, []

        async def chat(self, messages, system=None, tools=None):
            self.seen.append((messages, system))
            await asyncio.sleep(random.random() / 100)
            return [type("R", (), {"response_text": "echo: " + messages[-1]["content"]})()]

    engines = []
    args = {
        "model_name_or_path": str(tiny_model),
        "template": "chatml",
        "dataset": "tiny",
        "dataset_dir": str(data),
        "cutoff_len": 256,
        "max_new_tokens": 8,
        "stage": "sft",
        "infer_backend": "vllm",
        "predictions_file": str(tmp_path / "out" / "generated_predictions.jsonl"),
    }
    path = vllm_predict.predict(args, engine_factory=lambda a: engines.append(ShuffledEngine(a)) or engines[-1])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["predict"] for line in lines] == [f"echo: Question number {i}?" for i in range(7)]
    assert [line["label"] for line in lines] == [f"answer {i}" for i in range(7)]
    assert {system for _, system in engines[0].seen} == {"Be brief."}
    assert "predictions_file" not in engines[0].args and "cutoff_len" not in engines[0].args
    assert engines[0].args["vllm_maxlen"] >= 8 + max(len(line["prompt"]) // 8 for line in lines)
    results = json.loads((path.parent / "predict_results.json").read_text())
    assert results["predict_backend"] == "vllm" and results["predict_samples"] == 7


@pytest.mark.slow
def test_vllm_step_gives_the_hf_path_s_answers(tiny_model, data_dir, tmp_path, monkeypatch, vllm_installed):
    """Real runs: the two-step cells answer exactly as the single-run HF cells (same prompts, same adapter)."""
    for key, value in SUBPROCESS_ENV.items():
        monkeypatch.setenv(key, value)
    recipe = write_tiny_recipe(tiny_model, tmp_path / "tiny.yaml")
    common = {"model": str(tiny_model), "template": "chatml", "limit": 4, "recipe": recipe, "data_dir": data_dir}
    hf = runner.run(tmp_path / "hf", DATASET, "base,tlm", **common)
    requests = []

    def predictor(predict_path, log_path, env):
        args = yaml.safe_load(predict_path.read_text())
        requests.append(vllm_predict.load_requests(args)[0])
        vllm_predict.predict(args, engine_factory=hf_engine)
        return 0

    two_step = runner.run(tmp_path / "vllm", DATASET, "base,tlm", backend="vllm", predictor=predictor, **common)
    for a, b in zip(hf, two_step, strict=True):
        assert (a["backend"], b["backend"]) == ("hf", "vllm")
        hf_lines = tmp_path / "hf" / "cells" / DATASET / a["method"] / "output" / "generated_predictions.jsonl"
        vllm_lines = tmp_path / "vllm" / "cells" / DATASET / b["method"] / "output" / "generated_predictions.jsonl"
        hf_answers = [json.loads(x)["predict"] for x in hf_lines.read_text().splitlines()]
        vllm_answers = [json.loads(x)["predict"] for x in vllm_lines.read_text().splitlines()]
        assert vllm_answers == hf_answers, a["method"]
        assert b["score"] == pytest.approx(a["score"])

    # the prompts are token for token those of LLaMA-Factory's HF predict path (its processed eval dataset)
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    cell_recipe = yaml.safe_load((tmp_path / "hf" / "cells" / DATASET / "base" / "recipe.yaml").read_text())
    cell_recipe = {k: v for k, v in cell_recipe.items() if not k.startswith("tlm_")}
    cell_recipe.update(stage="sft", do_train=False, predict_with_generate=True, eval_dataset=cell_recipe["dataset"])
    model_args, data_args, training_args, _, _ = get_train_args(cell_recipe)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    expected = [list(ids) for ids in module["eval_dataset"]["input_ids"]]
    assert [r["prompt_ids"] for r in requests[0]] == expected
