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
import copy
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, register_fsdp_forward_method
from tqdm.auto import tqdm
from transformers.integrations.deepspeed import deepspeed_init

from tlm_plugin import seam


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def progress(total: int, desc: str):
    """A progress bar of a long no-grad pass (rank 0 only; none for a pass of one batch)."""
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=rank_and_world()[0] != 0 or total < 2)


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
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """ZeRO-3 partitions among ``params`` gathered whole on every rank for the duration (read only); plain
    parameters are left as they are. Every rank must enter."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


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
    if getattr(trainer, "is_fsdp_enabled", False) and not is_fsdp_prepared(trainer.model):
        prepare_fsdp_early(trainer)
    module = generation_module(trainer, trainer.model)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)
        if temporary_engine is not None:
            _release_inference_engine(trainer, temporary_engine)


def generation_module(trainer, model) -> torch.nn.Module:
    """The module to run no-grad forwards and ``generate`` on: an FSDP1 wrapper itself (its forward gathers the
    shards; ``generate`` runs under ``summon_full_params`` of the root), else the module inside DDP / DeepSpeed /
    FSDP2 (whose ``generate`` transformers registers as an FSDP forward method)."""
    if getattr(trainer, "is_fsdp_enabled", False) and is_fsdp1_wrapper(model):
        return model
    return trainer.accelerator.unwrap_model(model)


def is_fsdp_prepared(model) -> bool:
    """Whether ``model`` is already sharded by FSDP (an FSDP1 wrapper, or a module FSDP2's ``fully_shard`` made)."""
    return isinstance(model, (FullyShardedDataParallel, FSDPModule))


def prepare_fsdp_early(trainer) -> None:
    """Shard the model before the training loop, exactly as transformers' training preparation does, so that the
    passes that run before training (scores, embeddings, answers) run on the sharded model in lock-step.

    Before it is sharded, an FSDP model is not ready for a forward: with ``fsdp_cpu_ram_efficient_loading`` (set in
    LLaMA-Factory's own FSDP configs) only local rank 0 holds the weights, on the CPU; the others hold zeros until
    accelerate's preparation broadcasts them. FSDP1: the PEFT wrap policy, then ``prepare(model)``. FSDP2: the
    recipe's optimizer first (accelerate shards model and optimizer together), then ``prepare(model, optimizer)``;
    the optimizer is handed back unwrapped. The training loop prepares both again, which leaves an already-sharded
    model as it is, and builds its LR schedule as usual.
    """
    accelerator = trainer.accelerator
    if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
        trainer.create_optimizer()
        model, optimizer = accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.optimizer = seam.forget_prepared_optimizer(accelerator, optimizer)
        if hasattr(model, "generate"):  # as transformers does after its own preparation
            register_fsdp_forward_method(model, "generate")
    else:
        seam.fsdp_peft_plugin_updates(trainer)
        model = accelerator.prepare(trainer.model)
    trainer.model = trainer.model_wrapped = model


def is_fsdp1_wrapper(model) -> bool:
    return isinstance(model, FullyShardedDataParallel)


def _zero3_inference_engine(trainer) -> Any:
    """A ZeRO-3 inference engine on ``trainer.model`` (transformers' own path for evaluation before training)."""
    config = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config
    # Inference deletes the optimizer section and fills `auto` step counts with 0. The dict is shared with
    # accelerate's plugin (deepspeed_config), which the training engine is built from: restore it in place.
    saved = copy.deepcopy(config)
    try:
        deepspeed_init(trainer, num_training_steps=0, inference=True)
        engine = trainer.accelerator.prepare(trainer.model)
    finally:
        config.clear()
        config.update(saved)
    return engine


def _release_inference_engine(trainer, engine) -> None:
    """Remove the inference engine's hooks and references, so that ``train()`` builds its own engine."""
    engine.destroy()
    seam.remove_engine_forward_hooks(engine)  # destroy() leaves them on the module: each would run at every forward
    accelerator = trainer.accelerator
    seam.forget_prepared_model(accelerator, engine)
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


# Collectives of Python objects (records, scores, embeddings, decisions) run over a gloo group of their own: under
# NCCL, torch's object collectives would pickle every rank's object onto the GPU (padded to the largest), which for a
# pool's embeddings can exhaust GPU memory. The wait at the end of per-prompt learning, where ranks finish at
# different times, runs over a second gloo group with a long timeout: nothing NCCL is in flight while ranks wait.
_GROUPS: dict[str, Any] = {}
_TIMEOUTS = {"objects": datetime.timedelta(minutes=30), "wait": datetime.timedelta(days=7)}


def set_timeouts(ddp_timeout_s: float | None) -> None:
    """The recipe's ``ddp_timeout`` for object collectives (the per-prompt wait allows at least seven days); the
    groups are made now, a point every rank reaches together. Called by every rank at the start of a run."""
    if ddp_timeout_s:
        _TIMEOUTS["objects"] = datetime.timedelta(seconds=ddp_timeout_s)
        _TIMEOUTS["wait"] = max(_TIMEOUTS["wait"], datetime.timedelta(seconds=ddp_timeout_s))
    _GROUPS.clear()
    if rank_and_world()[1] > 1:
        for kind in _TIMEOUTS:
            _group(kind)


def _group(kind: str):
    """The gloo group ``kind`` (created on first use, which every rank reaches at the same collective)."""
    if kind not in _GROUPS:
        _GROUPS[kind] = dist.new_group(backend="gloo", timeout=_TIMEOUTS[kind])
    return _GROUPS[kind]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, through host memory; ``[obj]`` without a process group."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj, group=_group("objects"))
    return parts


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank: a decision taken once (e.g. whether to resume), never rank by rank."""
    _, world = rank_and_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_group("objects"))
    return box[0]


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


def wait_for_all() -> None:
    """Every rank waits for the slowest (per-prompt learning, where shares take different times), over host memory
    and with a timeout of days rather than ``ddp_timeout``."""
    if rank_and_world()[1] > 1:
        dist.barrier(group=_group("wait"))


def is_local_main() -> bool:
    """Local rank 0: the process that manages this node's own copy of ``output_dir``."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _device() -> torch.device:
    """The device collectives use: the current CUDA device under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
