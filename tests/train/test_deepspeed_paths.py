"""DeepSpeed paths a recipe can take, run on DeepSpeed's CPU accelerator (one torchrun rank).

- a config with its own ``optimizer`` and ``scheduler`` sections (``auto`` values) trains under ZeRO-3 after the
  ZeRO inference engine of the scoring pass (whose config changes must not reach the training engine);
- a ZeRO-3 run that selects nothing saves a complete adapter (the inference engine made its weights partitions);
- a micro-batch with a non-finite loss leaves no gradient behind in DeepSpeed's accumulators: with two
  micro-batches per update, ZeRO-2 ends with the adapter a plain run ends with;
- the inference engines of an online ZeRO-3 stream leave no forward hooks behind.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tlm_testing import QUESTIONS, REPO, VENV_BIN, base_recipe, run_cli


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]
DS_ENV = {"DS_ACCELERATOR": "cpu", "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"}
WORKER = Path(__file__).with_name("patched_worker.py")


def summary(out: Path) -> dict:
    return json.loads((out / "tlm_summary.json").read_text())


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_a_config_with_its_own_optimizer_and_scheduler_trains_under_zero3(tiny_model, tiny_data, tmp_path):
    """The scoring pass's inference engine deletes the optimizer section and fills `auto` step counts with 0 in
    the config it shares with accelerate: restored by assignment, the training engine saw no optimizer (DummyOptim
    error) or a schedule of 0 steps (learning rate 0)."""
    common = dict(tlm_log_p0=5.99, learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2)
    plain = tmp_path / "plain"
    proc = run_cli(base_recipe(tiny_model, tiny_data, plain, **common), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ds"
    config = str(REPO / "recipes" / "deepspeed" / "ds_z3_own_optimizer.json")  # optimizer + WarmupDecayLR, `auto`
    recipe = base_recipe(tiny_model, tiny_data, out, deepspeed=config, **common)
    proc = run_cli(recipe, tmp_path, extra_env=DS_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = summary(plain), summary(out)
    assert b["n_selected"] == a["n_selected"] > 0 and b["optimizer_steps"] == b["n_selected"]
    plain_drop = a["mean_log_ppl_before_selected"] - a["mean_log_ppl_after_selected"]
    ds_drop = b["mean_log_ppl_before_selected"] - b["mean_log_ppl_after_selected"]
    assert plain_drop > 0.05 and ds_drop > 0.5 * plain_drop  # learned at the recipe's rate, not at about 0
    rates = [
        e["learning_rate"]
        for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "learning_rate" in e
    ]
    assert max(rates) == pytest.approx(1e-2, rel=0.3)


def test_zero3_run_that_selects_nothing_saves_a_complete_adapter(tiny_model, tiny_data, tmp_path):
    """Rank 16 on every linear layer: most LoRA weights are over ZeRO-3's persistence threshold (10 x hidden) and
    were partitions (empty tensors on the rank) when the adapter was saved."""
    common = dict(tlm_log_p0=50.0, lora_rank=16, lora_target="all")
    plain = tmp_path / "plain"
    assert run_cli(base_recipe(tiny_model, tiny_data, plain, **common), tmp_path).returncode == 0
    out = tmp_path / "ds"
    config = str(REPO / "recipes" / "deepspeed" / "ds_z3.json")
    proc = run_cli(base_recipe(tiny_model, tiny_data, out, deepspeed=config, **common), tmp_path, extra_env=DS_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(out)["n_selected"] == 0
    expected, saved = adapter(plain), adapter(out)
    assert sorted(saved) == sorted(expected)
    for name, tensor in expected.items():
        assert saved[name].shape == tensor.shape, name
        torch.testing.assert_close(saved[name], tensor)  # nothing learned: the initial adapter, same seed


def run_worker(args: list[str], recipe: dict, tmp_path: Path, deepspeed: bool) -> dict:
    path = tmp_path / f"{Path(recipe['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / f"{Path(recipe['output_dir']).name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.update({"HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1", "LLAMAFACTORY_VERBOSITY": "WARN"})
    if deepspeed:
        env["DS_ACCELERATOR"] = "cpu"
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "1", str(WORKER), *args, str(path), str(out)]
    else:
        cmd = [sys.executable, str(WORKER), *args, str(path), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_non_finite_micro_batch_leaves_no_gradient_in_deepspeeds_accumulators(tiny_model, tiny_data, tmp_path):
    """Two micro-batches per update; row 3 closes the window of rows 2 and 3 with a NaN loss. Row 2's gradient is
    applied in that update on both backends (nothing is ever discarded after a backward); a discard would have left
    it in ZeRO-2's accumulators, to be added to the next update."""
    common = dict(
        tlm_selector="all",
        gradient_accumulation_steps=2,
        disable_shuffling=True,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
    )
    plain_out, ds_out = tmp_path / "plain", tmp_path / "ds"
    run_worker(["poison", "3"], base_recipe(tiny_model, tiny_data, plain_out, **common), tmp_path, deepspeed=False)
    config = str(REPO / "recipes" / "deepspeed" / "ds_z2.json")
    recipe = base_recipe(tiny_model, tiny_data, ds_out, deepspeed=config, **common)
    run_worker(["poison", "3"], recipe, tmp_path, deepspeed=True)
    for out in (plain_out, ds_out):
        s = summary(out)
        assert s["nonfinite_rows"] == [3]
        assert (s["optimizer_steps"], s["skipped_steps"]) == (len(QUESTIONS) // 2, 0)
        assert s["backward_passes"] == len(QUESTIONS) - 1
    a, b = adapter(plain_out), adapter(ds_out)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-5)


def test_inference_engines_of_an_online_zero3_stream_leave_no_hooks(tiny_model, tiny_data, tmp_path):
    """do_train: false under ZeRO-3 (AdaptEval's base method): two inference engines per chunk of the stream."""
    recipe = base_recipe(
        tiny_model,
        tiny_data,
        tmp_path / "out",
        do_train=False,
        do_predict=True,
        tlm_mode="online",
        tlm_chunk_size=3,
        tlm_eval_answers=True,
        deepspeed=str(REPO / "recipes" / "deepspeed" / "ds_z3.json"),
    )
    observed = run_worker(["hooks"], recipe, tmp_path, deepspeed=True)
    assert len(observed["hooks"]) >= 8  # two engines for each of the 4 chunks
    assert len(set(observed["hooks"])) == 1, observed["hooks"]
