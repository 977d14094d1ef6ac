"""The predict step of an AdaptEval cell on LLaMA-Factory's vLLM engine (``adapteval run --backend vllm``, GPUs).

An offline method splits into "adapt, then answer": the cell's ``llamafactory-cli train`` run adapts with
``do_predict: false`` and saves its LoRA adapter, then this step answers every test prompt with
``llamafactory.chat.vllm_engine.VllmEngine`` (the engine of ``llamafactory-cli chat/api`` with
``infer_backend: vllm``), the adapter attached as a LoRA request. All prompts are submitted at once, so vLLM
schedules them in continuous batches. Online methods and per-prompt fine-tuning answer in between updates and keep
the Hugging Face generation of the training run (the planner decides, see ``adapteval.plan.predicts_separately``).

The prompts are the dataset's conversations as LLaMA-Factory aligns them (system prompt, tools, user turns), and
the engine encodes them with the recipe's template exactly as the HF predict path does (``encode_oneturn`` with an
empty assistant turn). Greedy decoding, stop tokens and ``max_new_tokens`` come from the recipe's generation keys.
Unlike the HF path, a prompt longer than ``cutoff_len`` is not truncated: ``vllm_maxlen`` is set to fit the
longest prompt plus ``max_new_tokens``.

Run: ``python -m adapteval.vllm_predict PREDICT.yaml``; PREDICT.yaml holds LLaMA-Factory inference arguments
(``inference_args`` builds them from a cell's recipe) and ``predictions_file``. It writes ``predictions_file``
(LLaMA-Factory's ``generated_predictions.jsonl`` format: one ``{"prompt", "predict", "label"}`` line per row, in
dataset order) and ``predict_results.json`` beside it.
"""

import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tlm_plugin.train.outputs import PREDICT_RESULTS_FILE, atomic_write


PREDICTIONS_KEY = "predictions_file"
DEFAULT_MAX_LORA_RANK = 32  # LLaMA-Factory's vllm_max_lora_rank default

EngineFactory = Callable[
    [dict[str, Any]], Any
]  # inference args -> object with ``async chat(messages, system, tools)``


def _infer_fields() -> set[str]:
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments

    return {
        f.name
        for cls in (ModelArguments, DataArguments, FinetuningArguments, GeneratingArguments)
        for f in dataclasses.fields(cls)
    }


def inference_args(recipe: dict[str, Any], adapter_dir: str | Path | None) -> dict[str, Any]:
    """LLaMA-Factory inference arguments for answering ``recipe``'s dataset with vLLM (training keys dropped).

    ``adapter_dir``: the LoRA adapter the cell's training run saved (None: the unadapted model).
    """
    fields = _infer_fields()
    args = {k: v for k, v in recipe.items() if k in fields and not k.startswith("tlm_")}
    args.update(stage="sft", infer_backend="vllm", adapter_name_or_path=None)
    if adapter_dir is not None:
        args["adapter_name_or_path"] = str(adapter_dir)
        rank = int(recipe.get("lora_rank") or 8)
        if rank > DEFAULT_MAX_LORA_RANK:
            args["vllm_max_lora_rank"] = 1 << (rank - 1).bit_length()  # vLLM takes powers of two
    if recipe.get("bf16"):
        args["infer_dtype"] = "bfloat16"
    elif recipe.get("fp16"):
        args["infer_dtype"] = "float16"
    for key in ("eval_dataset", "val_size", "packing", "neat_packing", "train_on_prompt", "mask_history"):
        args.pop(key, None)  # training-data options: the prediction answers the dataset's own rows
    return {k: v for k, v in args.items() if v is not None}


def load_requests(args: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """One request per dataset row (``messages``, ``system``, ``tools``, ``label``, ``prompt``) in dataset order, and
    the longest templated prompt in tokens."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_tokenizer
    from transformers import Seq2SeqTrainingArguments

    from tlm_plugin import seam

    # parse as a Hugging Face inference run: the same data and template arguments, no vLLM needed to read data
    parse = {k: v for k, v in args.items() if k != PREDICTIONS_KEY}
    model_args, data_args, _, _ = get_infer_args({**parse, "infer_backend": "huggingface"})
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    training_args = Seq2SeqTrainingArguments(output_dir=str(Path(args[PREDICTIONS_KEY]).parent), report_to="none")
    rows = seam.merged_dataset(data_args.dataset, model_args, data_args, training_args, stage="sft")
    if rows is None or len(rows) == 0:
        raise ValueError(f"dataset {args.get('dataset')!r} has no rows to answer")
    requests, longest = [], 0
    for row in rows:
        messages = list(row["_prompt"])
        system, tools = row["_system"] or None, row["_tools"] or None
        prompt_ids, _ = template.encode_oneturn(
            tokenizer, messages + [{"role": "assistant", "content": ""}], system, tools
        )
        longest = max(longest, len(prompt_ids))
        label = row["_response"][0]["content"] if len(row["_response"]) == 1 else ""
        requests.append(
            {
                "messages": messages,
                "system": system,
                "tools": tools,
                "label": label,
                "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=False),
                "prompt_ids": prompt_ids,
            }
        )
    return requests, longest


def vllm_engine(args: dict[str, Any]):
    """LLaMA-Factory's vLLM engine for ``args`` (needs the ``vllm`` package and a GPU)."""
    from llamafactory.chat.vllm_engine import VllmEngine
    from llamafactory.hparams import get_infer_args

    return VllmEngine(*get_infer_args(args))


async def _answer_all(engine, requests: list[dict[str, Any]]) -> list[str]:
    async def one(request: dict[str, Any]) -> str:
        responses = await engine.chat(request["messages"], request["system"], request["tools"])
        return responses[0].response_text if responses else ""

    return list(await asyncio.gather(*(one(r) for r in requests)))


def predict(args: dict[str, Any], engine_factory: EngineFactory = vllm_engine) -> Path:
    """Answer every row of ``args``'s dataset; write the predictions file and predict_results.json. Returns the
    predictions file. Nothing is written unless every row was answered."""
    args = dict(args)
    out_path = Path(args[PREDICTIONS_KEY])
    requests, longest = load_requests(args)
    engine_args = {k: v for k, v in args.items() if k != PREDICTIONS_KEY}
    engine_args.pop("cutoff_len", None)
    needed = longest + int(args.get("max_new_tokens") or 512)
    engine_args["vllm_maxlen"] = max(int(args.get("vllm_maxlen") or 0), needed)
    start = time.perf_counter()
    engine = engine_factory(engine_args)
    answers = asyncio.run(_answer_all(engine, requests))
    runtime = time.perf_counter() - start
    if len(answers) != len(requests):
        raise RuntimeError(f"the engine returned {len(answers)} answers for {len(requests)} prompts")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"prompt": r["prompt"], "predict": a, "label": r["label"]}, ensure_ascii=False)
        for r, a in zip(requests, answers)
    ]
    atomic_write(out_path, "\n".join(lines) + "\n")
    results = {
        "predict_backend": "vllm",
        "predict_runtime": round(runtime, 4),
        "predict_samples": len(requests),
        "predict_samples_per_second": round(len(requests) / runtime, 3) if runtime > 0 else None,
        "adapter_name_or_path": args.get("adapter_name_or_path"),
    }
    atomic_write(out_path.parent / PREDICT_RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    return out_path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m adapteval.vllm_predict PREDICT.yaml", file=sys.stderr)
        return 2
    args = yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8"))
    if not isinstance(args, dict) or PREDICTIONS_KEY not in args:
        print(f"{argv[0]}: expected a YAML mapping with {PREDICTIONS_KEY}", file=sys.stderr)
        return 2
    path = predict(args)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
