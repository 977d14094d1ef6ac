"""``stage: tlm`` in LlamaBoard (``llamafactory-cli webui``): the stage in the train tab's list, its main settings in
an accordion of their own, and what "Preview command" and "Start" make of them.

:func:`apply` runs once ``llamafactory.webui.interface`` is imported (the start-up hook hands it over). It adds the
stage to LLaMA-Factory's ``TRAINING_STAGES``, builds the accordion into the train tab (shown only while the stage is
chosen), and wraps LlamaBoard's runner so that a stage-tlm form becomes a stage-tlm recipe: the accordion's ``tlm_*``
values (those that do something in the chosen mode and method), ``do_predict`` and ``max_new_tokens``, checked as
``llamafactory-cli train`` will check them before anything starts. "Start" runs ``llamafactory-cli train`` like every
other stage; the run writes LlamaBoard's progress files (``running_log.txt``, ``trainer_log.jsonl``) through the
callbacks it shares with sft, and its end-of-run summary heads the output box. Every other stage is left as it was.

The fields, their choices and defaults come from the settings dataclasses and the registry, never restated here.
"""

import functools
import json
import logging
import os
import re
from dataclasses import fields
from typing import Any

import gradio as gr
from llamafactory.extras.constants import TRAINING_STAGES
from llamafactory.hparams import GeneratingArguments
from llamafactory.webui.common import get_save_dir
from llamafactory.webui.runner import Runner

from tlm_plugin import registry, seam
from tlm_plugin.hparams import REGISTERED, TLM_PREFIX, TLMArguments, TLMConfigError, inert_keys
from tlm_plugin.patch import STAGE, split_args
from tlm_plugin.settings.base import literal_choices
from tlm_plugin.train import outputs, report


logger = logging.getLogger(__name__)

STAGE_LABEL = "TLM (test-time learning)"
# The accordion, row by row: tlm_* settings, then the two generation keys a run needs to answer its prompts.
LAYOUT = (
    ("tlm_mode", "tlm_selector", "tlm_chunk_size"),
    ("tlm_lambda", "tlm_log_p0", "tlm_eval_answers"),
    ("do_predict", "max_new_tokens"),
)
TLM_FIELDS = tuple(key for row in LAYOUT for key in row if key.startswith(TLM_PREFIX))
_FIELDS = {f.name: f for f in fields(TLMArguments)}
DEFAULT_MAX_NEW_TOKENS = next(f.default for f in fields(GeneratingArguments) if f.name == "max_new_tokens")
_PATCHED_ATTR = "__tlm_plugin_patched__"


# ------------------------------------------------------------------------------------------------ the form, as data
def mode_choices() -> list[str]:
    """The modes ``llamafactory-cli train`` runs (``serve`` runs under ``llamafactory-cli api``)."""
    return [name for name, mode in registry.MODES.items() if mode.command == "train"]


def selector_choices(mode: str) -> list[str]:
    return [name for name in registry.METHODS if registry.impl(name, mode) is not None]


def _first_sentence(text: str) -> str:
    # A full stop ends the sentence unless a digit follows ("Eq. 6") or it closes "e.g." / "i.e.".
    return re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+(?=\D)", " ".join(text.split()), maxsplit=1)[0]


def field_spec(key: str) -> dict[str, Any]:
    """How the accordion shows ``tlm_*`` field ``key``: its widget (``dropdown``, ``checkbox`` or ``number``), default,
    choices, the first sentence of its help, and the range its metadata declares."""
    f = _FIELDS[key]
    spec: dict[str, Any] = {"key": key, "default": f.default, "info": _first_sentence(f.metadata["help"])}
    if key == "tlm_mode":  # its help describes every mode; the registry has one line per mode offered here
        spec["info"] = "; ".join(f"{name} - {registry.MODES[name].help}" for name in mode_choices())
    choices = None
    if key == "tlm_mode":
        choices = mode_choices()
    elif key == "tlm_selector":
        choices = selector_choices(_FIELDS["tlm_mode"].default)
    elif key in REGISTERED:
        choices = list(REGISTERED[key])
    elif literal_choices(f.type) is not None:
        choices = list(literal_choices(f.type))
    if choices is not None:
        return {**spec, "widget": "dropdown", "choices": choices}
    if f.type is bool:
        return {**spec, "widget": "checkbox"}
    return {**spec, "widget": "number", "integer": f.type is int, "minimum": f.metadata.get("low")}


def form_state(mode: str, selector: str) -> tuple[list[str], str, set[str]]:
    """For a chosen mode: the selectors it offers, the selector to show (``selector`` if the mode offers it, else the
    default or the first offered), and the accordion's ``tlm_*`` fields that do something in that run."""
    choices = selector_choices(mode)
    default = _FIELDS["tlm_selector"].default
    shown = selector if selector in choices else (default if default in choices else choices[0])
    try:
        inert = set(TLMArguments(tlm_mode=mode, tlm_selector=shown).inert_settings())
    except TLMConfigError:
        inert = set()
    return choices, shown, {key for key in TLM_FIELDS if key not in inert}


def _typed(key: str, value: Any) -> Any:
    """A form value as its field's type (a browser sends 3.0 as 3)."""
    return float(value) if _FIELDS[key].type is float and isinstance(value, int) else value


def tlm_recipe(args: dict[str, Any], form: dict[str, Any]) -> dict[str, Any]:
    """LlamaBoard's recipe ``args`` (stage tlm, extra configurations merged) with the accordion's ``form`` values.

    A ``tlm_*`` key of the extra configurations wins over the accordion's; an accordion key that does nothing in the
    chosen run is left out (the run refuses inert keys), one the user wrote is kept (and refused by :func:`check`).
    The ``tlm_*`` keys follow ``stage``; ``do_predict`` and ``max_new_tokens`` come from the form unless given.
    """
    given = {k: v for k, v in args.items() if k.startswith(TLM_PREFIX)}
    values = {key: _typed(key, form[key]) for key in TLM_FIELDS if key not in given}
    try:
        inert = inert_keys({**values, **given})
    except TLMConfigError:
        inert = set()  # the combination itself is wrong: check() says so
    tlm_values = {**{k: v for k, v in values.items() if k not in inert}, **given}
    recipe: dict[str, Any] = {}
    for key, value in args.items():
        if key.startswith(TLM_PREFIX):
            continue
        recipe[key] = value
        if key == "stage":
            recipe.update(tlm_values)
    if form.get("do_predict"):
        recipe.setdefault("do_predict", True)
        recipe.setdefault("max_new_tokens", int(form["max_new_tokens"]))
    return recipe


def check(recipe: dict[str, Any]) -> str:
    """What ``llamafactory-cli train`` would refuse in the recipe's stage-tlm part ('' when nothing)."""
    try:
        split_args(recipe)
    except TLMConfigError as err:
        return str(err)
    return ""


def summary_markdown(output_dir: str) -> str | None:
    """The end-of-run lines of a finished stage-tlm run in ``output_dir`` (as the command line prints them)."""
    if outputs.finished_run(output_dir) is None:
        return None
    with open(os.path.join(output_dir, outputs.SUMMARY_FILE), encoding="utf-8") as f:
        summary = json.load(f)
    return "```\n" + "\n".join(report.console_lines(summary, output_dir)) + "\n```"


# ------------------------------------------------------------------------------------------------ the components
def _component(key: str, visible: bool) -> gr.components.Component:
    if key == "do_predict":
        info = "Answer the test prompts with the adapted model (generated_predictions.jsonl)."
        return gr.Checkbox(value=True, label="do_predict", info=info, elem_id="tlm_do_predict")
    if key == "max_new_tokens":
        return gr.Slider(
            minimum=1,
            maximum=4096,
            value=DEFAULT_MAX_NEW_TOKENS,
            step=1,
            label="max_new_tokens",
            elem_id="tlm_max_new_tokens",
        )
    spec = field_spec(key)
    common = {"label": key, "info": spec["info"], "elem_id": key, "visible": visible}
    if spec["widget"] == "dropdown":
        return gr.Dropdown(choices=spec["choices"], value=spec["default"], **common)
    if spec["widget"] == "checkbox":
        return gr.Checkbox(value=spec["default"], **common)
    step = 1 if spec["integer"] else 0.01
    return gr.Number(value=spec["default"], precision=0 if spec["integer"] else None, step=step, **common)


def build_accordion() -> tuple[gr.Accordion, dict[str, gr.components.Component]]:
    """The stage-tlm accordion, not yet placed in a layout, and its input components by name."""
    _, _, useful = form_state(_FIELDS["tlm_mode"].default, _FIELDS["tlm_selector"].default)
    elems = {}
    with gr.Accordion(STAGE_LABEL + " settings", open=True, visible=False, render=False, elem_id="tlm_tab") as tab:
        for row in LAYOUT:
            with gr.Row():
                for key in row:
                    elems[key] = _component(key, visible=key in useful or key not in TLM_FIELDS)
        gr.Markdown(
            "Fields that do nothing in the chosen mode and method are hidden and left out of the recipe. Any other "
            "`tlm_*` setting (docs/options.md) goes into the extra configurations as JSON, e.g. "
            '`{"tlm_select_fraction": 0.5}`, and wins over the fields above.'
        )
    return tab, elems


def _visibility(mode: str, selector: str) -> list:
    _, _, useful = form_state(mode, selector)
    return [gr.update(visible=key in useful) for key in TLM_FIELDS]


def _on_mode(mode: str, selector: str) -> list:
    choices, shown, _ = form_state(mode, selector)
    return [gr.Dropdown(choices=choices, value=shown), *_visibility(mode, shown)]


def _connect(training_stage, tab, elems) -> None:
    """Show the accordion with the stage, keep the selector and the useful fields in step with the mode."""
    training_stage.change(
        lambda stage: gr.Accordion(visible=TRAINING_STAGES.get(stage) == STAGE), [training_stage], [tab], queue=False
    )
    mode, selector = elems["tlm_mode"], elems["tlm_selector"]
    shown = [elems[key] for key in TLM_FIELDS]
    mode.change(_on_mode, [mode, selector], [selector, *shown], queue=False)
    selector.change(_visibility, [mode, selector], shown, queue=False)
    elems["do_predict"].change(
        lambda on: gr.Slider(visible=on), [elems["do_predict"]], [elems["max_new_tokens"]], queue=False
    )


def _place_before(block, anchor) -> None:
    """Move ``block`` in its parent's layout to just before the row that holds ``anchor`` (the form's buttons)."""
    siblings = block.parent.children
    row = anchor.parent
    if row in siblings:
        siblings.remove(block)
        siblings.insert(siblings.index(row), block)


# ------------------------------------------------------------------------------------------------ the hooks
def _train_tab(create_train_tab):
    @functools.wraps(create_train_tab)
    def wrapped(engine):
        tab, elems = build_accordion()
        manager = engine.manager
        base_elems = manager.get_base_elems
        # LlamaBoard binds "Preview command", "Start", "Save arguments" and "Load arguments" to the inputs it gathers
        # from this call inside create_train_tab; the accordion's inputs join them there.
        manager.get_base_elems = lambda: base_elems() | set(elems.values())
        try:
            elem_dict = create_train_tab(engine)
        finally:
            del manager.get_base_elems
        tab.render()
        _place_before(tab, elem_dict["cmd_preview_btn"])
        _connect(elem_dict["training_stage"], tab, elems)
        return {**elem_dict, "tlm_tab": tab, **elems}

    return wrapped


def _is_tlm(runner, data) -> bool:
    stage = data.get(runner.manager.get_elem_by_id("train.training_stage"))
    return TRAINING_STAGES.get(stage) == STAGE


def _form(runner, data) -> dict[str, Any]:
    return {key: data[runner.manager.get_elem_by_id(f"train.{key}")] for row in LAYOUT for key in row}


def _wrap_initialize(initialize):
    @functools.wraps(initialize)
    def wrapped(self, data, do_train, from_preview):
        error = initialize(self, data, do_train, from_preview)
        if error or not do_train or not _is_tlm(self, data):
            return error
        return check(seam.webui_train_args(self, data))

    return wrapped


def _wrap_parse_train_args(parse_train_args):
    @functools.wraps(parse_train_args)
    def wrapped(self, data):
        args = parse_train_args(self, data)
        return tlm_recipe(args, _form(self, data)) if args.get("stage") == STAGE else args

    return wrapped


def _wrap_build_config_dict(build_config_dict):
    @functools.wraps(build_config_dict)
    def wrapped(self, data):
        config = build_config_dict(self, data)
        if _is_tlm(self, data):
            return config
        names = {f"train.{key}" for row in LAYOUT for key in row}
        return {elem_id: value for elem_id, value in config.items() if elem_id not in names}

    return wrapped


def _wrap_monitor(monitor):
    @functools.wraps(monitor)
    def wrapped(self):
        data = self.running_data
        output_dir = None
        if self.do_train and data is not None and _is_tlm(self, data):
            ids = ("top.model_name", "top.finetuning_type", "train.output_dir")
            output_dir = get_save_dir(*(data[self.manager.get_elem_by_id(elem_id)] for elem_id in ids))
        last = {}
        for update in monitor(self):
            last = update
            yield update
        summary = summary_markdown(output_dir) if output_dir is not None else None
        if summary is not None:
            output_box = self.manager.get_elem_by_id("train.output_box")
            yield {output_box: f"{summary}\n\n{last.get(output_box, '')}"}

    return wrapped


def apply(interface) -> None:
    """Add stage tlm to LlamaBoard (idempotent). Never raises: a moved internal leaves LlamaBoard as it was."""
    if getattr(interface, _PATCHED_ATTR, False):
        return
    setattr(interface, _PATCHED_ATTR, True)
    if not callable(getattr(interface, "create_train_tab", None)):
        logger.warning("stage tlm is not offered in LlamaBoard: llamafactory.webui.interface has no create_train_tab.")
        return
    try:
        seam.wrap_webui_runner(_wrap_initialize, _wrap_parse_train_args, _wrap_build_config_dict)
    except seam.SeamError as err:
        logger.warning("stage tlm is not offered in LlamaBoard: %s", err)
        return
    Runner.monitor = _wrap_monitor(Runner.monitor)
    interface.create_train_tab = _train_tab(interface.create_train_tab)
    TRAINING_STAGES[STAGE_LABEL] = STAGE
