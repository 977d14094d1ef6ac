"""``llamafactory-cli train`` with ``stage: tlm`` run as a user runs it (subprocesses), plus in-process checks."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tlm_testing import CANARY, QUESTIONS, base_recipe, read_jsonl, run_cli, write_dataset


pytestmark = pytest.mark.slow
SCORE_KEYS = {"index", "n_tokens", "log_ppl", "selected", "weight", "log_ppl_after"}


def check_ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]


def lora_b_norm(output_dir: Path) -> float:
    weights = load_file(str(output_dir / "adapter_model.safetensors"))
    return sum(float(v.norm()) for k, v in weights.items() if "lora_B" in k)


def test_offline_run_leaves_adapter_records_and_predictions(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(base_recipe(tiny_model, tiny_data, out, do_predict=True, tlm_log_p0=5.99), tmp_path)
    check_ok(proc)

    rows = read_jsonl(out / "tlm_scores.jsonl")
    assert [r["index"] for r in rows] == list(range(len(QUESTIONS)))
    assert all(SCORE_KEYS <= set(r) for r in rows)
    assert all(r["selected"] == (r["log_ppl"] > 5.99) for r in rows)
    assert all((r["weight"] > 0) == r["selected"] for r in rows)
    summary = json.loads((out / "tlm_summary.json").read_text())
    n_sel = sum(r["selected"] for r in rows)
    assert 0 < n_sel < len(rows), "the threshold should split this data set"
    assert summary["n_selected"] == n_sel and summary["backward_passes"] == n_sel
    assert summary["optimizer_steps"] == n_sel  # an unselected prompt costs no step at all
    assert summary["mean_log_ppl_after_selected"] < summary["mean_log_ppl_before_selected"]
    assert set(summary["wall_time_s"]) >= {"score_before_s", "train_s", "score_after_s", "predict_s"}

    assert lora_b_norm(out) > 0  # the adapter learned something (LoRA B starts at zero)
    preds = read_jsonl(out / "generated_predictions.jsonl")
    assert len(preds) == len(QUESTIONS)
    assert [q for q, _ in QUESTIONS] == [p["prompt"].split("user\n")[1].split("<|im_end|>")[0] for p in preds]
    assert json.loads((out / "predict_results.json").read_text())["predict_samples_per_second"] > 0


def test_command_line_flags_and_key_value_overrides(tiny_model, tiny_data, tmp_path):
    recipe = base_recipe(tiny_model, tiny_data, tmp_path / "a")
    proc = run_cli(recipe, tmp_path, args=["tlm_lambda=0.25", "tlm_log_p0=2.5"])
    check_ok(proc)
    settings = json.loads((tmp_path / "a" / "tlm_summary.json").read_text())["settings"]
    assert settings["tlm_lambda"] == 0.25 and settings["tlm_log_p0"] == 2.5

    import os
    import subprocess

    from tlm_testing import VENV_BIN

    recipe["output_dir"] = str(tmp_path / "b")
    flags = []
    for key, value in {**recipe, "tlm_lambda": 0.2, "tlm_mode": "online", "tlm_chunk_size": 4}.items():
        flags += [f"--{key}", str(value)]
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "LLAMAFACTORY_VERBOSITY": "WARN"}
    proc = subprocess.run(
        [str(VENV_BIN / "llamafactory-cli"), "train", *flags], env=env, capture_output=True, text=True, timeout=600
    )
    check_ok(proc)
    summary = json.loads((tmp_path / "b" / "tlm_summary.json").read_text())
    assert summary["mode"] == "online" and summary["settings"]["tlm_lambda"] == 0.2


def test_online_answers_every_chunk_with_exactly_the_adapter_that_learned_the_chunks_before_it(tiny_model, tmp_path):
    """For every chunk c, the online answers equal those of an independent offline run that learned rows 0..4c-1
    in stream order (one step each, the same settings): no chunk is answered by an adapter that saw it, none by an
    adapter that missed an earlier chunk."""
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QUESTIONS]
    data = write_dataset(tmp_path / "data", rows)
    for c in (1, 2):
        write_dataset(data, rows[: 4 * c], name=f"first{4 * c}")
    common = dict(
        tlm_selector="all",
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        do_predict=True,
        per_device_eval_batch_size=4,
        max_new_tokens=12,
        tlm_eval_answers=True,
    )
    online = tmp_path / "online"
    run_in_process(base_recipe(tiny_model, data, online, tlm_mode="online", tlm_chunk_size=4, **common))
    online_preds = [p["predict"] for p in read_jsonl(online / "generated_predictions.jsonl")]
    assert len(online_preds) == len(QUESTIONS)
    for c in range(3):
        ref = tmp_path / f"ref{c}"
        if c == 0:  # chunk 0: the unadapted model
            run_in_process(base_recipe(tiny_model, data, ref, do_train=False, **common))
        else:
            run_in_process(
                base_recipe(
                    tiny_model,
                    data,
                    ref,
                    dataset=f"first{4 * c}",
                    eval_dataset="tiny",
                    disable_shuffling=True,
                    **common,
                )
            )
        ref_preds = [p["predict"] for p in read_jsonl(ref / "generated_predictions.jsonl")]
        assert online_preds[4 * c : 4 * c + 4] == ref_preds[4 * c : 4 * c + 4], f"chunk {c}"
        # the answers' likelihood too is measured by the adapter that answered the chunk, before it learned it
        measured = tmp_path / f"bpb{c}"
        adapter_args = {"adapter_name_or_path": str(ref)} if c else {}
        run_in_process(base_recipe(tiny_model, data, measured, do_train=False, tlm_eval_answers=True, **adapter_args))
        ref_bpb = [r["answer_bpb"] for r in read_jsonl(measured / "tlm_scores.jsonl")]
        online_bpb = [r["answer_bpb"] for r in read_jsonl(online / "tlm_scores.jsonl")]
        assert online_bpb[4 * c : 4 * c + 4] == pytest.approx(ref_bpb[4 * c : 4 * c + 4], abs=1e-5), f"chunk {c}"
    assert (
        online_preds[4:8] != [p["predict"] for p in read_jsonl(tmp_path / "ref0" / "generated_predictions.jsonl")][4:8]
    )
    scores = read_jsonl(online / "tlm_scores.jsonl")
    assert [r["chunk"] for r in scores] == [i // 4 for i in range(len(QUESTIONS))]
    assert json.loads((online / "tlm_summary.json").read_text())["backward_passes"] == len(QUESTIONS)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_torchrun_two_processes_every_row_exactly_once(tiny_model, tmp_path, mode):
    rows = [{"instruction": f"{q} ({i})", "input": "", "output": a} for i, (q, a) in enumerate(QUESTIONS[:11])]
    data = write_dataset(tmp_path / "data", rows)  # 11 rows: an odd count exercises the uneven last batch
    out = tmp_path / "out"
    chunk = {"tlm_chunk_size": 3} if mode == "online" else {}
    recipe = base_recipe(tiny_model, data, out, do_predict=True, tlm_mode=mode, tlm_log_p0=5.98, **chunk)
    check_ok(run_cli(recipe, tmp_path, extra_env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}))
    scores = read_jsonl(out / "tlm_scores.jsonl")
    assert [r["index"] for r in scores] == list(range(11))
    preds = read_jsonl(out / "generated_predictions.jsonl")
    assert [p["prompt"].split("user\n")[1].split("<|im_end|>")[0] for p in preds] == [r["instruction"] for r in rows]
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["backward_passes"] == sum(r["selected"] for r in scores)


def test_adapter_loads_for_inference_with_stage_sft(tiny_model, tiny_data, tmp_path):
    adapted = tmp_path / "adapted"
    check_ok(run_cli(base_recipe(tiny_model, tiny_data, adapted, tlm_selector="all"), tmp_path))
    recipe = base_recipe(
        tiny_model,
        tiny_data,
        tmp_path / "pred",
        stage="sft",
        do_train=False,
        do_predict=True,
        adapter_name_or_path=str(adapted),
        eval_dataset="tiny",
        predict_with_generate=True,
        tlm_log_p0=None,
    )
    check_ok(run_cli(recipe, tmp_path))
    assert len(read_jsonl(tmp_path / "pred" / "generated_predictions.jsonl")) == len(QUESTIONS)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["tlm_lamda=0.2"], "tlm_lamda"),
        (["tlm_chunk_size=0"], "tlm_chunk_size"),
        (["packing=true"], "packing"),
        (["stage=sft", "tlm_lambda=0.2"], "tlm_lambda"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tiny_model, tiny_data, tmp_path, extra, message):
    out = tmp_path / "out"
    proc = run_cli(base_recipe(tiny_model, tiny_data, out), tmp_path, args=extra)
    assert proc.returncode != 0
    assert message in proc.stderr.splitlines()[-1]
    assert not out.exists()


def test_all_empty_prompts_are_refused(tiny_model, tmp_path):
    data = write_dataset(tmp_path / "data", [{"instruction": "", "input": "", "output": "x"}] * 3)
    proc = run_cli(base_recipe(tiny_model, data, tmp_path / "out"), tmp_path)
    assert proc.returncode != 0
    assert "empty" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "out" / "tlm_scores.jsonl").exists()


# ---------------------------------------------------------------- in-process: what the trainer really sees
def run_in_process(recipe: dict) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(recipe)


def test_reference_answers_never_reach_a_training_batch(tiny_model, tiny_data, tmp_path, monkeypatch):
    """Not with the answer likelihoods measured either: the answers go to their own no-grad pass only."""
    from transformers import AutoTokenizer

    from tlm_plugin.train import passes
    from tlm_plugin.train.trainer import TLMTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    seen: list[list[int]] = []
    scored: dict[str, list[str]] = {}
    original, original_pass = TLMTrainer.compute_loss, passes.nll_pass

    def spy(self, model, inputs, *args, **kwargs):
        seen.extend(inputs["input_ids"].tolist())
        assert "labels" not in inputs
        return original(self, model, inputs, *args, **kwargs)

    def pass_spy(trainer, dataset, masks=("loss_mask",), **kwargs):
        scored.setdefault(masks[0], []).extend(tokenizer.batch_decode([list(x) for x in dataset["input_ids"]]))
        return original_pass(trainer, dataset, masks=masks, **kwargs)

    monkeypatch.setattr(TLMTrainer, "compute_loss", spy)
    monkeypatch.setattr("tlm_plugin.train.run.nll_pass", pass_spy)
    out = tmp_path / "out"
    run_in_process(base_recipe(tiny_model, tiny_data, out, tlm_selector="all", do_predict=True, tlm_eval_answers=True))
    assert len(seen) == len(QUESTIONS)
    decoded = tokenizer.batch_decode(seen)
    assert all(CANARY not in text for text in decoded)
    assert all(any(q in text for text in decoded) for q, _ in QUESTIONS)  # every prompt, and only prompts
    assert scored["loss_mask"] and all(CANARY not in text for text in scored["loss_mask"])  # S(x), log-ppl after
    assert len(scored["answer_mask"]) == 2 * len(QUESTIONS) and all(CANARY in t for t in scored["answer_mask"])
    # the canary really is in the data, and in the labels that predictions are scored against
    labels = [p["label"] for p in read_jsonl(out / "generated_predictions.jsonl")]
    assert all(CANARY in label for label in labels)


def test_non_finite_loss_skips_the_update_and_is_recorded(tiny_model, tiny_data, tmp_path, monkeypatch):
    from tlm_plugin.train import trainer as trainer_module

    original = trainer_module.tlm_loss

    def poisoned(log_ppl, weights):
        loss = original(log_ppl, weights)
        return loss * float("nan") if getattr(poisoned, "index", None) == 3 else loss

    original_compute = trainer_module.TLMTrainer.compute_loss

    def compute(self, model, inputs, *args, **kwargs):
        poisoned.index = int(inputs["index"][0])
        return original_compute(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "tlm_loss", poisoned)
    monkeypatch.setattr(trainer_module.TLMTrainer, "compute_loss", compute)
    # a warm-up over the first updates: a skipped update that advanced the scheduler would shift every later LR
    common = dict(
        tlm_selector="all",
        disable_shuffling=True,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=6,
        learning_rate=1e-2,
    )
    out = tmp_path / "out"
    run_in_process(base_recipe(tiny_model, tiny_data, out, **common))
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["nonfinite_rows"] == [3]
    assert summary["backward_passes"] == len(QUESTIONS) - 1
    assert (summary["optimizer_steps"], summary["skipped_steps"]) == (len(QUESTIONS) - 1, 1)

    # the same as a run that never saw row 3: no optimizer, scheduler or moment update came from it
    monkeypatch.undo()
    rows = [{"instruction": q, "input": "", "output": a} for i, (q, a) in enumerate(QUESTIONS) if i != 3]
    without = write_dataset(tmp_path / "without", rows)
    run_in_process(base_recipe(tiny_model, without, tmp_path / "without_out", **common))
    poisoned_run, clean_run = adapter(out), adapter(tmp_path / "without_out")
    for key in clean_run:
        assert torch.isfinite(poisoned_run[key]).all()
        torch.testing.assert_close(poisoned_run[key], clean_run[key], rtol=0, atol=1e-7)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_reset_chunk_learns_from_the_last_chunk_only(tiny_model, tmp_path):
    """With tlm_reset: chunk, adapter, optimizer, LR schedule and gradients restart per chunk: the final adapter
    equals a fresh run on the last chunk alone. The schedule warms up (its position must be restored) and two
    batches accumulate per update over chunks of 3 (an update must not straddle two chunks)."""
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QUESTIONS]
    data = write_dataset(tmp_path / "data", rows)
    write_dataset(tmp_path / "data", rows[9:], name="last")
    common = dict(
        tlm_mode="online",
        tlm_chunk_size=3,
        tlm_selector="all",
        learning_rate=1e-2,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=2,
        gradient_accumulation_steps=2,
    )
    run_in_process(base_recipe(tiny_model, data, tmp_path / "reset", tlm_reset="chunk", **common))
    run_in_process(base_recipe(tiny_model, data, tmp_path / "last", dataset="last", **common))
    run_in_process(base_recipe(tiny_model, data, tmp_path / "never", **common))
    reset, last, never = adapter(tmp_path / "reset"), adapter(tmp_path / "last"), adapter(tmp_path / "never")
    for key in reset:
        torch.testing.assert_close(reset[key], last[key], rtol=0, atol=1e-7)
    assert any(not torch.allclose(never[k], last[k], atol=1e-5) for k in never if "lora_B" in k)


def test_batch_equals_gradient_accumulation(tiny_model, tiny_data, tmp_path):
    """One batch of 4 gives the same update as 4 batches of 1 with 4 accumulation steps."""
    common = dict(tlm_selector="all", learning_rate=1e-2, disable_shuffling=True, tlm_log_p0=None)
    run_in_process(base_recipe(tiny_model, tiny_data, tmp_path / "b4", per_device_train_batch_size=4, **common))
    run_in_process(base_recipe(tiny_model, tiny_data, tmp_path / "ga4", gradient_accumulation_steps=4, **common))
    b4, ga4 = adapter(tmp_path / "b4"), adapter(tmp_path / "ga4")
    for key in b4:
        torch.testing.assert_close(b4[key], ga4[key], rtol=1e-3, atol=1e-5)


def test_long_prompts_are_truncated_as_llamafactory_does_and_recorded(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    run_in_process(base_recipe(tiny_model, tiny_data, out, cutoff_len=12, tlm_selector="all"))
    rows = read_jsonl(out / "tlm_scores.jsonl")
    # every templated prompt here is 17+ tokens; LLaMA-Factory's infer_seqlen shares cutoff_len between prompt
    # and reference, so prompts are cut to at most 12 (fewer when the reference is long)
    assert all(4 <= r["n_tokens"] <= 12 for r in rows)
    assert all(r["log_ppl"] == r["log_ppl"] for r in rows)


# ------------------------------------------------------------------------------------------------ the first hour
def test_a_run_ends_with_its_summary_and_a_rerun_of_a_finished_run_reports_it(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    recipe = base_recipe(tiny_model, tiny_data, out, overwrite_output_dir=False, tlm_log_p0=5.99)
    first = run_cli(recipe, tmp_path)
    check_ok(first)
    rows = read_jsonl(out / "tlm_scores.jsonl")
    n_selected = sum(r["selected"] for r in rows)
    before = sum(r["log_ppl"] for r in rows) / len(rows)
    after = sum(r["log_ppl_after"] for r in rows) / len(rows)
    assert f"selected {n_selected}/{len(rows)}" in first.stdout
    assert f"mean log-perplexity of the prompts: {before:.4f} -> {after:.4f}" in first.stdout
    assert f"outputs: {out}" in first.stdout and "tlm_scores.jsonl" in first.stdout

    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = run_cli(recipe, tmp_path)
    check_ok(again)
    assert "this run is already finished" in again.stdout and str(out) in again.stdout
    assert f"selected {n_selected}/{len(rows)}" in again.stdout  # its summary, read back
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == written  # nothing redone

    other = run_cli({**recipe, "learning_rate": 5e-3}, tmp_path)
    assert other.returncode != 0
    assert "holds a finished stage-tlm run made with other settings" in other.stdout + other.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == written
    fresh = run_cli({**recipe, "learning_rate": 5e-3, "overwrite_output_dir": True}, tmp_path)
    check_ok(fresh)
    assert "already finished" not in fresh.stdout
    assert json.loads((out / "tlm_summary.json").read_text())["settings"]["tlm_mode"] == "offline"


def test_without_do_train_the_run_says_it_measures_the_unadapted_model(tiny_model, tiny_data, tmp_path):
    proc = run_cli(base_recipe(tiny_model, tiny_data, tmp_path / "out", do_train=False), tmp_path)
    check_ok(proc)
    assert "do_train: false: no adaptation" in proc.stdout + proc.stderr  # the log line
    assert "no adaptation (do_train: false)" in proc.stdout and "selected" not in proc.stdout
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_command_line_switch_of_mode_and_method_drops_the_recipe_settings_it_makes_inert(
    tiny_model, tiny_data, tmp_path
):
    recipe = base_recipe(tiny_model, tiny_data, tmp_path / "out", tlm_lambda=0.1, tlm_log_p0=3.0)
    proc = run_cli(recipe, tmp_path, args=["tlm_mode=per_prompt", "tlm_selector=nearest", "tlm_sift_budget=1"])
    check_ok(proc)
    dropped = [line for line in (proc.stdout + proc.stderr).splitlines() if "dropped the recipe's" in line]
    assert len(dropped) == 1 and "tlm_lambda" in dropped[0] and "tlm_log_p0" in dropped[0]
    summary = json.loads((tmp_path / "out" / "tlm_summary.json").read_text())
    assert (summary["mode"], summary["settings"]["tlm_selector"]) == ("per_prompt", "nearest")
