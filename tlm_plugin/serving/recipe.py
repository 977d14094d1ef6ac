"""A ``tlm_mode: serve`` recipe, read once for the server (LLaMA-Factory's inference arguments) and once for the
learner (its training arguments): the ``tlm_*`` keys are split off and checked as for ``llamafactory-cli train``."""

import dataclasses
import ipaddress
import os
from typing import Any

from tlm_plugin import seam
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.hparams import TLMArguments
from tlm_plugin.patch import STAGE, parse_recipe, split_args
from tlm_plugin.train import outputs


# Keys that change what the server does at the door, not what it learns (left out of the run's identity).
DOOR_KEYS = ("tlm_serve_queue_limit", "tlm_serve_max_body_bytes", "tlm_serve_allow_open", "tlm_serve_retries")
INFER_CLASSES = (
    "llamafactory.hparams.ModelArguments",
    "llamafactory.hparams.DataArguments",
    "llamafactory.hparams.FinetuningArguments",
    "llamafactory.hparams.GeneratingArguments",
)


def is_serve_recipe(recipe: Any) -> bool:
    return isinstance(recipe, dict) and recipe.get("stage") == STAGE and recipe.get("tlm_mode") == "serve"


def check(recipe: dict[str, Any]) -> TLMArguments:
    """The recipe's ``tlm_*`` settings, checked; what the server needs besides them, checked too."""
    tlm_args, rest = split_args(recipe)
    if tlm_args is None or tlm_args.tlm_mode != "serve":
        raise TLMConfigError("not a stage: tlm recipe with tlm_mode: serve")
    if not rest.get("output_dir"):
        raise TLMConfigError(
            "tlm_mode: serve needs output_dir: every received prompt and adapter version is kept there."
        )
    adapters = rest.get("adapter_name_or_path")
    if adapters is not None and len(str(adapters).split(",")) > 1:
        raise TLMConfigError(
            "tlm_mode: serve learns one adapter: adapter_name_or_path names several. Merge them first "
            "(llamafactory-cli export) and name one."
        )
    if (rest.get("finetuning_type") or "lora") != "lora":
        raise TLMConfigError("tlm_mode: serve publishes LoRA adapter versions: set finetuning_type: lora.")
    return tlm_args


def identity(recipe: dict[str, Any]) -> str:
    """A hash of what the learning depends on (the door's limits and the API variables left out)."""
    return outputs.run_identity({k: v for k, v in recipe.items() if k not in DOOR_KEYS})


def check_address(host: str, tlm_args: TLMArguments) -> None:
    """Refuse to listen beyond loopback without API_KEY (every prompt is stored and learned from)."""
    if os.getenv("API_KEY") or tlm_args.tlm_serve_allow_open:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise TLMConfigError(
            f"API_HOST={host} is reachable from other machines and API_KEY is not set: this server stores and learns "
            "from every prompt it receives. Set API_KEY, serve on 127.0.0.1, or set tlm_serve_allow_open: true."
        )


def infer_args(recipe: dict[str, Any], adapter: str | None) -> dict[str, Any]:
    """The recipe as LLaMA-Factory's inference parser reads it (``ChatModel(args)``): its model, data, finetuning and
    generating keys, with ``adapter`` (a version folder) as the one adapter, or none."""
    _, rest = split_args(recipe)
    known = {f.name for cls in INFER_CLASSES for f in dataclasses.fields(seam.resolve(cls))}
    args = {k: v for k, v in rest.items() if k in known}
    args["stage"] = "sft"
    args.pop("adapter_name_or_path", None)
    if adapter is not None:
        args["adapter_name_or_path"] = adapter
    return args


def train_args(recipe: dict[str, Any], adapter: str | None):
    """(tlm arguments, LLaMA-Factory's five argument objects) for the learner, ``adapter`` as the adapter to go on
    training (a version folder), or the recipe's own (a new one when it names none)."""
    rest = dict(recipe)
    rest["do_train"] = False  # parsed without a training dataset (the stream is the data); the learner trains
    rest.pop("do_predict", None)
    rest["overwrite_output_dir"] = True  # the versions, not HF checkpoints, are what resumes
    if adapter is not None:
        rest["adapter_name_or_path"] = adapter
    tlm_args, parsed = parse_recipe(rest)
    model_args, data_args, training_args, finetuning_args, generating_args = parsed
    training_args.do_train = True
    return tlm_args, model_args, data_args, training_args, finetuning_args, generating_args
