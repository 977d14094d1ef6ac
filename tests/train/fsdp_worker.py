"""Worker of test_backends: the no-grad passes of stage tlm on a model sharded by torch's FSDP2 (``fully_shard``).

``torchrun --nproc_per_node 2 fsdp_worker.py MODEL OUT`` shards the model over two gloo processes; with ``--single``
it runs the same passes in one process on the unsharded model. Both write the per-row NLL sums and greedy answers.
"""

import contextlib
import json
import sys
import types

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer


ROWS = [  # five rows of different lengths: two ranks hold 3 and 2 rows, in batches of different shapes
    "the river delta",
    "interest rates change bond prices and mortgage costs over many years",
    "a fever",
    "photosynthesis converts light energy",
    "diversifying a portfolio reduces the risk of large losses from one asset class",
]


class _Accelerator:
    def unwrap_model(self, model):
        return model

    def autocast(self):
        return contextlib.nullcontext()


def main() -> None:
    model_dir, out, single = sys.argv[1], sys.argv[2], "--single" in sys.argv
    if not single:
        dist.init_process_group("gloo")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if not single:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        register_fsdp_forward_method(model, "generate")  # as transformers' Trainer does for FSDP2
    trainer = types.SimpleNamespace(
        args=types.SimpleNamespace(device=torch.device("cpu")),
        processing_class=tokenizer,
        accelerator=_Accelerator(),
        model=model,
        model_wrapped=model,
        is_fsdp_enabled=not single,
        is_deepspeed_enabled=False,
    )
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ROWS]
    dataset = Dataset.from_dict({"input_ids": ids, "index": list(range(len(ids)))})

    from tlm_plugin.train.backend import shards_parameters
    from tlm_plugin.train.generation import generate_answers
    from tlm_plugin.train.passes import nll_pass

    result = nll_pass(trainer, dataset, masks=("loss_mask",), batch_size=2, prefix_cache=False)
    gen = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    answers = generate_answers(trainer, dataset, gen, batch_size=2)
    if single or dist.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "sharded": shards_parameters(trainer),
                    "index": result["index"].tolist(),
                    "nll": result["loss_mask_nll"].tolist(),
                    "answers": answers,
                },
                f,
            )
    if not single:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
