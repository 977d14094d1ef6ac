"""Stage tlm under the training backends a recipe can choose, as far as they run on a CPU.

- DeepSpeed ZeRO-2 and ZeRO-3 (one process, ``DS_ACCELERATOR=cpu``): offline, online and per-prompt runs give the
  scores, optimizer steps and predictions of the same run without DeepSpeed.
- fp16: torch's CPU GradScaler attached to the trainer's accelerator; an update that selects nothing never reaches
  the scaler (which would raise "No inf checks were recorded") and moves nothing.
- FSDP: accelerate enables FSDP only on GPUs, so the lock-step logic of the no-grad passes is run on torch's own
  FSDP2 (``fully_shard``) over two gloo processes, against a single-process computation.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tlm_testing import QUESTIONS, REPO, VENV_BIN, base_recipe, read_jsonl, run_cli


pytestmark = pytest.mark.slow
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install -e '.[dev]')"
)
MODES = {
    "offline": dict(tlm_log_p0=5.99),
    "online": dict(tlm_mode="online", tlm_chunk_size=5, tlm_log_p0=5.99, lr_scheduler_type="constant"),
    "per_prompt": dict(tlm_selector="sift", tlm_mode="per_prompt", tlm_sift_budget=2, learning_rate=1e-2),
}
_plain: dict[str, Path] = {}


def _run(tiny_model, tiny_data, out: Path, mode: str, extra_env=None, **overrides) -> Path:
    recipe = base_recipe(tiny_model, tiny_data, out, do_predict=True, **MODES[mode], **overrides)
    proc = run_cli(recipe, out.parent, extra_env=extra_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _plain_run(tiny_model, tiny_data, tmp_path_factory, mode: str) -> Path:
    if mode not in _plain:
        base = tmp_path_factory.mktemp(f"plain-{mode}")
        _plain[mode] = _run(tiny_model, write_copy(tiny_data, base), base / "out", mode)
    return _plain[mode]


def write_copy(data: Path, where: Path) -> Path:
    import shutil

    target = where / "data"
    shutil.copytree(data, target)
    return target


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_deepspeed_gives_the_plain_runs_results(tiny_model, tiny_data, tmp_path, tmp_path_factory, mode, stage):
    plain = _plain_run(tiny_model, tiny_data, tmp_path_factory, mode)
    env = {"DS_ACCELERATOR": "cpu", "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"}
    config = REPO / "recipes" / "deepspeed" / f"ds_z{stage}.json"
    ds = _run(tiny_model, tiny_data, tmp_path / "out", mode, extra_env=env, deepspeed=str(config))
    a, b = read_jsonl(plain / "tlm_scores.jsonl"), read_jsonl(ds / "tlm_scores.jsonl")
    assert [r["index"] for r in b] == list(range(len(QUESTIONS)))
    for x, y in zip(a, b):
        assert y["selected"] == x["selected"]
        for key in ("log_ppl", "log_ppl_after"):
            if x.get(key) is not None:
                assert y[key] == pytest.approx(x[key], abs=1e-5)
    sa, sb = json.loads((plain / "tlm_summary.json").read_text()), json.loads((ds / "tlm_summary.json").read_text())
    for key in ("n_selected", "backward_passes", "optimizer_steps", "skipped_steps"):
        assert sb[key] == sa[key], key
    assert sb["optimizer_steps"] == (2 * len(QUESTIONS) if mode == "per_prompt" else sb["n_selected"])
    preds_a = read_jsonl(plain / "generated_predictions.jsonl")
    preds_b = read_jsonl(ds / "generated_predictions.jsonl")
    assert [p["predict"] for p in preds_b] == [p["predict"] for p in preds_a]


def test_fp16_update_without_selection_never_reaches_the_grad_scaler(tiny_model, tiny_data, tmp_path, monkeypatch):
    """A window that selects nothing is skipped before clipping / unscaling; a later window steps normally."""
    from llamafactory.train.tuner import run_exp

    from tlm_plugin.train import trainer as trainer_module

    created = []
    original_init = trainer_module.TLMTrainer.__init__

    def with_cpu_scaler(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        self.accelerator.native_amp = True
        created.append(self)

    monkeypatch.setattr(trainer_module.TLMTrainer, "__init__", with_cpu_scaler)
    out = tmp_path / "out"
    # P0 near the median log-perplexity: the online stream holds updates with and without a selected row
    run_exp(
        base_recipe(
            tiny_model,
            tiny_data,
            out,
            fp16=True,
            tlm_mode="online",
            tlm_chunk_size=4,
            tlm_log_p0=5.99,
            lr_scheduler_type="constant",
            learning_rate=1e-2,
        )
    )
    (trainer,) = created
    assert trainer.accelerator.mixed_precision == "fp16" and trainer.accelerator.scaler is not None
    summary = json.loads((out / "tlm_summary.json").read_text())
    scores = read_jsonl(out / "tlm_scores.jsonl")
    assert 0 < summary["n_selected"] < len(QUESTIONS)
    assert summary["skipped_steps"] == len(QUESTIONS) - summary["n_selected"]
    assert summary["optimizer_steps"] + summary["overflow_steps"] == summary["n_selected"]
    assert sum(r["selected"] for r in scores) == summary["n_selected"]


@pytest.mark.skipif(
    not hasattr(torch.cpu.Stream, "record_event"),
    reason=f"torch {torch.__version__}'s CPU streams have no record_event, which FSDP2 needs to run on the CPU",
)
def test_no_grad_passes_run_in_lock_step_under_fsdp2(tiny_model, tmp_path):
    """Five rows over two FSDP2 ranks (3 and 2 rows, batches of different lengths): every forward and every
    generation is collective, and the results equal a single-process computation."""
    worker = Path(__file__).with_name("fsdp_worker.py")
    out = tmp_path / "fsdp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", str(worker), str(tiny_model), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = json.loads(out.read_text())
    single = subprocess.run(
        [sys.executable, str(worker), str(tiny_model), str(tmp_path / "single.json"), "--single"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    reference = json.loads((tmp_path / "single.json").read_text())
    assert sharded["sharded"] and not reference["sharded"]
    assert sharded["index"] == reference["index"] == list(range(5))
    assert sharded["nll"] == pytest.approx(reference["nll"], abs=1e-4)
    assert sharded["answers"] == reference["answers"]
