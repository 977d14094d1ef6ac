"""Bad input is refused before the model loads, with an error that names the key, and nothing is written."""

from pathlib import Path

import pytest
from tlm_testing import QUESTIONS, base_recipe, write_dataset

from tlm_plugin.hparams import TLMConfigError


pytestmark = pytest.mark.slow


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail loudly if a refused run got as far as loading the model."""
    from tlm_plugin.train import workflow

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr(workflow, "load_model", refuse)


def refused(recipe: dict, match: str) -> None:
    from llamafactory.train.tuner import run_exp

    with pytest.raises((TLMConfigError, ValueError), match=match):
        run_exp(recipe)
    out = Path(recipe["output_dir"])
    assert not out.exists() or not any(out.iterdir()), f"a refused run wrote {sorted(p.name for p in out.iterdir())}"


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"tlm_log_p0": None}, "tlm_log_p0 cannot be null"),
        ({"tlm_mode": "online", "tlm_chunk_size": 10.5}, "tlm_chunk_size must be an integer"),
        ({"tlm_selector": "sift", "tlm_sift_embedder": "/no/such/encoder"}, "tlm_sift_embedder"),
        ({"tlm_chunk_size": 8}, "tlm_chunk_size has no effect"),
        ({"tlm_selector": "all", "tlm_select_fraction": 0.5}, "tlm_select_fraction has no effect"),
        ({"tlm_sift_lambda": 0.1}, "tlm_sift_lambda has no effect"),
        ({"use_dft_loss": True}, "use_dft_loss"),
        ({"use_asft_loss": True}, "use_asft_loss"),
        ({"val_size": 0.2}, "val_size"),
        ({"tlm_mode": "per_prompt", "tlm_selector": "sift", "do_train": False}, "do_train"),
        ({"tlm_mode": "online", "num_train_epochs": 2.0}, "num_train_epochs"),
    ],
)
def test_bad_settings_are_refused_before_the_model_loads(
    tiny_model, tiny_data, tmp_path, no_model_load, overrides, match
):
    recipe = {**base_recipe(tiny_model, tiny_data, tmp_path / "out"), **overrides}  # None values kept
    refused(recipe, match)


def test_an_empty_pool_is_refused_naming_tlm_pool_dataset(tiny_model, tiny_data, tmp_path, no_model_load):
    write_dataset(tiny_data, [], name="pool")
    recipe = base_recipe(tiny_model, tiny_data, tmp_path / "out", tlm_selector="sift", tlm_pool_dataset="pool")
    refused(recipe, "tlm_pool_dataset 'pool' could not be read, or has no rows")


def test_a_multimodal_dataset_is_refused(tiny_model, tmp_path, no_model_load):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (4, 4)).save(data / "cat.png")
    rows = [{"instruction": f"<image>{q}", "input": "", "output": a, "images": ["cat.png"]} for q, a in QUESTIONS[:3]]
    write_dataset(
        data, rows, columns={"prompt": "instruction", "query": "input", "response": "output", "images": "images"}
    )
    refused(base_recipe(tiny_model, data, tmp_path / "out"), "has images .* learns from text prompts only")


def test_unknown_eval_dataset_is_refused_before_the_model_loads(tiny_model, tiny_data, tmp_path, no_model_load):
    recipe = base_recipe(tiny_model, tiny_data, tmp_path / "out", do_predict=True, eval_dataset="nope")
    refused(recipe, "nope")
