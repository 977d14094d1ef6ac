"""Every LLaMA-Factory, transformers, accelerate and DeepSpeed name the plugin reaches that is not part of the
library's documented interface, in one place.

``stage: tlm`` needs five kinds of LLaMA-Factory internals: the tuner's training function (the hook), the callbacks
its sft stage builds, the chat template's element-by-element encoding (the user-token masks), the aligned rows
of the dataset loader (``_prompt``/``_response``/``_system``/``_tools`` columns) and the methods of LlamaBoard's
runner behind its training form (the stage in the web UI). They are looked up here and nowhere else, so a release
that moves one of them breaks this module and ``tests/test_seam.py``, which names what changed.
"""

import contextlib
import importlib
import inspect
from collections.abc import Iterator
from typing import Any

from peft import PeftModel
from transformers import EarlyStoppingCallback


class SeamError(RuntimeError):
    """A LLaMA-Factory internal that stage tlm needs is missing or has changed."""


# dotted name -> (what stage tlm uses it for, parameters it must accept; None: not a function)
INTERNALS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "llamafactory.train.tuner._training_function": ("the hook that runs stage tlm", ("config",)),
    "llamafactory.train.tuner.read_args": ("reading a recipe the way llamafactory-cli does", ("args",)),
    "llamafactory.hparams.get_train_args": ("parsing and validating the sft part of a recipe", ("args",)),
    "llamafactory.train.callbacks.LogCallback": ("the progress log of the web UI", None),
    "llamafactory.train.callbacks.ReporterCallback": ("the run report of LLaMA-Factory", None),
    "llamafactory.data.loader._get_merged_dataset": (
        "the aligned rows behind each prompt (user-token masks, pools)",
        ("dataset_names", "model_args", "data_args", "training_args", "stage"),
    ),
    "llamafactory.data.template.Template._encode": (
        "the element-by-element encoding of a chat turn (user-token masks)",
        ("self", "tokenizer", "messages", "system", "tools"),
    ),
    "llamafactory.data.template.Template._convert_elements_to_ids": (
        "turning template elements into token ids (user-token masks)",
        ("self", "tokenizer", "elements"),
    ),
    "llamafactory.data.template.Llama2Template._encode": ("the llama2 variant of the encoding", None),
    "llamafactory.data.template.ReasoningTemplate": ("templates that add thought tokens", None),
    "llamafactory.data.template.TEMPLATES": ("template names for error messages", None),
    "llamafactory.data.formatter.StringFormatter": ("the slots a template fills with the user's text", None),
    "llamafactory.data.data_utils.Role": ("message roles", None),
    "llamafactory.data.processor.supervised.SupervisedDatasetProcessor": (
        "encoding prompt + answer as sft does (answer likelihoods, pool rows with answers, generated examples)",
        None,
    ),
    "llamafactory.data.processor.unsupervised.UnsupervisedDatasetProcessor": (
        "encoding a prompt as at generation time (pool rows, in-context demonstrations)",
        None,
    ),
    "llamafactory.data.processor.processor_utils.infer_seqlen": (
        "the prompt truncation of the unsupervised processor",
        ("source_len", "target_len", "cutoff_len"),
    ),
    "transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref": (
        "loading a local teacher whole while the run itself is under ZeRO-3",
        None,
    ),
    "transformers.Trainer._prepare_inputs": (
        "moving a collated batch to the device the way the training loop does (EATA's Fisher term)",
        ("self", "inputs"),
    ),
    "transformers.Trainer._get_train_sampler": (
        "overridden by stage tlm's trainer: online streams are consumed in order",
        ("self",),
    ),
    "accelerate.state.GradientState._set_sync_gradients": (
        "holding the optimizer wrapper back during a skipped update",
        ("self", "sync_gradients"),
    ),
    "llamafactory.webui.runner.Runner._initialize": (
        "LlamaBoard's checks of its training form before a preview or a start (stage tlm adds its own)",
        ("self", "data", "do_train", "from_preview"),
    ),
    "llamafactory.webui.runner.Runner._parse_train_args": (
        "the recipe LlamaBoard builds from its training form (stage tlm adds its settings)",
        ("self", "data"),
    ),
    "llamafactory.webui.runner.Runner._build_config_dict": (
        "the form values LlamaBoard saves beside a run (the stage tlm settings only with stage tlm)",
        ("self", "data"),
    ),
}


def resolve(dotted: str) -> Any:
    """The object behind ``dotted`` (module path, then attributes), or :class:`SeamError` naming what is missing."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                raise SeamError(_missing_message(dotted, f"{'.'.join(parts[:split])} has no {attr!r}"))
            obj = getattr(obj, attr)
        return obj
    raise SeamError(_missing_message(dotted, "the module cannot be imported"))


def _missing_message(dotted: str, why: str) -> str:
    use = INTERNALS.get(dotted, ("an internal",))[0]
    package = dotted.split(".")[0]
    return (
        f"stage: tlm needs {package}'s {dotted} ({use}), but {why}. This {package} version moved it; install a "
        "version inside llamafactory-tlm's tested bounds (pyproject.toml) or report it to llamafactory-tlm."
    )


def check(dotted: str) -> str | None:
    """None when ``dotted`` exists with the expected parameters, else a sentence saying what changed."""
    try:
        obj = resolve(dotted)
    except SeamError as err:
        return str(err)
    expected = INTERNALS[dotted][1]
    if expected is None:
        return None
    try:
        params = tuple(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return f"{dotted}: its signature cannot be read"
    missing = [name for name in expected if name not in params]
    if missing:
        return f"{dotted} no longer takes {', '.join(missing)} (it takes {', '.join(params)})"
    return None


def changes() -> list[str]:
    """What changed in the installed LLaMA-Factory among :data:`INTERNALS` (empty: the seam is intact)."""
    return [msg for msg in (check(name) for name in INTERNALS) if msg is not None]


# ---------------------------------------------------------------------------------------------------------------
# Accessors used by the rest of the plugin


def merged_dataset(dataset_names, model_args, data_args, training_args, stage: str = "tlm"):
    """LLaMA-Factory's aligned rows for ``dataset_names`` (columns ``_prompt``, ``_response``, ``_system``, ...)."""
    return resolve("llamafactory.data.loader._get_merged_dataset")(
        dataset_names, model_args, data_args, training_args, stage=stage
    )


def template_classes() -> dict[str, Any]:
    """The template and formatter classes the user-token mask rebuilds the encoding with."""
    return {
        "Template": resolve("llamafactory.data.template.Template"),
        "Llama2Template": resolve("llamafactory.data.template.Llama2Template"),
        "ReasoningTemplate": resolve("llamafactory.data.template.ReasoningTemplate"),
        "TEMPLATES": resolve("llamafactory.data.template.TEMPLATES"),
        "StringFormatter": resolve("llamafactory.data.formatter.StringFormatter"),
        "Role": resolve("llamafactory.data.data_utils.Role"),
        "infer_seqlen": resolve("llamafactory.data.processor.processor_utils.infer_seqlen"),
    }


def encode_kind(template) -> str | None:
    """Which element-by-element encoding ``template`` uses: ``"plain"`` (``Template._encode``), ``"llama2"`` (the
    system text glued in front of the first user turn) or None (an override the user-token mask cannot follow)."""
    encode = type(template)._encode
    if encode is resolve("llamafactory.data.template.Template._encode"):
        return "plain"
    if encode is resolve("llamafactory.data.template.Llama2Template._encode"):
        return "llama2"
    return None


def elements_to_ids(template, tokenizer, elements: list) -> list[int]:
    return template._convert_elements_to_ids(tokenizer, elements)


def sft_callbacks(model_args, data_args, training_args, finetuning_args, generating_args) -> list:
    """The callbacks LLaMA-Factory's tuner adds to an sft run (progress log, report, optional integrations)."""
    tuner = importlib.import_module("llamafactory.train.tuner")
    callbacks = [resolve("llamafactory.train.callbacks.LogCallback")()]
    if getattr(finetuning_args, "pissa_convert", False) and hasattr(tuner, "PissaConvertCallback"):
        callbacks.append(tuner.PissaConvertCallback())
    if getattr(finetuning_args, "use_swanlab", False) and hasattr(tuner, "get_swanlab_callback"):
        callbacks.append(tuner.get_swanlab_callback(finetuning_args))
    if getattr(finetuning_args, "early_stopping_steps", None) is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=finetuning_args.early_stopping_steps))
    if getattr(training_args, "enable_torch_profiler", False) and hasattr(tuner, "TorchProfilerCallback"):
        callbacks.append(tuner.TorchProfilerCallback(training_args))
    if getattr(training_args, "profile_modules", None) and hasattr(tuner, "ModuleProfilerCallback"):
        callbacks.append(tuner.ModuleProfilerCallback(training_args.profile_modules))
    reporter = resolve("llamafactory.train.callbacks.ReporterCallback")
    callbacks.append(reporter(model_args, data_args, finetuning_args, generating_args))
    return callbacks


_WEBUI_RUNNER = "llamafactory.webui.runner.Runner"


def wrap_webui_runner(initialize, parse_train_args, build_config_dict) -> None:
    """Replace the three methods of LlamaBoard's ``Runner`` behind its training form, each by what its wrapper makes of
    the original: ``initialize`` wraps ``_initialize`` (the checks before a preview or a start),
    ``parse_train_args`` wraps ``_parse_train_args`` (the recipe built from the form) and ``build_config_dict`` wraps
    ``_build_config_dict`` (the form values saved beside a run). Changes nothing when one of them has moved
    (:class:`SeamError` names it)."""
    runner = resolve(_WEBUI_RUNNER)
    wrappers = {
        "_initialize": initialize,
        "_parse_train_args": parse_train_args,
        "_build_config_dict": build_config_dict,
    }
    for problem in (check(f"{_WEBUI_RUNNER}.{name}") for name in wrappers):
        if problem is not None:
            raise SeamError(problem)
    for name, wrap in wrappers.items():
        setattr(runner, name, wrap(getattr(runner, name)))


def webui_train_args(runner, data: dict) -> dict:
    """The recipe LlamaBoard's ``runner`` builds from the training form's values ``data``."""
    return runner._parse_train_args(data)


def set_sync_gradients(accelerator, value: bool) -> None:
    """Whether accelerate's optimizer wrapper steps when called (it steps on gradient-sync steps only)."""
    resolve("accelerate.state.GradientState._set_sync_gradients")
    accelerator.gradient_state._set_sync_gradients(value)


@contextlib.contextmanager
def without_hf_deepspeed_config() -> Iterator[None]:
    """transformers' global DeepSpeed config unset for the duration: a model loaded inside is not partitioned by
    ``zero.Init`` (a ZeRO-3 run's own model is, and its engine gathers it; a second model has no engine)."""
    module = importlib.import_module("transformers.integrations.deepspeed")
    resolve("transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref")
    ref = module._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    module.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        module.set_hf_deepspeed_config(config)


def forget_prepared_optimizer(accelerator, prepared):
    """The plain optimizer inside accelerate's wrapper ``prepared``, removed from the accelerator's list, so that the
    training loop's own ``prepare`` wraps it once (an optimizer prepared twice would step its GradScaler twice)."""
    optimizers = getattr(accelerator, "_optimizers", None)
    if optimizers is None:
        raise SeamError("stage: tlm needs accelerate's Accelerator._optimizers (FSDP2 before training): not found.")
    if prepared in optimizers:
        optimizers.remove(prepared)
    return prepared.optimizer


def fsdp_peft_plugin_updates(trainer) -> None:
    """transformers' FSDP wrap policy for a PEFT model, set before FSDP1 wraps it (4.x: a trainer method; 5.x: a
    function of ``transformers.integrations.fsdp``)."""
    if hasattr(trainer, "_fsdp_qlora_plugin_updates"):
        trainer._fsdp_qlora_plugin_updates()
        return
    fsdp = importlib.import_module("transformers.integrations.fsdp")
    if isinstance(trainer.model, PeftModel):
        fsdp.update_fsdp_plugin_peft(trainer.model, trainer.accelerator)


def prepare_inputs(trainer, batch: dict) -> dict:
    """A collated batch on the training device, as the training loop prepares it."""
    return trainer._prepare_inputs(batch)


def forget_prepared_model(accelerator, model) -> None:
    """Drop ``model`` from the models accelerate tracks (a destroyed ZeRO inference engine must not be saved,
    unwrapped or freed again by later calls)."""
    accelerator._models = [m for m in accelerator._models if m is not model]


def extra_special_tokens(tokenizer) -> list[str]:
    """The tokenizer's extra special tokens where transformers keeps them only privately (5.x tokenizers without
    ``additional_special_tokens_ids``)."""
    return [str(t) for t in getattr(tokenizer, "_extra_special_tokens", [])]


def remove_engine_forward_hooks(engine) -> None:
    """Remove the forward pre/post hooks a DeepSpeed engine put on its module (``DeepSpeedEngine.destroy`` leaves
    them: a module that outlives several engines would run every dead engine's hooks at every forward)."""
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, name, None)
        if handle is not None:
            handle.remove()
            setattr(engine, name, None)
