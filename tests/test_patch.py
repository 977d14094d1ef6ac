"""Recipe splitting, validation of tlm_* settings, and the hook into LLaMA-Factory."""

import subprocess
import sys
import types
import warnings

import pytest

from tlm_plugin import patch
from tlm_plugin.hparams import TLMConfigError


def test_yaml_dict_is_split_into_tlm_args_and_an_sft_recipe():
    tlm_args, rest = patch.split_args({"stage": "tlm", "tlm_lambda": 0.2, "tlm_mode": "online", "dataset": "x"})
    assert tlm_args.tlm_lambda == 0.2 and tlm_args.tlm_mode == "online"
    assert rest == {"stage": "sft", "dataset": "x"}


def test_command_line_flags_are_split_and_converted():
    argv = ["--stage", "tlm", "--tlm_lambda", "0.2", "--tlm_chunk_size=7", "--do_train", "--dataset", "x"]
    tlm_args, rest = patch.split_args(argv)
    assert tlm_args.tlm_lambda == 0.2 and tlm_args.tlm_chunk_size == 7
    assert rest == ["--stage", "sft", "--do_train", "--dataset", "x"]


def test_other_stages_pass_through_untouched():
    recipe = {"stage": "sft", "dataset": "x"}
    assert patch.split_args(recipe) == (None, recipe)
    assert patch.split_args(["--stage", "pt"]) == (None, ["--stage", "pt"])


def test_tlm_keys_without_stage_tlm_are_an_error():
    with pytest.raises(TLMConfigError, match="tlm_lambda"):
        patch.split_args({"stage": "sft", "tlm_lambda": 0.2})


def test_unknown_tlm_key_names_the_key_and_suggests():
    with pytest.raises(TLMConfigError, match="tlm_lamda.*Did you mean tlm_lambda"):
        patch.split_args({"stage": "tlm", "tlm_lamda": 0.2})


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("tlm_lambda", 0, "tlm_lambda"),
        ("tlm_lambda", "abc", "tlm_lambda must be float"),
        ("tlm_chunk_size", 0, "tlm_chunk_size"),
        ("tlm_mode", "sometimes", "tlm_mode must be one of"),
        ("tlm_selector", "magic", "tlm_selector must be one of"),
        ("tlm_reset", "always", "tlm_reset"),
        ("tlm_log_p0", float("nan"), "tlm_log_p0"),
    ],
)
def test_out_of_range_values_name_the_key(key, value, match):
    with pytest.raises(TLMConfigError, match=match):
        patch.split_args({"stage": "tlm", key: value})


@pytest.mark.parametrize("key", ["packing", "neat_packing", "train_on_prompt", "mask_history", "use_mca"])
def test_options_that_cannot_work_with_tlm_are_rejected(key):
    with pytest.raises(TLMConfigError, match=key):
        patch.split_args({"stage": "tlm", key: True})
    with pytest.raises(TLMConfigError, match=key):
        patch.split_args(["--stage", "tlm", f"--{key}", "true"])


def test_do_predict_fills_in_generation_and_predicts_the_test_prompts():
    _, rest = patch.split_args({"stage": "tlm", "dataset": "a,b", "do_predict": True})
    assert rest["predict_with_generate"] is True and rest["eval_dataset"] == "a,b"
    _, rest = patch.split_args({"stage": "tlm", "dataset": "a", "do_predict": True, "eval_dataset": "c"})
    assert rest["eval_dataset"] == "c"


def test_missing_seam_is_a_clear_error_not_a_silent_fallback():
    fake = types.ModuleType("llamafactory.train.tuner")
    fake.read_args = lambda a: a
    with pytest.raises(patch.TLMPatchError, match="_training_function"):
        patch.apply(fake)


def test_untested_version_warns(monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch._version_check("0.9.1")
        patch._version_check("0.9.5")
    assert len(caught) == 1 and "0.9.1" in str(caught[0].message)


def test_start_up_hook_patches_a_fresh_interpreter_and_can_be_disabled():
    code = "import llamafactory.train.tuner as t; print(getattr(t, '__tlm_plugin_patched__', False))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("True")
    env = {"LLAMAFACTORY_TLM_DISABLE": "1", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().endswith("False")
    code = "import tlm_plugin; tlm_plugin.install(); " + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip().endswith("True")
