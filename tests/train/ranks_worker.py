"""Worker of test_ranks: stage tlm's collectives on several gloo processes, one scenario per run.

``torchrun --nproc_per_node N ranks_worker.py SCENARIO MODEL OUT`` (or ``python ranks_worker.py teacher MODEL OUT``):

- ``uneven_generate``: transformers' global DeepSpeed config says ZeRO-3 (as in a ZeRO-3 run), each rank holds the
  whole model (as in per-prompt mode) and rank r makes N - r ``generate`` calls through the per-prompt paths (the
  answer, the gate's sampled candidates, TT-SI's own generator), then every rank meets in a barrier. Left to
  transformers, ``synced_gpus`` would be on and the ranks' per-token all-reduces would pair with the barrier.
- ``slow_rank``: the default group's timeout is 3 s; the last rank reaches the end-of-run wait 8 s after the others.
- ``teacher`` (one process): a local TT-D teacher loaded while transformers' DeepSpeed config says ZeRO-3.
"""

import contextlib
import datetime
import json
import sys
import time
import types

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer


def zero3_config():
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    return HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})


class _Accelerator:
    def unwrap_model(self, model):
        return model

    def autocast(self):
        return contextlib.nullcontext()


def uneven_generate(model_dir: str) -> dict:
    from transformers.integrations import is_deepspeed_zero3_enabled

    from tlm_plugin.selectors.generate import ModelGenerator
    from tlm_plugin.train.generation import generate_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # loaded before the config: whole, as per prompt
    keep = zero3_config()  # noqa: F841 (transformers holds a weak reference)
    assert is_deepspeed_zero3_enabled()
    trainer = types.SimpleNamespace(
        args=types.SimpleNamespace(device=torch.device("cpu")), processing_class=tokenizer, accelerator=_Accelerator()
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    prompt = tokenizer("the river delta", add_special_tokens=False)["input_ids"]
    gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    sample = {**gen, "do_sample": True, "num_return_sequences": 2}
    writer = ModelGenerator(model, tokenizer, torch.device("cpu"), lambda text: tokenizer(text)["input_ids"])
    calls = 0
    for _ in range(world - rank):
        generate_ids(trainer, model, [prompt], gen, False)
        generate_ids(trainer, model, [prompt], sample, False)
        writer("write an example", 1.0, 1.0, 6, seed=rank)
        calls += 3
    dist.barrier()
    return {"rank": rank, "calls": calls}


def slow_rank() -> dict:
    from tlm_plugin.train.backend import set_timeouts, wait_for_all

    set_timeouts(3)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == world - 1:
        time.sleep(8)
    start = time.monotonic()
    wait_for_all()
    return {"rank": rank, "waited_s": time.monotonic() - start}


def teacher(model_dir: str) -> dict:
    from tlm_plugin.selectors.generate import load_teacher

    keep = zero3_config()  # noqa: F841
    generator = load_teacher(model_dir, torch.device("cpu"), torch.float32)
    params = list(generator.model.parameters())
    reply = generator("the river delta", 1.0, 1.0, 4, seed=0)
    return {
        "partitioned": sum(hasattr(p, "ds_id") for p in params),
        "empty": sum(p.numel() == 0 for p in params),
        "reply": reply,
    }


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[-1]
    if scenario == "teacher":
        result = teacher(sys.argv[2])
    else:
        timeout = datetime.timedelta(seconds=3 if scenario == "slow_rank" else 120)
        dist.init_process_group("gloo", timeout=timeout)
        result = uneven_generate(sys.argv[2]) if scenario == "uneven_generate" else slow_rank()
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, result)
        result = {"ranks": parts}
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f)
    # no destroy_process_group: with torch 2.6 and extra gloo groups, gloo ranks can hang in it at exit (the
    # product's runs end through LLaMA-Factory's own teardown, tested end to end in test_ranks)


if __name__ == "__main__":
    main()
