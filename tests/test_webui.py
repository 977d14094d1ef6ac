"""Stage tlm in LlamaBoard without a browser: the stage is listed only with the plugin enabled, the accordion's
fields come from the settings dataclasses and the registry, and "Preview command" holds the stage-tlm recipe.

The browser test (a real run started from the page) is tests/ui/test_webui.py.
"""

import importlib
import json
import os
import subprocess
import sys
import types
from dataclasses import fields

import gradio as gr
import pytest
from llamafactory.extras.constants import TRAINING_STAGES
from llamafactory.webui.components import create_top
from llamafactory.webui.engine import Engine
from llamafactory.webui.runner import Runner

import tlm_plugin
from tlm_plugin import registry, seam, webui
from tlm_plugin.hparams import TLMArguments
from tlm_plugin.settings.base import literal_choices
from tlm_plugin.train import outputs


DEFAULTS = {f.name: f.default for f in fields(TLMArguments)}


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """LlamaBoard's top bar and train tab, built as ``create_ui`` builds them (the Engine writes into the cwd)."""
    interface = importlib.import_module("llamafactory.webui.interface")
    tlm_plugin.install()  # the start-up hook has done it already unless LLAMAFACTORY_TLM_DISABLE is set here
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("llamaboard"))
    try:
        engine = Engine()
        with gr.Blocks():
            engine.manager.add_elems("top", create_top())
            with gr.Tab("Train"):
                engine.manager.add_elems("train", interface.create_train_tab(engine))
        yield engine
    finally:
        os.chdir(cwd)


def form(engine, stage=webui.STAGE_LABEL, **values):
    """The values "Preview command" receives: every input at its initial value, a model, a dataset, ``values``."""
    manager = engine.manager
    data = {elem: getattr(elem, "value", None) for elem in manager.get_elem_list()}
    chosen = {
        "top.lang": "en",
        "top.model_name": "Custom",
        "top.model_path": "/models/tiny",
        "train.training_stage": stage,
        "train.dataset": ["tiny"],
        "train.output_dir": "train_x",
        **{(k if "." in k else f"train.{k}"): v for k, v in values.items()},
    }
    for elem_id, value in chosen.items():
        data[manager.get_elem_by_id(elem_id)] = value
    return data


def preview(engine, data) -> str:
    (update,) = engine.runner.preview_train(data)
    return update[engine.manager.get_elem_by_id("train.output_box")]


def test_the_stage_is_offered_only_with_the_plugin_enabled():
    code = (
        "import llamafactory.webui.interface as ui; from llamafactory.extras.constants import TRAINING_STAGES as s; "
        "print(s.get('TLM (test-time learning)'), hasattr(ui.create_train_tab, '__wrapped__'))"
    )

    def run(env):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout

    env = {k: v for k, v in os.environ.items() if k != "LLAMAFACTORY_TLM_DISABLE"}
    assert run(env).split()[-2:] == ["tlm", "True"]
    assert run({**env, "LLAMAFACTORY_TLM_DISABLE": "1"}).split()[-2:] == ["None", "False"]


def test_the_stage_is_listed_and_its_accordion_holds_the_settings_with_their_defaults(board):
    stages = [value for _, value in board.manager.get_elem_by_id("train.training_stage").choices]
    assert stages[-1] == webui.STAGE_LABEL
    assert board.manager.get_elem_by_id("train.tlm_tab").visible is False  # shown once the stage is chosen
    for key in webui.TLM_FIELDS:
        assert board.manager.get_elem_by_id(f"train.{key}").value == DEFAULTS[key], key


def test_the_accordion_choices_come_from_the_registry_and_the_literals(board):
    mode = board.manager.get_elem_by_id("train.tlm_mode")
    assert [value for _, value in mode.choices] == [m for m in registry.MODES if registry.MODES[m].command == "train"]
    selector = board.manager.get_elem_by_id("train.tlm_selector")
    offline = [name for name in registry.METHODS if "offline" in registry.METHODS[name].impls]
    assert [value for _, value in selector.choices] == offline
    # a Literal-typed setting gets its choices from the annotation
    by_name = {f.name: f for f in fields(TLMArguments)}
    assert webui.field_spec("tlm_loss_tokens")["choices"] == list(literal_choices(by_name["tlm_loss_tokens"].type))
    assert webui.field_spec("tlm_chunk_size")["minimum"] == by_name["tlm_chunk_size"].metadata["low"]


def test_the_form_follows_the_mode():
    choices, shown, useful = webui.form_state("per_prompt", "perplexity")
    assert "perplexity" not in choices and shown == choices[0]
    assert "tlm_chunk_size" not in useful and "tlm_lambda" not in useful
    assert "tlm_chunk_size" in webui.form_state("online", "perplexity")[2]
    assert {"tlm_lambda", "tlm_log_p0"} <= webui.form_state("offline", "perplexity")[2]


def test_the_preview_command_holds_stage_tlm_and_the_tlm_keys(board):
    command = preview(board, form(board, tlm_eval_answers=True, tlm_log_p0=3))  # a browser sends 3.0 as 3
    for flag in (
        "--stage tlm",
        "--tlm_mode offline",
        "--tlm_selector perplexity",
        "--tlm_lambda 0.1",
        "--tlm_log_p0 3.0",
        "--tlm_eval_answers True",
        "--do_predict True",
        f"--max_new_tokens {webui.DEFAULT_MAX_NEW_TOKENS}",
    ):
        assert flag in command, flag
    assert "--tlm_chunk_size" not in command  # does nothing offline, so left out (the run would refuse it)
    online = preview(board, form(board, tlm_mode="online", tlm_chunk_size=4, num_train_epochs="1.0"))
    assert "--tlm_mode online" in online and "--tlm_chunk_size 4" in online


def test_the_recipe_is_what_llamafactory_cli_train_accepts(board):
    recipe = seam.webui_train_args(board.runner, form(board))
    keys = list(recipe)
    assert keys[keys.index("stage") + 1 : keys.index("stage") + 5] == [
        "tlm_mode",
        "tlm_selector",
        "tlm_lambda",
        "tlm_log_p0",
    ]
    assert webui.check(recipe) == ""


def test_extra_arguments_win_and_a_wrong_combination_is_named_before_the_start(board):
    extra = json.dumps({"optim": "adamw_torch", "tlm_lambda": 0.5})
    assert "--tlm_lambda 0.5" in preview(board, form(board, extra_args=extra))
    wrong = json.dumps({"tlm_selector": "sift", "tlm_mode": "online"})
    with pytest.warns(UserWarning, match="sift works in"):  # LlamaBoard's warning toast, outside a browser
        message = preview(board, form(board, extra_args=wrong))
    assert "tlm_selector: sift works in" in message and "--stage" not in message


def test_other_stages_build_the_recipe_they_built_before(board):
    data = form(board, stage="Supervised Fine-Tuning", tlm_mode="online")
    recipe = seam.webui_train_args(board.runner, data)
    assert recipe == Runner._parse_train_args.__wrapped__(board.runner, data)
    assert recipe["stage"] == "sft" and not any(k.startswith("tlm_") or k == "do_predict" for k in recipe)
    saved = Runner._build_config_dict(board.runner, data)
    assert not any(elem_id.split(".")[1] in webui.TLM_FIELDS for elem_id in saved)
    assert "--stage sft" in preview(board, data)


def test_a_finished_run_shows_its_summary(tmp_path):
    assert webui.summary_markdown(str(tmp_path)) is None
    summary = {"mode": "offline", "settings": {"tlm_selector": "perplexity"}, "n_prompts": 12, "n_selected": 12}
    summary.update(optimizer_steps=12, skipped_steps=0, mean_log_ppl_before=6.0, mean_log_ppl_after=5.5)
    (tmp_path / outputs.SUMMARY_FILE).write_text(json.dumps(summary), encoding="utf-8")
    outputs.write_identity(str(tmp_path), "x", "offline")
    assert webui.summary_markdown(str(tmp_path)) is None  # not finished yet
    outputs.mark_finished(str(tmp_path))
    text = webui.summary_markdown(str(tmp_path))
    assert "stage tlm: offline / perplexity, 12 prompts" in text and "6.0000 -> 5.5000" in text


def test_a_moved_runner_method_leaves_llamaboard_as_it_was(monkeypatch, caplog):
    interface = types.ModuleType("interface")
    interface.create_train_tab = create_train_tab = lambda engine: {}
    monkeypatch.delattr(Runner, "_build_config_dict")
    initialize, monitor = Runner._initialize, Runner.monitor
    stages = dict(TRAINING_STAGES)
    TRAINING_STAGES.pop(webui.STAGE_LABEL, None)
    try:
        webui.apply(interface)
        assert webui.STAGE_LABEL not in TRAINING_STAGES
    finally:
        TRAINING_STAGES.clear()
        TRAINING_STAGES.update(stages)
    assert interface.create_train_tab is create_train_tab
    assert Runner._initialize is initialize and Runner.monitor is monitor
    assert "_build_config_dict" in caplog.text and "not offered in LlamaBoard" in caplog.text
