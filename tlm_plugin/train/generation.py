"""Answers to test prompts: batched greedy (or sampled) generation with the current model, and the files it fills.

Generation runs wherever stage tlm needs answers: after offline adaptation, between the updates of online mode, for
each prompt of per-prompt mode. It goes through :func:`tlm_plugin.train.backend.no_grad_model`, never through
``Trainer.predict``, so it works before, inside and after the training loop under every backend (ZeRO-3 / FSDP:
lock-step batches and ``synced_gpus``). ``generated_predictions.jsonl`` has LLaMA-Factory's format (``prompt``,
``predict``, ``label`` per line) and ``predict_results.json`` LLaMA-Factory's similarity metrics.
"""

import contextlib
import importlib.util
import json
import os
from typing import Any

import numpy as np
import torch
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.logging import get_logger
from llamafactory.train.sft.metric import ComputeSimilarity
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import EvalPrediction

from tlm_plugin.train.backend import (
    all_gather_objects,
    lockstep_count,
    my_rows,
    no_grad_model,
    progress,
    rank_and_world,
    shards_parameters,
)
from tlm_plugin.train.batching import pad_batch


logger = get_logger(__name__)


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) left-padded ids and attention mask, as generation needs."""
    batch = pad_batch(sequences, pad_id, left=True, device=device)
    return batch["input_ids"], batch["attention_mask"]


def _summon(module) -> contextlib.AbstractContextManager:
    """FSDP1 generates with the root's full parameters gathered (as transformers' own Seq2SeqTrainer does); the
    wrapped layers gather their own in their forwards. FSDP2 registers ``generate`` as a forward method instead."""
    if isinstance(module, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(module, writeback=False, recurse=False)
    return contextlib.nullcontext()


def synced_gpus(lockstep: bool) -> bool:
    """The ``synced_gpus`` flag of every ``generate`` call of stage tlm, always passed explicitly.

    True exactly when the forwards are collective (ZeRO-3 / FSDP with more than one rank): then every rank decodes
    until the last one is done. False otherwise, also under ZeRO-3 in per-prompt mode, where each rank holds the
    whole model and makes its own number of calls; left to transformers, ``generate`` turns it on whenever ZeRO-3
    or FSDP is active and pairs its per-token all-reduces with whatever collective another rank is in.
    """
    return bool(lockstep) and rank_and_world()[1] > 1


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, lockstep: bool, **kwargs) -> torch.Tensor:
    """``model.generate`` (prompt + answer ids, no gradient) with ``synced_gpus`` set by :func:`synced_gpus`."""
    kwargs["synced_gpus"] = synced_gpus(lockstep)
    with torch.no_grad(), _summon(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def generate_ids(trainer, model, prompts: list[list[int]], gen_kwargs: dict[str, Any], lockstep: bool) -> list:
    """Answer ids (prompt and padding removed) for ``prompts``, one ``generate`` call on an open model."""
    pad_id = trainer.processing_class.pad_token_id
    ids, mask = left_pad(prompts, pad_id, trainer.args.device)
    with trainer.accelerator.autocast():
        out = generate(model, ids, mask, lockstep, **gen_kwargs)
    return [[t for t in row if t != pad_id] for row in out[:, ids.shape[1] :].tolist()]


def generate_answers(trainer, dataset, gen_kwargs: dict[str, Any], batch_size: int) -> list[list[int]]:
    """Answer ids for every row of ``dataset`` (its ``input_ids``), in dataset order, complete on every rank.

    Rows are sharded across ranks (rank, rank + world, ...) and batched in dataset order, ``batch_size`` at a time
    (LLaMA-Factory's ``per_device_eval_batch_size``).
    """
    rows = my_rows(len(dataset))
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    lockstep = shards_parameters(trainer)
    n_batches = lockstep_count(len(batches), lockstep) if len(dataset) else 0
    local: dict[int, list[int]] = {}
    with no_grad_model(trainer) as model, progress(n_batches, "answering") as bar:
        for b in range(n_batches):
            bar.update()
            batch_rows = batches[b] if b < len(batches) else [0]
            answers = generate_ids(
                trainer, model, [list(dataset[r]["input_ids"]) for r in batch_rows], gen_kwargs, lockstep
            )
            if b < len(batches):
                local.update(zip(batch_rows, answers))
    merged: dict[int, list[int]] = {}
    for part in all_gather_objects(local):
        merged.update(part)
    return [merged[i] for i in range(len(dataset))]


def prediction_lines(tokenizer, prompts, answers, labels, skip_special_tokens: bool) -> list[str]:
    """Lines of ``generated_predictions.jsonl`` exactly as LLaMA-Factory's sft predict writes them."""
    labels = [[t for t in lab if t != IGNORE_INDEX] for lab in labels]
    decoded_prompts = tokenizer.batch_decode([list(p) for p in prompts], skip_special_tokens=False)
    decoded_preds = tokenizer.batch_decode(answers, skip_special_tokens=skip_special_tokens)
    decoded_labels = tokenizer.batch_decode(labels, skip_special_tokens=skip_special_tokens)
    return [
        json.dumps({"prompt": p, "predict": a, "label": lab}, ensure_ascii=False) + "\n"
        for p, a, lab in zip(decoded_prompts, decoded_preds, decoded_labels)
    ]


METRIC_PACKAGES = {"jieba": "jieba", "nltk": "nltk", "rouge_chinese": "rouge-chinese"}


def similarity_metrics(tokenizer, answers: list[list[int]], labels: list[list[int]]) -> dict[str, float]:
    """LLaMA-Factory's predict metrics (ROUGE-1/2/L, BLEU-4 x 100, means over rows) of these answers; empty, with one
    warning, where the packages LLaMA-Factory computes them with are missing (the predictions are written anyway)."""
    if not answers:
        return {}
    missing = [pip for module, pip in METRIC_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        if not getattr(similarity_metrics, "warned", False):
            similarity_metrics.warned = True
            logger.warning(
                f"ROUGE / BLEU of the answers are left out: LLaMA-Factory computes them with {', '.join(missing)}, "
                f"which is not installed (pip install {' '.join(missing)})."
            )
        return {}
    pad = tokenizer.pad_token_id
    width_p = max(1, max(len(a) for a in answers))
    width_l = max(1, max(len(lab) for lab in labels))
    preds = np.full((len(answers), width_p), pad, dtype=np.int64)
    refs = np.full((len(labels), width_l), IGNORE_INDEX, dtype=np.int64)
    for i, (a, lab) in enumerate(zip(answers, labels)):
        preds[i, : len(a)] = a
        refs[i, : len(lab)] = lab
    return ComputeSimilarity(tokenizer=tokenizer)(
        EvalPrediction(predictions=preds, label_ids=refs), compute_result=True
    )


def append_lines(path: str, lines: list[str]) -> None:
    """Append complete lines and make them durable before returning (an interrupted run loses none of them)."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
