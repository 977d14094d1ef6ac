"""Checks a stage-tlm recipe must pass before the model loads, and the pieces the workflow builds from settings."""

import os
from typing import TYPE_CHECKING, Any

from llamafactory.extras.logging import get_logger
from transformers import AutoConfig

from tlm_plugin import registry, seam
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.selectors.generate import check_endpoint, is_endpoint
from tlm_plugin.train.outputs import run_identity


logger = get_logger(__name__)

if TYPE_CHECKING:
    from tlm_plugin.hparams import TLMArguments


def build_selector(tlm_args: "TLMArguments", seed: int = 0):
    """The weighting or pool selector of ``tlm_selector`` for all prompts (None per prompt: see build_pool_selector
    and the data sources), built from plain values."""
    a = tlm_args
    if a.per_prompt:
        return None
    if a.kind == "pool":
        return build_pool_selector(a, seed)
    cls = registry.load(registry.impl(a.tlm_selector, a.tlm_mode).cls)
    if hasattr(cls, "from_settings"):  # a method with settings of its own builds itself from its groups
        return cls.from_settings(a.method_settings(), seed=seed, streaming=registry.MODES[a.tlm_mode].stream)
    return cls(
        lam=a.tlm_lambda,
        log_p0=a.tlm_log_p0,
        fraction=a.tlm_select_fraction,
        streaming=registry.MODES[a.tlm_mode].stream,
        seed=seed,
    )


def build_pool_selector(tlm_args: "TLMArguments", seed: int):
    """The pool selector (sift, nearest, random), for all prompts or seeded for one prompt."""
    a = tlm_args
    cls = registry.load(registry.impl(a.tlm_selector, a.tlm_mode).cls)
    if hasattr(cls, "from_settings"):
        return cls.from_settings(a.method_settings(), seed=seed)
    return cls(
        budget=a.tlm_sift_budget,
        lambda_=a.tlm_sift_lambda,
        alpha=a.tlm_sift_alpha,
        candidates=a.tlm_sift_candidates,
        seed=seed,
    )


def check_training_args(training_args, data_args, finetuning_args, tlm_args: "TLMArguments") -> None:
    """Options of the recipe that cannot work with the chosen stage-tlm mode (all checked before the model loads)."""
    if data_args.streaming:
        raise TLMConfigError("streaming cannot be used with stage: tlm: every prompt is scored before training.")
    if data_args.val_size and data_args.val_size > 0:
        raise TLMConfigError(
            "val_size cannot be used with stage: tlm: it would hold test prompts out of adaptation and answer them "
            "as a separate split. Remove val_size (stage tlm answers the test prompts themselves)."
        )
    if isinstance(data_args.eval_dataset, list) and data_args.eval_on_each_dataset:
        raise TLMConfigError("eval_on_each_dataset cannot be used with stage: tlm.")
    if getattr(finetuning_args, "early_stopping_steps", None) is not None:
        raise TLMConfigError("early_stopping_steps cannot be used with stage: tlm: there is no evaluation to stop on.")
    if getattr(training_args, "eval_strategy", "no") not in ("no", None) and str(training_args.eval_strategy) != (
        "IntervalStrategy.NO"
    ):
        raise TLMConfigError("eval_strategy cannot be used with stage: tlm: set eval_strategy: no.")
    if tlm_args.per_prompt and (training_args.warmup_ratio or training_args.warmup_steps):
        logger.warning_rank0(
            "warmup_ratio / warmup_steps do not apply per prompt: each prompt's own schedule warms up for "
            f"tlm_prompt_warmup_steps ({tlm_args.tlm_prompt_warmup_steps}) steps."
        )
    if tlm_args.per_prompt and not training_args.do_train:
        raise TLMConfigError("tlm_mode: per_prompt adapts to every prompt: set do_train: true.")
    if tlm_args.per_prompt and training_args.do_predict and data_args.eval_dataset != data_args.dataset:
        raise TLMConfigError("tlm_mode: per_prompt answers the test prompts themselves: leave eval_dataset unset.")
    if tlm_args.tlm_mode == "online":
        if training_args.do_predict and data_args.eval_dataset != data_args.dataset:
            raise TLMConfigError(
                "tlm_mode: online answers the stream itself: leave eval_dataset unset (or equal to dataset)."
            )
        if training_args.num_train_epochs != 1 or training_args.max_steps > 0:
            raise TLMConfigError("tlm_mode: online reads the stream once: set num_train_epochs: 1 and no max_steps.")
        if getattr(training_args, "group_by_length", False):
            raise TLMConfigError("group_by_length cannot be used with tlm_mode: online (it reorders the stream).")


def check_backend(training_args, tlm_args: "TLMArguments") -> None:
    """Combinations of backend and mode that cannot work, refused before the model loads."""
    deepspeed = training_args.deepspeed is not None
    fsdp = bool(getattr(training_args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if tlm_args.tlm_reset == "chunk" and (deepspeed or fsdp):
        raise TLMConfigError(
            f"tlm_reset: chunk is not supported with {'DeepSpeed' if deepspeed else 'FSDP'}: the weights and optimizer "
            "state it restores live in the backend's partitions (one rank's copy cannot restore another's). Use DDP "
            "(no deepspeed key, no FSDP config) for chunk resets; the adapter's optimizer state is small."
        )
    if tlm_args.tlm_eata_fisher_coeff > 0 and (deepspeed or fsdp):
        raise TLMConfigError(
            "tlm_eata_fisher_coeff adds its gradient to each weight's own gradient, which DeepSpeed and FSDP keep in "
            "their own partitions: use DDP (no deepspeed key) for EATA's Fisher term."
        )
    if tlm_args.per_prompt and fsdp:
        raise TLMConfigError(
            "tlm_mode: per_prompt adapts an independent copy of the adapter on every rank, which FSDP's sharding "
            "cannot do. Use DDP or DeepSpeed (each rank then answers its own share of the prompts)."
        )


def check_generator(tlm_args: "TLMArguments", training_args) -> None:
    """``tlm_selector: generate``: an endpoint must answer and a teacher must be loadable, before the model loads."""
    if tlm_args.tlm_selector != "generate" or tlm_args.tlm_generator == "self":
        return
    generator = tlm_args.tlm_generator
    if is_endpoint(generator):
        problem = check_endpoint(generator, tlm_args.tlm_generate_api_key_env)
        if problem:
            raise TLMConfigError(problem)
        return
    try:
        AutoConfig.from_pretrained(os.path.expanduser(generator))
    except (OSError, ValueError) as err:
        raise TLMConfigError(f"tlm_generator: the teacher model {generator!r} cannot be loaded ({err}).") from err


def generation_kwargs(generating_args, tokenizer) -> dict[str, Any]:
    """Arguments of ``model.generate`` as LLaMA-Factory's sft stage builds them (every end-of-turn token stops)."""
    gen_kwargs = generating_args.to_dict(obey_generation_config=True)
    extra = getattr(tokenizer, "additional_special_tokens_ids", None)
    if not isinstance(extra, list):
        names = seam.extra_special_tokens(tokenizer)
        extra = tokenizer.convert_tokens_to_ids(names) if names else []
    gen_kwargs["eos_token_id"] = list(dict.fromkeys([tokenizer.eos_token_id] + [i for i in extra if i != -1]))
    gen_kwargs["pad_token_id"] = tokenizer.pad_token_id
    return gen_kwargs


def identity(model_args, data_args, training_args, finetuning_args, generating_args, tlm_args) -> str:
    """The identity of a run: every setting that changes its records and predictions (see outputs.RUN_FILE)."""
    keys = {
        "model": ("model_name_or_path", "adapter_name_or_path", "quantization_bit", "rope_scaling"),
        "data": ("dataset", "dataset_dir", "template", "cutoff_len", "max_samples", "default_system"),
        "finetuning": ("finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "pissa_init"),
        "training": (
            "do_train",
            "do_predict",
            "learning_rate",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_train_epochs",
            "max_steps",
            "lr_scheduler_type",
            "warmup_ratio",
            "warmup_steps",
            "weight_decay",
            "max_grad_norm",
            "optim",
            "seed",
            "bf16",
            "fp16",
            "per_device_eval_batch_size",
        ),
    }
    sources = {"model": model_args, "data": data_args, "finetuning": finetuning_args, "training": training_args}
    settings: dict[str, Any] = {"tlm": tlm_args.to_dict(), "generation": generating_args.to_dict()}
    for name, fields in keys.items():
        settings[name] = {f: str(getattr(sources[name], f, None)) for f in fields}
    if not tlm_args.per_prompt:  # checkpoints of the HF loop only resume with the same number of ranks
        settings["world_size"] = training_args.world_size
    return run_identity(settings)
