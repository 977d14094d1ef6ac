"""The GPU paths' own logic, checked on the CPU where the libraries allow it (torch's CPU GradScaler for fp16).

- A skipped update never reaches the GradScaler under transformers' 4.x training loop too, which clips inline and
  sets ``sync_gradients`` again after ``training_step`` (simulated here on the installed release).
- Per-prompt fp16: an overflowed step is counted as one and moves nothing; the loss scale carries on to the next
  prompt instead of restarting at its initial value for every prompt.
- Per-prompt measurements before and after learning go through one path: without learning they are equal.
- Entropy objectives compute their softmax terms over the answer window only.
- FSDP before the training loop: the model is sharded the way transformers' training preparation does it.
"""

import json
import types

import pytest
import torch
from tlm_testing import QUESTIONS, base_recipe, read_jsonl, run_cli


pytestmark = pytest.mark.slow


def run_in_process(recipe: dict) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(recipe)


def test_a_skipped_update_never_reaches_the_grad_scaler_under_the_4x_loop(
    tiny_model, tiny_data, tmp_path, monkeypatch
):
    from tlm_plugin.train import trainer as trainer_module

    original_init, original_step = trainer_module.TLMTrainer.__init__, trainer_module.TLMTrainer.training_step

    def with_cpu_scaler(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        self.accelerator.native_amp = True

    def step_as_4x(self, model, inputs, num_items_in_batch=None):
        boundary = self.accelerator.sync_gradients
        loss = original_step(self, model, inputs, num_items_in_batch)
        if boundary:  # transformers 4.55-5.2: "manually set sync_gradients to True" after training_step
            self.accelerator.gradient_state._set_sync_gradients(True)
        return loss

    monkeypatch.setattr(trainer_module.TLMTrainer, "__init__", with_cpu_scaler)
    monkeypatch.setattr(trainer_module.TLMTrainer, "training_step", step_as_4x)
    out = tmp_path / "out"
    recipe = dict(
        fp16=True,
        tlm_mode="online",
        tlm_chunk_size=4,
        tlm_log_p0=5.99,
        lr_scheduler_type="constant",
        learning_rate=1e-2,
        max_grad_norm=1.0,
    )
    run_in_process(base_recipe(tiny_model, tiny_data, out, **recipe))
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert 0 < summary["n_selected"] < len(QUESTIONS)
    assert summary["skipped_steps"] == len(QUESTIONS) - summary["n_selected"]
    assert summary["optimizer_steps"] + summary["overflow_steps"] == summary["n_selected"]


def test_per_prompt_fp16_counts_overflows_and_carries_the_loss_scale(tiny_model, tiny_data, tmp_path, monkeypatch):
    """An initial scale of 2^127 overflows the first steps (the scaled loss is inf in float32). Each overflow is counted (not as a step, no LR step);
    the halved scale carries on, so later prompts no longer overflow."""
    from tlm_plugin.train import learner

    real = torch.amp.GradScaler
    monkeypatch.setattr(
        learner.torch.amp, "GradScaler", lambda device: real(device, init_scale=2.0**127, growth_interval=10**6)
    )
    out = tmp_path / "out"
    recipe = base_recipe(
        tiny_model,
        tiny_data,
        out,
        fp16=True,
        tlm_selector="nearest",
        tlm_mode="per_prompt",
        tlm_sift_budget=4,
        learning_rate=1e-2,
    )
    run_in_process(recipe)
    records = read_jsonl(out / "tlm_sift_selection.jsonl")
    assert all(r["steps"] + r["overflow_steps"] == 4 for r in records)
    assert records[0]["overflow_steps"] > 0
    assert records[-1]["overflow_steps"] == 0  # the scale found on the first prompts was kept
    summary = json.loads((out / "tlm_summary.json").read_text())
    assert summary["overflow_steps"] == sum(r["overflow_steps"] for r in records) > 0
    assert summary["optimizer_steps"] == sum(r["steps"] for r in records)


def test_per_prompt_before_and_after_are_one_measurement(tiny_model, tiny_data, tmp_path):
    """Learning rate 0: every prompt takes its steps and nothing moves, so after equals before exactly."""
    out = tmp_path / "out"
    recipe = base_recipe(
        tiny_model,
        tiny_data,
        out,
        tlm_selector="nearest",
        tlm_mode="per_prompt",
        tlm_sift_budget=2,
        learning_rate=0.0,
        tlm_eval_answers=True,
    )
    run_in_process(recipe)
    rows = read_jsonl(out / "tlm_scores.jsonl")
    assert all(r["selected"] for r in rows)
    for r in rows:
        assert r["log_ppl_after"] == r["log_ppl"]
        assert r["answer_bpb"] == r["answer_bpb_base"]
        assert r["answer_content_bpb"] == r["answer_content_bpb_base"]


def test_entropy_objectives_read_only_the_answer_window(tiny_model, tiny_data, tmp_path, monkeypatch):
    from tlm_plugin.objectives import step

    seen = []
    original = step.tent_loss

    def spy(logits, mask):
        seen.append((tuple(logits.shape), int(mask.sum())))
        return original(logits, mask)

    monkeypatch.setattr(step, "tent_loss", spy)
    out = tmp_path / "out"
    run_in_process(
        base_recipe(tiny_model, tiny_data, out, tlm_objective="tent", tlm_selector="all", tlm_entropy_tokens=4)
    )
    assert seen
    for (batch, positions, _vocab), counted in seen:
        assert batch == 1 and 0 < positions <= 4  # the answer window, not the prompt's positions
        assert 0 < counted <= positions


def test_chunk_resets_are_refused_under_fsdp(tiny_model, tiny_data, tmp_path):
    recipe = base_recipe(
        tiny_model, tiny_data, tmp_path / "out", tlm_mode="online", tlm_chunk_size=4, tlm_reset="chunk"
    )
    proc = run_cli(recipe, tmp_path, extra_env={"ACCELERATE_USE_FSDP": "true"})
    assert proc.returncode != 0
    assert "tlm_reset: chunk is not supported with FSDP" in proc.stderr
    assert not (tmp_path / "out").exists()


class _Prepared:
    def __init__(self, optimizer):
        self.optimizer = optimizer


class _Accelerator:
    """Records what the early FSDP preparation asks of accelerate."""

    def __init__(self, version: int) -> None:
        self.state = types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace(fsdp_version=version))
        self.calls: list[tuple] = []
        self._optimizers: list = []

    def prepare(self, *objs):
        self.calls.append(tuple(type(o).__name__ for o in objs))
        out = []
        for obj in objs:
            if isinstance(obj, torch.optim.Optimizer):
                obj = _Prepared(obj)
                self._optimizers.append(obj)
            out.append(("sharded", obj) if isinstance(obj, torch.nn.Module) else obj)
        return out[0] if len(out) == 1 else tuple(out)


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_is_prepared_before_training_as_transformers_prepares_it(version, monkeypatch):
    from tlm_plugin import seam
    from tlm_plugin.train.backend import prepare_fsdp_early

    model = torch.nn.Linear(2, 2)
    plugin_updates = []
    monkeypatch.setattr(seam, "fsdp_peft_plugin_updates", lambda trainer: plugin_updates.append(trainer))

    class Trainer:
        optimizer = None

        def create_optimizer(self):
            self.optimizer = self.optimizer or torch.optim.AdamW(self.model.parameters())
            return self.optimizer

    trainer = Trainer()
    trainer.model = trainer.model_wrapped = model
    trainer.accelerator = _Accelerator(version)
    prepare_fsdp_early(trainer)
    assert trainer.model == ("sharded", model) and trainer.model_wrapped is trainer.model
    if version == 2:  # model and optimizer together; the optimizer handed back plain, for the training loop
        assert trainer.accelerator.calls == [("Linear", "AdamW")]
        assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.accelerator._optimizers == []
        assert plugin_updates == []
    else:  # the PEFT wrap policy first, then the model alone (the optimizer is made from the sharded model)
        assert trainer.accelerator.calls == [("Linear",)] and trainer.optimizer is None
        assert plugin_updates == [trainer]


def test_per_prompt_schedules_start_at_the_full_learning_rate(tiny_model, tiny_data, tmp_path):
    """The recipe's warm-up (here half the run) is for whole runs; each prompt's own linear schedule starts at the
    recipe's rate unless tlm_prompt_warmup_steps asks for a warm-up."""
    common = dict(tlm_selector="nearest", tlm_mode="per_prompt", tlm_sift_budget=4, learning_rate=1e-2)
    out = tmp_path / "plain"
    run_in_process(base_recipe(tiny_model, tiny_data, out, lr_scheduler_type="linear", warmup_ratio=0.5, **common))
    records = read_jsonl(out / "tlm_sift_selection.jsonl")
    assert all(r["step_lrs"][0] == pytest.approx(1e-2) for r in records)
    assert all(r["step_lrs"] == sorted(r["step_lrs"], reverse=True) for r in records)  # linear decay, per prompt
    warm = tmp_path / "warm"
    run_in_process(
        base_recipe(tiny_model, tiny_data, warm, lr_scheduler_type="linear", tlm_prompt_warmup_steps=2, **common)
    )
    records = read_jsonl(warm / "tlm_sift_selection.jsonl")
    assert all(r["step_lrs"][0] == 0.0 and r["step_lrs"][2] > r["step_lrs"][1] > 0 for r in records)
