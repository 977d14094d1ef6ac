"""Interrupted runs: a real ``llamafactory-cli train`` killed with SIGKILL, then the same command again.

Online: each finished chunk's answers and records are on disk at once, checkpoints follow chunk boundaries, and the
rerun ends with files identical to an uninterrupted run's. Per prompt: the rerun answers only what was not answered.
Offline: training resumes from its last checkpoint with the scores of the interrupted run.
"""

import json
from pathlib import Path

import pytest
from tlm_testing import CANARY, QUESTIONS, base_recipe, read_jsonl, run_and_kill, run_cli, write_dataset


pytestmark = pytest.mark.slow
ROWS = [
    {"instruction": f"{q} (case {k})", "input": "", "output": f"{a} {CANARY}"} for k in range(4) for q, a in QUESTIONS
]


def big_data(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", ROWS, name="big")


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_online_run_killed_mid_stream_resumes_to_identical_files(tiny_model, tmp_path):
    data = big_data(tmp_path)
    common = dict(
        dataset="big",
        do_predict=True,
        tlm_mode="online",
        tlm_chunk_size=4,
        tlm_log_p0=5.99,
        max_new_tokens=16,
        lr_scheduler_type="constant",
        save_strategy="steps",
        overwrite_output_dir=False,
    )
    ok(run_cli(base_recipe(tiny_model, data, tmp_path / "reference", **common), tmp_path))
    killed = tmp_path / "killed"
    recipe = base_recipe(tiny_model, data, killed, **common)
    at = run_and_kill(recipe, tmp_path, "generated_predictions.jsonl", 22)
    assert 22 <= at < len(ROWS)
    done = read_jsonl(killed / "tlm_scores.jsonl")
    assert len(done) % 4 == 0 and len(done) <= at  # records of whole, learned chunks only
    proc = run_cli(recipe, tmp_path)  # the same command again
    ok(proc)
    assert "Resuming the stream after chunk" in proc.stderr
    for name in ("generated_predictions.jsonl", "tlm_scores.jsonl"):
        assert (killed / name).read_text() == (tmp_path / "reference" / name).read_text(), name
    a = json.loads((tmp_path / "reference" / "tlm_summary.json").read_text())
    b = json.loads((killed / "tlm_summary.json").read_text())
    for key in ("n_selected", "backward_passes", "optimizer_steps", "skipped_steps", "mean_log_ppl_after"):
        assert b[key] == a[key], key
    assert (killed / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "reference" / "adapter_model.safetensors"
    ).read_bytes()


def test_per_prompt_run_killed_resumes_at_the_first_unanswered_prompt(tiny_model, tmp_path):
    data = big_data(tmp_path)
    common = dict(
        dataset="big",
        do_predict=True,
        tlm_selector="nearest",
        tlm_mode="per_prompt",
        tlm_sift_budget=2,
        learning_rate=1e-2,
        max_new_tokens=16,
        overwrite_output_dir=False,
    )
    ok(run_cli(base_recipe(tiny_model, data, tmp_path / "reference", **common), tmp_path))
    killed = tmp_path / "killed"
    recipe = base_recipe(tiny_model, data, killed, **common)
    at = run_and_kill(recipe, tmp_path, "tlm_prompts.rank0.jsonl", 15)
    assert 15 <= at < len(ROWS)
    answered_before = {r["index"] for r in read_jsonl(killed / "tlm_prompts.rank0.jsonl")}
    # the rerun runs on two ranks: the shares change, the answered prompts are still skipped
    proc = run_cli(recipe, tmp_path, extra_env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    ok(proc)
    assert f"Resuming: {len(answered_before)} of {len(ROWS)} prompts were answered before." in proc.stderr
    for name in ("generated_predictions.jsonl", "tlm_sift_selection.jsonl"):
        timeless = [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(killed / name)]
        assert timeless == [
            {k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(tmp_path / "reference" / name)
        ]
    scores = read_jsonl(killed / "tlm_scores.jsonl")
    ref = read_jsonl(tmp_path / "reference" / "tlm_scores.jsonl")
    assert [r["log_ppl_after"] for r in scores] == pytest.approx([r["log_ppl_after"] for r in ref], abs=1e-6)
    assert not list(killed.glob("tlm_prompts.rank*.jsonl"))  # merged into the final files, then removed
    assert len(answered_before) >= 15


def test_offline_run_resumes_training_from_its_last_checkpoint(tiny_model, tmp_path):
    data = big_data(tmp_path)
    common = dict(
        dataset="big",
        tlm_selector="all",
        save_strategy="steps",
        save_steps=8,
        overwrite_output_dir=False,
        lr_scheduler_type="cosine",
        learning_rate=1e-2,
    )
    ok(run_cli(base_recipe(tiny_model, data, tmp_path / "reference", **common), tmp_path))
    killed = tmp_path / "killed"
    recipe = base_recipe(tiny_model, data, killed, **common)
    run_and_kill(recipe, tmp_path, "trainer_log.jsonl", 20)
    assert any(killed.glob("checkpoint-*")), "no checkpoint was written before the kill"
    scores_before = (killed / "tlm_scores.jsonl").read_text()
    proc = run_cli(recipe, tmp_path)
    ok(proc)
    assert "Resuming the interrupted stage-tlm run" in proc.stderr and "checkpoint-" in proc.stderr
    final = read_jsonl(killed / "tlm_scores.jsonl")
    assert [r["log_ppl"] for r in final] == [json.loads(line)["log_ppl"] for line in scores_before.splitlines()]
    a = json.loads((tmp_path / "reference" / "tlm_summary.json").read_text())
    b = json.loads((killed / "tlm_summary.json").read_text())
    assert b["mean_log_ppl_after"] == pytest.approx(a["mean_log_ppl_after"], abs=1e-5)
    state = json.loads((killed / "trainer_state.json").read_text())
    assert state["global_step"] == len(ROWS)


def test_overwrite_starts_over_and_other_settings_are_refused(tiny_model, tmp_path):
    data = big_data(tmp_path)
    common = dict(
        dataset="big",
        do_predict=True,
        tlm_mode="online",
        tlm_chunk_size=4,
        save_strategy="steps",
        overwrite_output_dir=False,
        max_new_tokens=8,
    )
    out = tmp_path / "out"
    run_and_kill(base_recipe(tiny_model, data, out, **common), tmp_path, "generated_predictions.jsonl", 10)
    other = run_cli(base_recipe(tiny_model, data, out, **{**common, "learning_rate": 0.5}), tmp_path)
    assert other.returncode != 0 and "other settings" in other.stderr
    assert (out / "generated_predictions.jsonl").is_file()  # the refusal lost nothing
    ok(run_cli(base_recipe(tiny_model, data, out, **{**common, "overwrite_output_dir": True}), tmp_path))
    assert len(read_jsonl(out / "generated_predictions.jsonl")) == len(ROWS)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{len(ROWS)}"]
