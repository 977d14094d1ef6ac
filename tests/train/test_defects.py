"""Defects found in a read of the code, each with a test that fails on the old behaviour."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tlm_testing import QUESTIONS, base_recipe, read_jsonl, run_cli, write_dataset


pytestmark = pytest.mark.slow


def run_in_process(recipe: dict) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(recipe)


def test_pool_is_neither_cut_by_max_samples_nor_read_from_tokenized_path(tiny_model, tiny_data, tmp_path):
    """max_samples cuts the test set only; tokenized_path holds the test set, never the pool."""
    pool_rows = [
        {"instruction": f"Background {i}: {q}", "input": "", "output": a} for i, (q, a) in enumerate(QUESTIONS)
    ]
    write_dataset(tiny_data, pool_rows, name="pool")
    out = tmp_path / "out"
    recipe = base_recipe(
        tiny_model,
        tiny_data,
        out,
        tlm_selector="sift",
        tlm_pool_dataset="pool",
        tlm_sift_budget=3,
        max_samples=4,
        tokenized_path=str(tmp_path / "tokenized"),
    )
    run_in_process(recipe)
    cache = torch.load(out / "tlm_embeddings.pt")
    assert cache["prompts"].shape[0] == 4 and cache["pool"].shape[0] == len(pool_rows)
    assert len(read_jsonl(out / "tlm_scores.jsonl")) == 4


def test_pool_rows_are_trained_on_the_user_scope_when_asked(tiny_model, tiny_data, tmp_path, monkeypatch):
    from tlm_plugin.train.trainer import TLMTrainer

    pool_rows = [
        {"instruction": f"Background {i}: {q}", "input": "", "output": a} for i, (q, a) in enumerate(QUESTIONS)
    ]
    write_dataset(tiny_data, pool_rows, name="pool")
    seen = []
    original = TLMTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append((int(inputs["loss_mask"].sum()), int(inputs["attention_mask"].sum())))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(TLMTrainer, "compute_loss", spy)
    recipe = base_recipe(
        tiny_model,
        tiny_data,
        tmp_path / "out",
        tlm_selector="nearest",
        tlm_pool_dataset="pool",
        tlm_sift_budget=3,
        tlm_loss_tokens="user",
    )
    run_in_process(recipe)
    assert len(seen) == 3 and all(0 < counted < total - 5 for counted, total in seen)  # not the template's tokens


def test_online_calibrated_threshold_is_the_same_over_two_ranks_as_in_one_process(tiny_model, tiny_data, tmp_path):
    """The running quantile sees every row of an update, whichever rank holds it: two ranks with batch 1 select
    exactly what one process with batch 2 selects."""
    common = dict(tlm_mode="online", tlm_chunk_size=4, tlm_select_fraction=0.5, lr_scheduler_type="constant")
    one = base_recipe(tiny_model, tiny_data, tmp_path / "one", per_device_train_batch_size=2, **common)
    assert run_cli(one, tmp_path).returncode == 0
    two = base_recipe(tiny_model, tiny_data, tmp_path / "two", per_device_train_batch_size=1, **common)
    proc = run_cli(two, tmp_path, extra_env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_jsonl(tmp_path / "one" / "tlm_scores.jsonl"), read_jsonl(tmp_path / "two" / "tlm_scores.jsonl")
    assert [r["selected"] for r in a] == [r["selected"] for r in b]
    assert [r["weight"] for r in a] == pytest.approx([r["weight"] for r in b], abs=1e-5)
    assert 0 < sum(r["selected"] for r in a) < len(a)


def test_eata_fisher_is_estimated_before_training_under_ddp(tiny_model, tiny_data, tmp_path):
    """The Fisher pass runs before the training loop, outside DDP's reducer (it used to run inside compute_loss),
    and its penalty acts: under the same 2-rank DDP run, the adapter drifts less from its start than without it."""

    def ddp_run(name: str, coeff: float) -> float:
        recipe = base_recipe(
            tiny_model,
            tiny_data,
            tmp_path / name,
            tlm_selector="all",
            tlm_objective="eata",
            tlm_entropy_tokens=4,
            tlm_eata_e0_scale="nats",
            tlm_eata_e0=10.0,
            learning_rate=5e-2,
            disable_shuffling=True,
            **({"tlm_eata_fisher_coeff": coeff, "tlm_eata_fisher_samples": 2} if coeff else {}),
        )
        proc = run_cli(recipe, tmp_path, extra_env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((tmp_path / name / "tlm_summary.json").read_text())
        assert summary["optimizer_steps"] > 0 and summary["world_size"] == 2
        weights = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        return sum(float(w.abs().sum()) for k, w in weights.items() if "lora_B" in k)  # B starts at zero

    assert 0 < ddp_run("fisher", 1e6) < ddp_run("free", 0.0)
