"""``tlm_objective: tent | eata | come`` run through ``stage: tlm``: records, LoRA updates, batched generation."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tlm_testing import QUESTIONS, base_recipe, read_jsonl

from tlm_plugin.objectives.step import to_left_padding


def test_to_left_padding_moves_ids_and_masks_together():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    left_ids, left_attn, left_loss = to_left_padding(ids, attn, loss, pad_id=0)
    assert left_ids.tolist() == [[0, 5, 6, 7], [0, 0, 8, 9]]
    assert left_attn.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert left_loss.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def run_in_process(recipe: dict) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(recipe)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["tent", "eata", "come"])
def test_objective_updates_the_named_lora_weights_and_records_entropy(tiny_model, tiny_data, tmp_path, objective):
    out = tmp_path / objective
    extra = {"tlm_eata_e0": 1.0} if objective == "eata" else {}  # ln(400)=6.0 nats: all random-model samples pass
    run_in_process(
        base_recipe(
            tiny_model,
            tiny_data,
            out,
            tlm_objective=objective,
            tlm_selector="all",
            tlm_entropy_tokens=6,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            **extra,
        )
    )
    rows = read_jsonl(out / "tlm_scores.jsonl")
    assert [r["index"] for r in rows] == list(range(len(QUESTIONS)))
    assert all(0 < r["entropy"] <= math.log(400) + 1e-4 for r in rows)
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["settings"]["tlm_objective"] == objective
    weights = load_file(str(out / "adapter_model.safetensors"))
    for target in ("q_proj", "v_proj"):  # both modules the recipe names learned, not only one of them
        b = [w for k, w in weights.items() if target in k and "lora_B" in k]
        assert b and all(float(w.abs().sum()) > 0 for w in b), f"{objective} did not update {target}"
    if objective == "eata":
        e0 = 1.0 * math.log(400)
        assert all(r["objective_selected"] == (r["entropy"] < e0) for r in rows)
        for r in rows:
            if r["objective_selected"]:
                assert r["objective_weight"] == pytest.approx(math.exp(e0 - r["entropy"]), rel=1e-3)


@pytest.mark.slow
def test_eata_filters_everything_with_a_tiny_margin(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "eata"
    run_in_process(
        base_recipe(
            tiny_model,
            tiny_data,
            out,
            tlm_objective="eata",
            tlm_selector="all",
            tlm_entropy_tokens=4,
            tlm_eata_e0=0.01,
            tlm_eata_e0_scale="nats",
        )
    )
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["backward_passes"] == 0  # no reliable sample: no backward, no update
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(float(w.abs().sum()) == 0 for k, w in weights.items() if "lora_B" in k)


@pytest.mark.slow
def test_online_tent_streams_and_predicts(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "online"
    run_in_process(
        base_recipe(
            tiny_model,
            tiny_data,
            out,
            tlm_objective="tent",
            tlm_selector="all",
            tlm_mode="online",
            tlm_chunk_size=4,
            tlm_entropy_tokens=4,
            do_predict=True,
        )
    )
    rows = read_jsonl(out / "tlm_scores.jsonl")
    assert all("entropy" in r for r in rows)
    assert len(read_jsonl(out / "generated_predictions.jsonl")) == len(QUESTIONS)


@pytest.mark.slow
def test_eata_fisher_penalty_holds_the_adapter_closer_to_its_start(tiny_model, tiny_data, tmp_path):
    common = dict(
        tlm_objective="eata",
        tlm_selector="all",
        tlm_entropy_tokens=4,
        tlm_eata_e0=1.0,
        learning_rate=5e-2,
        disable_shuffling=True,
    )
    run_in_process(base_recipe(tiny_model, tiny_data, tmp_path / "free", **common))
    run_in_process(
        base_recipe(
            tiny_model, tiny_data, tmp_path / "fisher", tlm_eata_fisher_coeff=1e6, tlm_eata_fisher_samples=4, **common
        )
    )

    def drift(out):
        weights = load_file(str(out / "adapter_model.safetensors"))
        return sum(float(w.abs().sum()) for k, w in weights.items() if "lora_B" in k)  # B starts at zero

    assert 0 < drift(tmp_path / "fisher") < drift(tmp_path / "free")
