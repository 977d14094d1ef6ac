"""``tlm_selector: sift | nearest``: learn from pool rows chosen by embedding, for all prompts or per prompt.

Subset (``tlm_reset: never``): targets = every test prompt; the selector picks ``tlm_sift_budget`` pool rows
(repeats allowed, one training step each), weighted by TLM's lambda * exp(log P - log P0); then the usual
training and predictions. Per prompt (``tlm_reset: prompt``): see :mod:`tlm_plugin.train.per_prompt`.
Both write ``tlm_sift_selection.jsonl``: the chosen pool indices in pick order and the targets' total posterior
variance after each pick, and cache the embeddings in ``tlm_embeddings.pt``.
"""

import json
import os
import time
from typing import Any

import numpy as np
import torch
from llamafactory.extras.constants import IGNORE_INDEX
from transformers.trainer_utils import PredictionOutput

from tlm_plugin.train.embeddings import check_embeddings, encoder_embeddings
from tlm_plugin.train.per_prompt import pool_log_ppl_weights, run_per_prompt


SELECTION_FILE = "tlm_sift_selection.jsonl"
EMBEDDINGS_FILE = "tlm_embeddings.pt"


def _embeddings(trainer, prompts, pool, prompt_scores, pool_scores) -> tuple[np.ndarray, np.ndarray]:
    embedder = trainer.tlm_args.tlm_sift_embedder
    if embedder == "model":
        prompt_emb, pool_emb = prompt_scores["embedding"], pool_scores["embedding"]
    else:
        tok = trainer.processing_class
        device = str(trainer.args.device)
        prompt_emb = encoder_embeddings(
            embedder,
            tok.batch_decode([list(x) for x in prompts["input_ids"]], skip_special_tokens=True),
            device=device,
        )
        pool_emb = (
            prompt_emb
            if pool is prompts
            else encoder_embeddings(
                embedder,
                tok.batch_decode([list(x) for x in pool["input_ids"]], skip_special_tokens=True),
                device=device,
            )
        )
    check_embeddings("test-prompt", prompt_emb)
    check_embeddings("pool", pool_emb)
    if trainer.is_world_process_zero():
        os.makedirs(trainer.args.output_dir, exist_ok=True)
        torch.save(
            {"embedder": embedder, "prompts": torch.from_numpy(prompt_emb), "pool": torch.from_numpy(pool_emb)},
            os.path.join(trainer.args.output_dir, EMBEDDINGS_FILE),
        )
    return prompt_emb, pool_emb


def _write_selection(trainer, lines: list[dict[str, Any]]) -> None:
    if trainer.is_world_process_zero():
        path = os.path.join(trainer.args.output_dir, SELECTION_FILE)
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        os.replace(f"{path}.tmp", path)


def run_pool_selection(trainer, prompts, pool, eval_dataset, score_bs, timings):
    args, tlm_args = trainer.args, trainer.tlm_args
    embed = tlm_args.tlm_sift_embedder == "model"
    start = time.perf_counter()
    prompt_scores = trainer.score(prompts, batch_size=score_bs, embed=embed)
    pool_scores = prompt_scores if pool is prompts else trainer.score(pool, batch_size=score_bs, embed=embed)
    prompt_emb, pool_emb = _embeddings(trainer, prompts, pool, prompt_scores, pool_scores)
    timings["score_before_s"] = time.perf_counter() - start
    stats = {"backward_rows": 0, "optimizer_steps": 0, "skipped_steps": 0, "nonfinite_rows": []}
    rows = [
        {"index": int(i), "n_tokens": int(n), "log_ppl": float(lp)}
        for i, n, lp in zip(prompt_scores["index"], prompt_scores["n_tokens"], prompt_scores["log_ppl"])
    ]
    if "log_ppl_user" in prompt_scores:
        for row, lp in zip(rows, prompt_scores["log_ppl_user"].tolist()):
            row["log_ppl_user"] = lp

    if tlm_args.tlm_reset == "prompt":
        return _per_prompt(trainer, prompts, pool, eval_dataset, prompt_emb, pool_emb, rows, stats, timings)

    start = time.perf_counter()
    picks, variances = trainer.selector.pick(torch.from_numpy(prompt_emb), torch.from_numpy(pool_emb))
    picks = picks.tolist()
    _write_selection(trainer, [{"targets": "all", "picks": picks, "variances": variances.tolist()}])
    timings["select_s"] = time.perf_counter() - start
    weights = pool_log_ppl_weights(pool_scores["log_ppl"][picks], tlm_args.tlm_lambda, tlm_args.tlm_log_p0)
    counts = np.bincount(np.asarray(picks, dtype=np.int64), minlength=len(pool))
    for row in rows:  # which test prompts were learned from (only meaningful when the pool is the test set)
        count = int(counts[row["index"]]) if pool is prompts else 0
        row.update(
            selected=count > 0,
            picks=count,
            weight=float(tlm_args.tlm_lambda * np.exp(row["log_ppl"] - tlm_args.tlm_log_p0)) if count else 0.0,
        )

    if args.do_train:
        start = time.perf_counter()
        run = trainer.fit(pool.select(picks).add_column("tlm_weight", weights.tolist()))
        trainer.save_model()
        stats.update({k: v for k, v in run.items() if k in stats})
        timings["train_s"] = time.perf_counter() - start

    prediction = trainer.predict_prompts(eval_dataset, timings) if args.do_predict else None
    return rows, stats, prediction


def _per_prompt(trainer, prompts, pool, eval_dataset, prompt_emb, pool_emb, rows, stats, timings):
    result = run_per_prompt(trainer, prompts, pool, prompt_emb, pool_emb, trainer.generation_kwargs)
    timings["per_prompt_s"] = result["seconds"]
    trainer.save_model()  # the restored starting adapter: every prompt's adaptation was discarded by design
    records = result["records"]
    _write_selection(
        trainer,
        [
            {"index": r["index"], "picks": r["picks"], "variances": r["variances"], "step_losses": r["step_losses"]}
            for r in records
        ],
    )
    for row, rec in zip(rows, records):
        row.update(selected=True, weight=1.0, picks=len(rec["picks"]), log_ppl_after=rec["log_ppl_after"])
    stats["backward_rows"] = sum(sum(loss == loss for loss in r["step_losses"]) for r in records)
    stats["optimizer_steps"] = stats["backward_rows"]
    stats["nonfinite_rows"] = [r["index"] for r in records if any(loss != loss for loss in r["step_losses"])]

    prediction = None
    if trainer.args.do_predict:
        pad = trainer.processing_class.pad_token_id
        width = max(1, max(len(r["answer_ids"]) for r in records))
        preds = np.full((len(records), width), pad, dtype=np.int64)
        for i, r in enumerate(records):
            preds[i, : len(r["answer_ids"])] = r["answer_ids"]
        labels = [list(x) for x in eval_dataset["labels"]]
        label_ids = np.full((len(labels), max(1, max(map(len, labels)))), IGNORE_INDEX, dtype=np.int64)
        for i, lab in enumerate(labels):
            label_ids[i, : len(lab)] = lab
        prediction = PredictionOutput(
            predictions=preds,
            label_ids=label_ids,
            metrics={"predict_samples": len(records), "predict_runtime": result["seconds"]},
        )
    return rows, stats, prediction
