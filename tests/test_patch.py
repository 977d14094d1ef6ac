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
    argv = ["--stage", "tlm", "--tlm_lambda", "0.2", "--tlm_mode", "online", "--tlm_chunk_size=7", "--do_train"]
    tlm_args, rest = patch.split_args(argv + ["--dataset", "x"])
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
        ("tlm_lambda", "abc", "tlm_lambda must be a number"),
        ("tlm_chunk_size", 0, "tlm_chunk_size"),
        ("tlm_mode", "sometimes", "tlm_mode must be one of"),
        ("tlm_selector", "magic", "tlm_selector must be one of"),
        ("tlm_reset", "always", "tlm_reset"),
        ("tlm_log_p0", float("nan"), "tlm_log_p0"),
        ("tlm_log_p0", None, "tlm_log_p0 cannot be null"),
        ("tlm_lambda", True, "tlm_lambda must be a number"),
        ("tlm_sift_budget", 2.5, "tlm_sift_budget must be an integer"),
        ("tlm_mode", 1, "tlm_mode must be one of"),
        ("tlm_score_prefix_cache", "maybe", "tlm_score_prefix_cache must be true or false"),
        ("tlm_sift_embedder", "/no/such/encoder", "tlm_sift_embedder.*/no/such/encoder"),
    ],
)
def test_out_of_range_values_name_the_key(key, value, match):
    with pytest.raises(TLMConfigError, match=match):
        patch.split_args({"stage": "tlm", key: value})


def test_wrongly_typed_chunk_size_names_the_key_even_with_an_integer_float():
    with pytest.raises(TLMConfigError, match="tlm_chunk_size must be an integer, got 10.5"):
        patch.split_args({"stage": "tlm", "tlm_mode": "online", "tlm_chunk_size": 10.5})
    tlm_args, _ = patch.split_args({"stage": "tlm", "tlm_mode": "online", "tlm_chunk_size": 10.0})
    assert tlm_args.tlm_chunk_size == 10 and isinstance(tlm_args.tlm_chunk_size, int)


@pytest.mark.parametrize(
    "recipe,key",
    [
        ({"tlm_chunk_size": 10}, "tlm_chunk_size"),  # offline has no chunks
        ({"tlm_selector": "all", "tlm_select_fraction": 0.5}, "tlm_select_fraction"),
        ({"tlm_selector": "all", "tlm_lambda": 0.2}, "tlm_lambda"),
        ({"tlm_sift_budget": 5}, "tlm_sift_budget"),  # no pool selector
        ({"tlm_selector": "nearest", "tlm_sift_alpha": 1.0}, "tlm_sift_alpha"),
        ({"tlm_entropy_tokens": 20}, "tlm_entropy_tokens"),  # objective is perplexity
        ({"tlm_prompt_epochs": 2}, "tlm_prompt_epochs"),  # not per prompt
        ({"tlm_selector": "sift", "tlm_mode": "per_prompt", "tlm_log_p0": 2.0}, "tlm_log_p0"),
    ],
)
def test_settings_that_would_do_nothing_are_refused_naming_the_key(recipe, key):
    with pytest.raises(TLMConfigError, match=f"{key} has no effect in this run"):
        patch.split_args({"stage": "tlm", **recipe})


def test_settings_that_matter_in_their_mode_are_accepted():
    for recipe in (
        {"tlm_mode": "online", "tlm_chunk_size": 10, "tlm_select_fraction": 0.5},
        {"tlm_selector": "sift", "tlm_sift_budget": 5, "tlm_log_p0": 2.0, "tlm_lambda": 0.2},
        {"tlm_selector": "random", "tlm_mode": "per_prompt", "tlm_sift_budget": 3, "tlm_prompt_epochs": 2},
        {"tlm_objective": "eata", "tlm_eata_e0": 0.5, "tlm_entropy_tokens": 16},
    ):
        patch.split_args({"stage": "tlm", **recipe})


@pytest.mark.parametrize(
    "key",
    [
        "packing",
        "neat_packing",
        "train_on_prompt",
        "mask_history",
        "use_mca",
        "use_dft_loss",
        "use_eaft_loss",
        "use_asft_loss",
    ],
)
def test_options_that_cannot_work_with_tlm_are_rejected(key):
    with pytest.raises(TLMConfigError, match=key):
        patch.split_args({"stage": "tlm", key: True})
    with pytest.raises(TLMConfigError, match=key):
        patch.split_args(["--stage", "tlm", f"--{key}", "true"])


def test_prediction_keys_are_taken_out_of_the_sft_recipe():
    """Stage tlm answers the prompts itself, so LLaMA-Factory never sees do_predict (nor its ZeRO-3 refusal)."""
    tlm_args, rest = patch.split_args({"stage": "tlm", "dataset": "a,b", "do_predict": True})
    assert "do_predict" not in rest and "predict_with_generate" not in rest and "eval_dataset" not in rest
    assert tlm_args.predict == (True, None)
    tlm_args, rest = patch.split_args({"stage": "tlm", "dataset": "a", "do_predict": True, "eval_dataset": "c"})
    assert tlm_args.predict == (True, "c")
    argv = ["--stage", "tlm", "--do_predict", "--eval_dataset", "c", "--predict_with_generate=true", "--x", "1"]
    tlm_args, rest = patch.split_args(argv)
    assert rest == ["--stage", "sft", "--x", "1"] and tlm_args.predict == (True, "c")


def test_missing_hook_point_only_disables_stage_tlm():
    calls = []
    fake = types.ModuleType("llamafactory.train.tuner")
    fake.read_args = lambda a: a
    fake.run_exp = lambda args=None, callbacks=None: calls.append(args)
    patch.apply(fake)  # no _training_function: never raises at import
    fake.run_exp({"stage": "sft", "dataset": "x"})
    assert calls == [{"stage": "sft", "dataset": "x"}]
    with pytest.raises(patch.TLMPatchError, match="_training_function"):
        fake.run_exp({"stage": "tlm", "dataset": "x"})


def test_stage_tlm_never_goes_through_llamafactory_routing(monkeypatch):
    """A positive check: the TLM run is reached by construction, whatever LLaMA-Factory's router would do."""
    reached = []
    fake = types.ModuleType("llamafactory.train.tuner")
    fake.read_args = lambda a: a
    fake._training_function = lambda config: reached.append("llamafactory routing")
    monkeypatch.setattr(patch, "_run_tlm", lambda tlm_args, rest, callbacks: reached.append(("tlm", rest)))
    patch.apply(fake)
    fake._training_function({"args": {"stage": "tlm", "dataset": "x", "use_megatron_bridge": True}})
    fake._training_function({"args": {"stage": "sft", "dataset": "x"}})
    assert reached == [("tlm", {"stage": "sft", "dataset": "x", "use_megatron_bridge": True}), "llamafactory routing"]


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


# ------------------------------------------------------------------------------------------ command-line switches
DEMO_RECIPE = {
    "stage": "tlm",
    "do_train": True,
    "tlm_mode": "offline",
    "tlm_lambda": 0.1,
    "tlm_log_p0": 3.0,
    "tlm_selector": "perplexity",
}


def test_a_command_line_switch_to_per_prompt_sift_drops_what_it_makes_inert_with_one_warning(caplog):
    overrides = {"tlm_mode": "per_prompt", "tlm_selector": "sift"}
    with caplog.at_level("WARNING", logger="tlm_plugin.patch"):
        tlm_args, _ = patch.split_args({**DEMO_RECIPE, **overrides}, overrides)
    assert (tlm_args.tlm_mode, tlm_args.tlm_selector) == ("per_prompt", "sift")
    warned = [r.getMessage() for r in caplog.records if r.name == "tlm_plugin.patch"]
    assert len(warned) == 1 and "tlm_lambda" in warned[0] and "tlm_log_p0" in warned[0]


def test_the_same_settings_written_in_the_recipe_itself_are_still_refused():
    recipe = {**DEMO_RECIPE, "tlm_mode": "per_prompt", "tlm_selector": "sift"}
    with pytest.raises(TLMConfigError, match="tlm_lambda has no effect"):
        patch.split_args(recipe, {})


def test_a_switch_keeps_refusing_what_contradicts_the_chosen_run():
    overrides = {"tlm_mode": "online"}
    recipe = {**DEMO_RECIPE, "tlm_selector": "sift"}
    with pytest.raises(TLMConfigError, match="tlm_selector: sift works in"):
        patch.split_args({**recipe, **overrides}, overrides)


def test_a_recipe_key_inert_before_the_switch_is_not_dropped_by_it():
    recipe = {**DEMO_RECIPE, "tlm_chunk_size": 8}  # inert in offline mode, before any override
    overrides = {"tlm_selector": "all"}
    with pytest.raises(TLMConfigError, match="tlm_chunk_size has no effect"):
        patch.split_args({**recipe, **overrides}, overrides)


def test_a_null_override_removes_a_key_that_cannot_be_null():
    overrides = {"tlm_lambda": None}
    tlm_args, _ = patch.split_args({**DEMO_RECIPE, "tlm_lambda": 0.5, **overrides}, overrides)
    assert tlm_args.tlm_lambda == 0.1  # the field's default, not the recipe's 0.5


def test_command_line_overrides_are_read_as_llamafactory_reads_them():
    argv = ["llamafactory-cli", "recipe.yaml", "tlm_mode=per_prompt", "learning_rate=1e-4"]
    assert patch.command_line_overrides(argv) == {"tlm_mode": "per_prompt", "learning_rate": 1e-4}
    assert patch.command_line_overrides(["llamafactory-cli", "--stage", "tlm"]) is None


def test_the_former_spelling_of_the_per_prompt_mode_still_works_with_one_deprecation_warning():
    recipe = {"stage": "tlm", "do_train": True, "tlm_reset": "prompt", "tlm_selector": "nearest"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tlm_args, _ = patch.split_args(recipe)
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(deprecations) == 1 and "tlm_mode: per_prompt" in str(deprecations[0].message)
    assert (tlm_args.tlm_mode, tlm_args.tlm_reset, tlm_args.tlm_gate_stream) == ("per_prompt", "never", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        online, _ = patch.split_args({**recipe, "tlm_mode": "online"})  # the former spelling of a streaming gate
    assert (online.tlm_mode, online.tlm_gate_stream) == ("per_prompt", True)
