"""The model as the training backend prepared it, for every pass that runs without gradient.

Stage tlm runs no-grad passes (scores, embeddings, answer likelihoods, generation) before, during and after the
training loop, under whatever backend the recipe chose: one device, DDP, DeepSpeed ZeRO-0/1/2/3 (with or without
offload) or FSDP. The rules:

- Parameters are complete on every rank under one device, DDP, ZeRO-0/1/2 and FSDP before the training loop wraps
  the model: each rank runs its own rows through the unwrapped module.
- They are sharded under ZeRO-3 (from the moment the model is loaded, by ``zero.Init``) and under FSDP once wrapped:
  every forward is a collective, so every rank runs the same number of batches (``lockstep``; a rank with fewer
  rows repeats a row and drops the result) and generation passes ``synced_gpus``.
- Under ZeRO-3 the parameters are gathered by the hooks a DeepSpeed engine puts on the module. Inside and after the
  training loop that is the training engine; before it (offline scoring, pool embeddings) :func:`no_grad_model`
  builds a ZeRO inference engine exactly as transformers' evaluation does before training, and takes it down again
  (hooks removed, trainer references reset) so that ``train()`` builds its training engine as usual.

Nothing here calls ``Trainer.predict`` / ``evaluate``: transformers refuses ZeRO-1/2 there before training.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_zero3(trainer) -> bool:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    plugin = trainer.accelerator.state.deepspeed_plugin
    return int(getattr(plugin, "zero_stage", 0) or 0) == 3


def shards_parameters(trainer) -> bool:
    """Whether a forward needs every rank (ZeRO-3, FSDP): passes then run in lock-step.

    Not while the run holds a full copy of the parameters on every rank (``trainer.full_copy``: per-prompt mode
    under ZeRO-3, see :func:`full_parameters`).
    """
    if getattr(trainer, "full_copy", False):
        return False
    return is_zero3(trainer) or bool(getattr(trainer, "is_fsdp_enabled", False))


@contextlib.contextmanager
def full_parameters(trainer) -> Iterator[None]:
    """Under ZeRO-3, every parameter gathered on every rank for the duration (each rank then works on its own).

    Per-prompt learning adapts an independent copy of the adapter on every rank, which needs the whole model on
    each; the model must fit one device. Elsewhere the parameters are already complete and this does nothing.
    """
    if not is_zero3(trainer) or getattr(trainer, "deepspeed", None) is not None:
        yield
        return
    import deepspeed

    params = list(trainer.accelerator.unwrap_model(trainer.model).parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        trainer.full_copy = True
        try:
            yield
        finally:
            trainer.full_copy = False


@contextlib.contextmanager
def no_grad_model(trainer) -> Iterator[torch.nn.Module]:
    """The module to call for a no-grad pass, in eval mode; training mode is restored on exit.

    FSDP after wrapping: the wrapper (its forward gathers the shards). DeepSpeed: the unwrapped module, whose
    ZeRO-3 parameters the engine's hooks gather (a ZeRO inference engine is made for the pass if the training engine
    does not exist yet). Everything else: the unwrapped module.
    """
    temporary_engine = None
    if is_zero3(trainer) and getattr(trainer, "deepspeed", None) is None and not getattr(trainer, "full_copy", False):
        temporary_engine = _zero3_inference_engine(trainer)
    if getattr(trainer, "is_fsdp_enabled", False) and trainer.accelerator.unwrap_model(trainer.model) is not (
        trainer.model
    ):
        module = trainer.model
    else:
        module = trainer.accelerator.unwrap_model(trainer.model)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)
        if temporary_engine is not None:
            _release_inference_engine(trainer, temporary_engine)


def _zero3_inference_engine(trainer) -> Any:
    """A ZeRO-3 inference engine on ``trainer.model`` (transformers' own path for evaluation before training)."""
    import copy

    from transformers.integrations.deepspeed import deepspeed_init

    hf_config = trainer.accelerator.state.deepspeed_plugin.hf_ds_config
    saved = copy.deepcopy(hf_config.config)  # inference deletes the optimizer / scheduler sections
    deepspeed_init(trainer, num_training_steps=0, inference=True)
    engine = trainer.accelerator.prepare(trainer.model)
    hf_config.config = saved
    return engine


def _release_inference_engine(trainer, engine) -> None:
    """Remove the inference engine's hooks and references, so that ``train()`` builds its own engine."""
    engine.destroy()
    accelerator = trainer.accelerator
    accelerator._models = [m for m in accelerator._models if m is not engine]
    accelerator.deepspeed_engine_wrapped = None
    trainer.model_wrapped = trainer.model
    trainer.deepspeed = None


def my_rows(n_rows: int) -> list[int]:
    """The rows this rank handles in a sharded pass: rank, rank + world, ..."""
    rank, world = rank_and_world()
    return list(range(rank, n_rows, world))


def lockstep_count(local_batches: int, lockstep: bool) -> int:
    """How many batches this rank must run: its own, or the most any rank has when forwards are collective."""
    if not lockstep:
        return local_batches
    _, world = rank_and_world()
    if world == 1:
        return local_batches
    count = torch.tensor([local_batches], dtype=torch.long, device=_device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def all_agree(flags: list[bool]) -> list[bool]:
    """For each flag, whether it is true on ANY rank (one small all-reduce)."""
    _, world = rank_and_world()
    if world == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.long, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def _device() -> torch.device:
    """The device collectives use: the current CUDA device under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
