"""The hook into LLaMA-Factory's tuner: ``stage: tlm`` runs the TLM workflow, every other stage runs untouched.

"Parse as sft, run as tlm": when a recipe says ``stage: tlm``, the ``tlm_*`` keys are parsed into
:class:`~tlm_plugin.hparams.TLMArguments`, LLaMA-Factory parses and validates the rest as an ``sft`` recipe (so every
model/data/training option keeps its meaning), and :func:`tlm_plugin.train.workflow.run_tlm` runs with the callbacks
LLaMA-Factory gives an sft run. The TLM run never goes through LLaMA-Factory's routing of stages, so a new routing
option of a later release can never send a ``stage: tlm`` recipe to another workflow: reaching ``run_tlm`` is by
construction, not by a list of options to refuse. One private name is hooked, ``tuner._training_function`` (called by
``run_exp`` in every process: torchrun workers and Ray workers included); all internals go through
:mod:`tlm_plugin.seam`. If it is gone, only ``stage: tlm`` fails (with a clear error); other commands keep working.
"""

import contextvars
import functools
import logging
import sys
import warnings
from types import ModuleType
from typing import Any

import torch.distributed as dist
from llamafactory.extras.env import VERSION
from omegaconf import OmegaConf
from packaging.version import Version

from tlm_plugin import registry, seam
from tlm_plugin.hparams import (
    TLM_PREFIX,
    TLMArguments,
    TLMConfigError,
    nullable,
    parse_tlm_args,
    switch_inert_keys,
)
from tlm_plugin.train import outputs
from tlm_plugin.train.workflow import run_tlm


logger = logging.getLogger(__name__)

TESTED_RANGE = ("0.9.5", "0.10.0")  # [min, max): versions this plugin was tested with
STAGE = "tlm"
_PATCHED_ATTR = "__tlm_plugin_patched__"

# Options that cannot work with stage tlm (it never routes to their workflows; refusing says why).

_INCOMPATIBLE = {
    "use_mca": "Megatron-core (use_mca) training has its own workflow",
    "use_hyper_parallel": "hyper_parallel training has its own workflow",
    "packing": "packing merges prompts, but TLM scores and weights each prompt on its own",
    "neat_packing": "packing merges prompts, but TLM scores and weights each prompt on its own",
    "train_on_prompt": "it adds the reference answer to the training targets (TLM never trains on answers)",
    "mask_history": "it only applies to supervised multi-turn answers, which TLM never trains on",
    "use_dft_loss": "it replaces the supervised loss of sft, which stage tlm does not use",
    "use_eaft_loss": "it replaces the supervised loss of sft, which stage tlm does not use",
    "use_asft_loss": "it replaces the supervised loss of sft, which stage tlm does not use",
}

_active: contextvars.ContextVar[TLMArguments | None] = contextvars.ContextVar("tlm_args", default=None)


class TLMPatchError(RuntimeError):
    """The installed LLaMA-Factory lacks the seam this plugin hooks."""


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _split_dict(args: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    tlm_values = {k: v for k, v in args.items() if k.startswith(TLM_PREFIX)}
    if args.get("stage") != STAGE:
        if tlm_values:
            raise TLMConfigError(
                f"{', '.join(tlm_values)} only apply to stage: tlm (the recipe says stage: "
                f"{args.get('stage', 'sft')})."
            )
        return None, args
    rest = {k: v for k, v in args.items() if not k.startswith(TLM_PREFIX)}
    rest["stage"] = "sft"
    return tlm_values, rest


def _split_list(argv: list[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """Command-line flags: ``--stage tlm``, ``--tlm_x v`` and ``--tlm_x=v``."""
    rest, tlm_values, stage, i = [], {}, None, 0
    while i < len(argv):
        token = argv[i]
        name, eq, inline = token.partition("=")
        key = name[2:] if name.startswith("--") else None
        takes_next = not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        value = inline if eq else (argv[i + 1] if takes_next else "true")
        if key == "stage":
            stage = value
            rest += ["--stage", "sft" if value == STAGE else value]
        elif key is not None and key.startswith(TLM_PREFIX):
            tlm_values[key] = value
        else:
            rest.append(token)
            i += 1
            continue
        i += 1 if eq or not takes_next else 2
    if stage != STAGE:
        if tlm_values:
            raise TLMConfigError(f"{', '.join(tlm_values)} only apply to --stage tlm.")
        return None, argv
    return tlm_values, rest


def command_line_overrides(argv: list[str] | None = None) -> dict[str, Any] | None:
    """The ``key=value`` overrides after a recipe file on the command line (``llamafactory-cli train r.yaml k=v``),
    read as LLaMA-Factory's ``read_args`` reads them; None when the command line names no recipe file."""
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or not argv[1].endswith((".yaml", ".yml", ".json")):
        return None
    return OmegaConf.to_container(OmegaConf.from_cli(argv[2:]))


def _overrides_of(tuner: ModuleType, args: Any) -> dict[str, Any] | None:
    """The command-line overrides behind ``args`` when ``args`` is what ``llamafactory-cli train recipe k=v`` read
    (``run_exp`` reads the command line before the training function sees it), else None."""
    overrides = command_line_overrides()
    if overrides is None or not isinstance(args, dict):
        return None
    return overrides if tuner.read_args(None) == args else None


def _apply_switch(tlm_values: dict[str, Any], overrides: dict[str, Any] | None) -> set[str]:
    """Settings of the recipe that a command-line switch of mode / selector / objective made inert.

    An override of ``null`` for a setting that cannot be null removes the setting (its default applies).
    Returns the keys to drop; a warning line names them.
    """
    if not overrides:
        return set()
    tlm_overrides = {k: v for k, v in overrides.items() if k.startswith(TLM_PREFIX)}
    removed = {k for k, v in tlm_overrides.items() if v is None and not nullable(k)}
    for key in removed:
        tlm_values.pop(key, None)
    recipe = {k: v for k, v in tlm_values.items() if k not in tlm_overrides}
    switched = switch_inert_keys(recipe, {k: v for k, v in tlm_overrides.items() if k not in removed})
    if switched:
        logger.warning(
            "stage tlm: the command line switched the run; dropped the recipe's %s (no effect in this run).",
            ", ".join(sorted(switched)),
        )
    return switched


def split_args(args: Any, overrides: dict[str, Any] | None = None) -> tuple[TLMArguments | None, Any]:
    """Separate a recipe into (TLM arguments or None, what LLaMA-Factory parses as an sft recipe).

    ``overrides``: the command-line ``key=value`` part of ``args`` (:func:`command_line_overrides`), so that a
    switch of mode or method on the command line drops the recipe's settings it makes inert instead of refusing them.
    """
    if isinstance(args, dict):
        tlm_values, rest = _split_dict(args)
    else:
        tlm_values, rest = _split_list(list(args))
    if tlm_values is None:
        return None, args
    switched = _apply_switch(tlm_values, overrides)
    tlm_args = parse_tlm_args(tlm_values, switched=switched)
    _check_compatible(rest)
    rest, do_predict, eval_dataset = _take_prediction_keys(rest)
    tlm_args.predict = (do_predict, eval_dataset)  # applied in _run_tlm: stage tlm answers the prompts itself
    return tlm_args, rest


def _get(rest: Any, key: str) -> Any:
    if isinstance(rest, dict):
        return rest.get(key)
    for i, token in enumerate(rest):
        if token == f"--{key}":
            nxt = rest[i + 1] if i + 1 < len(rest) else None
            return "true" if nxt is None or nxt.startswith("--") else nxt
        if token.startswith(f"--{key}="):
            return token.split("=", 1)[1]
    return None


def _set(rest: Any, key: str, value: Any) -> Any:
    if isinstance(rest, dict):
        return {**rest, key: value}
    return [*rest, f"--{key}", str(value)]


def _check_compatible(rest: Any) -> None:
    for key, why in _INCOMPATIBLE.items():
        if _truthy(_get(rest, key)):
            raise TLMConfigError(f"{key} cannot be used with stage: tlm: {why}.")


PREDICTION_KEYS = ("do_predict", "predict_with_generate", "eval_dataset")


def _take_prediction_keys(rest: Any) -> tuple[Any, bool, str | None]:
    """Remove ``do_predict`` / ``predict_with_generate`` / ``eval_dataset`` from the sft part of a recipe.

    Stage tlm generates its answers itself, in between or after its updates and under every backend, so
    LLaMA-Factory's sft predict path (and its rules: ``predict_with_generate`` required, refused under ZeRO-3) does
    not apply. Returns the recipe without them, whether to predict, and the eval dataset names (None: the test
    prompts themselves).
    """
    do_predict = _truthy(_get(rest, "do_predict"))
    eval_dataset = _get(rest, "eval_dataset")
    if isinstance(rest, dict):
        return {k: v for k, v in rest.items() if k not in PREDICTION_KEYS}, do_predict, eval_dataset
    kept, i = [], 0
    while i < len(rest):
        name = rest[i].split("=", 1)[0]
        if name.startswith("--") and name[2:] in PREDICTION_KEYS:
            has_value = "=" not in rest[i] and i + 1 < len(rest) and not rest[i + 1].startswith("--")
            i += 2 if has_value else 1
            continue
        kept.append(rest[i])
        i += 1
    return kept, do_predict, eval_dataset


def current_tlm_args() -> TLMArguments | None:
    return _active.get()


def _version_check(version: str) -> None:
    low, high = TESTED_RANGE
    if not (Version(low) <= Version(version) < Version(high)):
        warnings.warn(
            f"llamafactory-tlm was tested with llamafactory>={low},<{high}; found {version}. "
            "stage: tlm may still work; please report problems.",
            stacklevel=2,
        )


def apply(tuner: ModuleType) -> None:
    """Patch ``llamafactory.train.tuner`` (idempotent). Never raises: a missing seam only disables stage tlm."""
    if getattr(tuner, _PATCHED_ATTR, False):
        return
    _version_check(VERSION)
    setattr(tuner, _PATCHED_ATTR, True)

    if not (callable(getattr(tuner, "_training_function", None)) and callable(getattr(tuner, "read_args", None))):
        _refuse_tlm_in_run_exp(tuner)
        return
    original_training_function = tuner._training_function

    @functools.wraps(original_training_function)
    def _training_function(config: dict[str, Any]) -> None:
        args = tuner.read_args(config.get("args"))
        tlm_args, rest = split_args(args, _overrides_of(tuner, args))
        if tlm_args is None:
            return original_training_function(config)
        return _run_tlm(tlm_args, rest, config.get("callbacks"))

    tuner._training_function = _training_function


def parse_recipe(args: Any):
    """A stage-tlm recipe (dict or flags) -> (tlm arguments, LLaMA-Factory's five argument objects), as a run sees
    them: the sft part parsed and validated by LLaMA-Factory, the prediction settings put back for stage tlm."""
    tlm_args, rest = split_args(args)
    if tlm_args is None:
        raise TLMConfigError("not a stage: tlm recipe")
    return tlm_args, _parse_sft_part(tlm_args, rest)


def _parse_sft_part(tlm_args: TLMArguments, rest: Any):
    out = _get(rest, "output_dir")
    if not _truthy(_get(rest, "overwrite_output_dir")) and outputs.finished_run(out) is not None:
        # LLaMA-Factory refuses a non-empty output_dir without a checkpoint; stage tlm reports the finished run.
        tlm_args.finished_in = out
        rest = _set(rest, "overwrite_output_dir", True)
    get_train_args = seam.resolve("llamafactory.hparams.get_train_args")
    model_args, data_args, training_args, finetuning_args, generating_args = get_train_args(rest)
    do_predict, eval_dataset = tlm_args.predict
    training_args.do_predict = do_predict
    names = eval_dataset if eval_dataset is not None else ",".join(data_args.dataset or [])
    data_args.eval_dataset = [n.strip() for n in str(names).split(",") if n.strip()] if do_predict else None
    finetuning_args.stage = STAGE
    return model_args, data_args, training_args, finetuning_args, generating_args


def _run_tlm(tlm_args: TLMArguments, rest: Any, callbacks: list | None) -> None:
    """Parse the sft part with LLaMA-Factory's own parser, add the callbacks it gives sft, run the TLM workflow."""
    command = registry.MODES[tlm_args.tlm_mode].command
    if command != "train":
        raise TLMConfigError(
            f"tlm_mode: {tlm_args.tlm_mode} runs under `llamafactory-cli {command} recipe.yaml`, not "
            "`llamafactory-cli train`."
        )
    model_args, data_args, training_args, finetuning_args, generating_args = _parse_sft_part(tlm_args, rest)
    callbacks = list(callbacks or []) + seam.sft_callbacks(
        model_args, data_args, training_args, finetuning_args, generating_args
    )
    token = _active.set(tlm_args)
    try:
        run_tlm(model_args, data_args, training_args, finetuning_args, generating_args, tlm_args, callbacks)
    finally:
        _active.reset(token)
    if _ray_initialized():
        return  # Ray tears the process group down itself
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # an optional dependency: initialised only if some code imported it
    return ray is not None and ray.is_initialized()


def _refuse_tlm_in_run_exp(tuner: ModuleType) -> None:
    """The hook point is gone: make stage tlm fail clearly, leave every other stage alone."""
    original_run_exp = getattr(tuner, "run_exp", None)
    if not callable(original_run_exp):
        return

    @functools.wraps(original_run_exp)
    def run_exp(args=None, callbacks=None):
        read = getattr(tuner, "read_args", None)
        recipe = read(args) if callable(read) else args
        is_tlm = (isinstance(recipe, dict) and recipe.get("stage") == STAGE) or (
            isinstance(recipe, list) and _get(recipe, "stage") == STAGE
        )
        if is_tlm:
            raise TLMPatchError(
                "stage: tlm cannot run: this llamafactory version has no llamafactory.train.tuner._training_function "
                f"(tested {TESTED_RANGE[0]} to <{TESTED_RANGE[1]}). Install a tested llamafactory version; other "
                "stages are unaffected."
            )
        return original_run_exp(args, callbacks)

    tuner.run_exp = run_exp
