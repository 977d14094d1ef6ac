"""The only place that touches LLaMA-Factory's internals.

"Parse as sft, run as tlm": when a recipe says ``stage: tlm``, the ``tlm_*`` keys are parsed into
:class:`~tlm_plugin.hparams.TLMArguments`, LLaMA-Factory parses and validates the rest as an ``sft`` recipe
(so every model/data/training option keeps its meaning), and its call of ``run_sft`` is routed to
:func:`tlm_plugin.train.workflow.run_tlm`. Two private names are used: ``tuner._training_function`` and
``tuner.run_sft``.
"""

import contextvars
import functools
import logging
import warnings
from types import ModuleType
from typing import Any

from tlm_plugin.hparams import TLM_PREFIX, TLMArguments, TLMConfigError, parse_tlm_args


logger = logging.getLogger(__name__)

TESTED_RANGE = ("0.9.5", "0.10.0")  # [min, max): versions this plugin was tested with
STAGE = "tlm"
_PATCHED_ATTR = "__tlm_plugin_patched__"

# Options that would route an sft recipe away from run_sft, or that cannot work for TLM.
_INCOMPATIBLE = {
    "use_mca": "Megatron-core (use_mca) training has its own workflow",
    "use_hyper_parallel": "hyper_parallel training has its own workflow",
    "packing": "packing merges prompts, but TLM scores and weights each prompt on its own",
    "neat_packing": "packing merges prompts, but TLM scores and weights each prompt on its own",
    "train_on_prompt": "it adds the reference answer to the training targets (TLM never trains on answers)",
    "mask_history": "it only applies to supervised multi-turn answers, which TLM never trains on",
    "use_ray": "Ray launching is not supported by stage tlm yet; use torchrun (FORCE_TORCHRUN=1)",
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


def split_args(args: Any) -> tuple[TLMArguments | None, Any]:
    """Separate a recipe into (TLM arguments or None, what LLaMA-Factory parses as an sft recipe)."""
    if isinstance(args, dict):
        tlm_values, rest = _split_dict(args)
    else:
        tlm_values, rest = _split_list(list(args))
    if tlm_values is None:
        return None, args
    tlm_args = parse_tlm_args(tlm_values)
    _check_compatible(rest)
    return tlm_args, _with_prediction_defaults(rest)


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


def _with_prediction_defaults(rest: Any) -> Any:
    """Predictions of stage tlm are the answers to the test prompts themselves unless eval_dataset says otherwise.

    LLaMA-Factory requires ``predict_with_generate`` and an ``eval_dataset`` for ``do_predict`` in sft; stage tlm
    fills both in so that a recipe only needs ``do_predict: true``.
    """
    if not _truthy(_get(rest, "do_predict")):
        return rest
    if _get(rest, "predict_with_generate") is None:
        rest = _set(rest, "predict_with_generate", "true" if isinstance(rest, list) else True)
    if _get(rest, "eval_dataset") is None and _get(rest, "dataset") is not None:
        rest = _set(rest, "eval_dataset", _get(rest, "dataset"))
    return rest


def current_tlm_args() -> TLMArguments | None:
    return _active.get()


def _version_check(version: str) -> None:
    from packaging.version import Version

    low, high = TESTED_RANGE
    if not (Version(low) <= Version(version) < Version(high)):
        warnings.warn(
            f"llamafactory-tlm was tested with llamafactory>={low},<{high}; found {version}. "
            "stage: tlm may still work; please report problems.",
            stacklevel=2,
        )


def apply(tuner: ModuleType) -> None:
    """Patch ``llamafactory.train.tuner`` (idempotent)."""
    if getattr(tuner, _PATCHED_ATTR, False):
        return
    missing = [name for name in ("_training_function", "run_sft", "read_args") if not hasattr(tuner, name)]
    if missing:
        raise TLMPatchError(
            f"This llamafactory version has no llamafactory.train.tuner.{', '.join(missing)}; llamafactory-tlm "
            f"cannot add stage: tlm to it (tested {TESTED_RANGE[0]} to <{TESTED_RANGE[1]}). "
            "Install a tested llamafactory version or set LLAMAFACTORY_TLM_DISABLE=1."
        )
    try:
        from llamafactory.extras.env import VERSION
    except ImportError:
        VERSION = "0"
    _version_check(VERSION)

    original_training_function = tuner._training_function
    original_run_sft = tuner.run_sft

    @functools.wraps(original_training_function)
    def _training_function(config: dict[str, Any]) -> None:
        tlm_args, rest = split_args(tuner.read_args(config.get("args")))
        if tlm_args is None:
            return original_training_function(config)
        token = _active.set(tlm_args)
        try:
            return original_training_function({**config, "args": rest})
        finally:
            _active.reset(token)

    @functools.wraps(original_run_sft)
    def run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks=None):
        tlm_args = _active.get()
        if tlm_args is None:
            return original_run_sft(model_args, data_args, training_args, finetuning_args, generating_args, callbacks)
        from tlm_plugin.train.workflow import run_tlm

        finetuning_args.stage = STAGE
        return run_tlm(model_args, data_args, training_args, finetuning_args, generating_args, tlm_args, callbacks)

    tuner._training_function = _training_function
    tuner.run_sft = run_sft
    setattr(tuner, _PATCHED_ATTR, True)
