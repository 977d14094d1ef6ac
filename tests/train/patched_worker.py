"""Worker of test_deepspeed_paths: a real stage-tlm run (``run_exp`` on a recipe) with one piece observed or altered.

``[torchrun --nproc_per_node 1] patched_worker.py SCENARIO RECIPE.yaml OUT.json``:

- ``poison N``: the micro-batch holding row N gets a NaN loss (a non-finite loss, as fp16 overflow or a bad row
  gives); OUT records the run's counters.
- ``hooks``: after every ZeRO-3 inference engine is taken down, OUT records how many forward hooks the model
  carries (each engine left behind would add two).
"""

import json
import sys

import yaml


def main() -> None:
    scenario, recipe_path, out = sys.argv[1], sys.argv[-2], sys.argv[-1]
    from llamafactory.train.tuner import run_exp

    from tlm_plugin.train import backend
    from tlm_plugin.train import trainer as trainer_module

    observed: dict = {"hooks": []}
    if scenario == "poison":
        poisoned_row = int(sys.argv[2])
        original_loss, original_compute = trainer_module.tlm_loss, trainer_module.TLMTrainer.compute_loss
        current = {"rows": []}

        def poisoned(log_ppl, weights):
            loss = original_loss(log_ppl, weights)
            return loss * float("nan") if poisoned_row in current["rows"] else loss

        def compute(self, model, inputs, *args, **kwargs):
            current["rows"] = [int(i) for i in inputs["index"]]
            return original_compute(self, model, inputs, *args, **kwargs)

        trainer_module.tlm_loss = poisoned
        trainer_module.TLMTrainer.compute_loss = compute
    elif scenario == "hooks":
        original_release = backend._release_inference_engine

        def release(trainer, engine):
            original_release(trainer, engine)
            model = trainer.accelerator.unwrap_model(trainer.model)
            observed["hooks"].append(len(model._forward_pre_hooks) + len(model._forward_hooks))

        backend._release_inference_engine = release
    with open(recipe_path, encoding="utf-8") as f:
        run_exp(yaml.safe_load(f))
    with open(out, "w", encoding="utf-8") as f:
        json.dump(observed, f)


if __name__ == "__main__":
    main()
