"""Offline adaptation (``tlm_mode: offline``): score every prompt with the unadapted model, learn, then answer.

What it learns from depends on the method's kind: the test prompts weighted by a ``weights`` method (TLM's S(x),
Eq. 6 of the paper, and its controls), or the rows a ``pool`` method (SIFT, nearest neighbours) picks from a pool for
all prompts at once: a selection over a pool, weighted by TLM's lambda * exp(log P - log P0).
The scoring pass runs once; its results are written to ``tlm_scores.jsonl`` before training, so a resumed run
(HF checkpoints, ``save_steps``) trains on exactly the rows and weights of the interrupted one without rescoring.
"""

import json
import os
import time
from typing import Any

import numpy as np
import torch
from llamafactory.extras.logging import get_logger

from tlm_plugin.objectives.step import estimate_fisher
from tlm_plugin.train import outputs
from tlm_plugin.train.backend import barrier
from tlm_plugin.train.data import LazyPool, message_text
from tlm_plugin.train.embeddings import check_embeddings, encoder_embeddings, pool_store
from tlm_plugin.train.generation import generate_answers
from tlm_plugin.train.passes import mean_nll
from tlm_plugin.train.pool_store import PoolStore
from tlm_plugin.train.run import base_rows, measure_after, save_predictions


logger = get_logger(__name__)


def _scored_rows(run) -> list[dict[str, Any]]:
    """The before-scores of an interrupted run, if it is being resumed (else None)."""
    if run.resume_from is None:
        return None
    rows = outputs.read_jsonl(os.path.join(run.output_dir, outputs.SCORES_FILE))
    if len(rows) != len(run.prompts) or [r["index"] for r in rows] != list(range(len(run.prompts))):
        return None
    logger.info_rank0("Resuming: the scores and selection of the interrupted run are reused.")
    return rows


def _write_scores(run, rows: list[dict[str, Any]]) -> None:
    if run.is_main:
        os.makedirs(run.output_dir, exist_ok=True)
        outputs.atomic_write(
            os.path.join(run.output_dir, outputs.SCORES_FILE), "".join(outputs.jsonl_line(r) for r in rows)
        )
    barrier()


def run(run) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The mode's entry: weighted test prompts, or a selection over a pool; then the after-pass."""
    rows, stats = run_pool_subset(run) if run.tlm_args.kind == "pool" else run_offline(run)
    measure_after(run, rows, stats)
    return rows, stats


def _train_and_answer(run, train_rows, rows, stats) -> None:
    trainer, args = run.trainer, run.training_args
    if args.do_train:
        start = time.perf_counter()
        if train_rows is None or len(train_rows) == 0:
            logger.warning_rank0("Nothing is selected: nothing to learn; the adapter is unchanged.")
        else:
            stats.update(trainer.fit(train_rows, resume_from_checkpoint=args.resume_from_checkpoint))
            for row in rows:  # entropy objectives: the objective's own score of each trained row
                rec = trainer.records.get(row["index"], {}) if hasattr(trainer, "records") else {}
                if "entropy" in rec:
                    row.update(
                        entropy=rec["entropy"], objective_selected=rec["selected"], objective_weight=rec["weight"]
                    )
        trainer.save_adapter()
        run.timings["train_s"] = time.perf_counter() - start
    if args.do_predict:
        start = time.perf_counter()
        answers = generate_answers(trainer, run.eval_dataset, run.gen_kwargs, args.per_device_eval_batch_size)
        save_predictions(run, answers, start)
        run.timings["predict_s"] = time.perf_counter() - start


def _empty_stats() -> dict[str, Any]:
    return {"backward_rows": 0, "optimizer_steps": 0, "skipped_steps": 0, "overflow_steps": 0, "nonfinite_rows": []}


def run_offline(run) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score all prompts once (unadapted model), train on the selected ones, answer."""
    rows = _scored_rows(run)
    if rows is None:
        start = time.perf_counter()
        scores = run.prompt_scores()
        run.timings["score_before_s"] = time.perf_counter() - start
        rows = base_rows(run, scores)
        weights = run.trainer.selector.weights(torch.tensor([r["log_ppl"] for r in rows], dtype=torch.float32))
        weights = torch.nan_to_num(weights, nan=0.0).numpy()
        for row, w in zip(rows, weights):
            row.update(selected=bool(w > 0), weight=float(w))
        _write_scores(run, rows)
    selected = [r["index"] for r in rows if r["selected"]]
    train_rows = None
    if selected:
        train_rows = run.prompts.select(selected).add_column(
            "tlm_weight", [float(rows[i]["weight"]) for i in selected]
        )
    _fisher(run, train_rows)
    stats = _empty_stats()
    _train_and_answer(run, train_rows, rows, stats)
    return rows, stats


def _fisher(run, train_rows) -> None:
    """EATA's Fisher term: estimated once, before any update, on the first prompts (objectives.fisher)."""
    if run.tlm_args.tlm_eata_fisher_coeff <= 0 or train_rows is None or not run.training_args.do_train:
        return
    n = min(run.tlm_args.tlm_eata_fisher_samples, len(train_rows))
    run.trainer.use_fisher(*estimate_fisher(run.trainer, [train_rows[i] for i in range(n)]))


def _store_embeddings(run) -> tuple[np.ndarray, PoolStore]:
    """A pool store's run: the test prompts' encoder vectors (their messages, as the pool rows are read) and the
    store of ``tlm_pool_dataset`` (embedded shard by shard, or reused), with its faiss index."""
    a, args = run.tlm_args, run.training_args
    device = str(args.device)
    dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)  # used on GPUs only
    if run.aligned is not None and len(run.aligned) == len(run.prompts):
        texts = [message_text(prompt) for prompt in run.aligned["_prompt"]]
    else:  # LLaMA-Factory dropped invalid rows: the processed prompts, decoded, stand for their messages
        logger.warning_rank0(
            "The test prompts are embedded from their templated text (some dataset rows were dropped)."
        )
        tok = run.trainer.processing_class
        texts = tok.batch_decode([list(x) for x in run.prompts["input_ids"]], skip_special_tokens=True)
    prompt_emb = encoder_embeddings(a.tlm_sift_embedder, texts, device=device, dtype=dtype)
    store = pool_store(
        a.tlm_sift_embedder,
        run.pool,
        device=device,
        dtype=dtype,
        root=a.tlm_pool_store,
        shard_rows=a.tlm_pool_shard_rows,
        dtype_on_disk=a.tlm_pool_dtype,
        index=a.tlm_pool_index,
        nprobe=a.tlm_pool_nprobe,
    )
    check_embeddings("test-prompt", prompt_emb)
    if run.is_main:
        torch.save(
            {"embedder": a.tlm_sift_embedder, "prompts": torch.from_numpy(prompt_emb), "pool": store.describe()},
            os.path.join(run.output_dir, outputs.EMBEDDINGS_FILE),
        )
    run.pool_store = store.describe()
    return prompt_emb, store


def _embeddings(run, prompt_scores, pool_scores) -> tuple[np.ndarray, np.ndarray]:
    embedder = run.tlm_args.tlm_sift_embedder
    pool = run.pool if run.pool is not None else run.prompts
    if isinstance(run.pool, LazyPool):
        return _store_embeddings(run)
    if embedder == "model":
        prompt_emb, pool_emb = prompt_scores["embedding"], pool_scores["embedding"]
    else:
        tok = run.trainer.processing_class
        device = str(run.training_args.device)

        def texts(dataset):
            return tok.batch_decode([list(x) for x in dataset["input_ids"]], skip_special_tokens=True)

        args = run.training_args
        dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)  # used on GPUs only
        prompt_emb = encoder_embeddings(embedder, texts(run.prompts), device=device, dtype=dtype)
        pool_emb = (
            prompt_emb if run.pool is None else encoder_embeddings(embedder, texts(pool), device=device, dtype=dtype)
        )
    check_embeddings("test-prompt", prompt_emb)
    check_embeddings("pool", pool_emb)
    if run.is_main:
        torch.save(
            {"embedder": embedder, "prompts": torch.from_numpy(prompt_emb), "pool": torch.from_numpy(pool_emb)},
            os.path.join(run.output_dir, outputs.EMBEDDINGS_FILE),
        )
    return prompt_emb, pool_emb


def pool_scores_and_embeddings(run) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Scores of the prompts and of the pool (the prompts themselves without ``tlm_pool_dataset``) and their
    embeddings (the LLM's own from the same pass, or a sentence encoder's)."""
    embed = run.tlm_args.tlm_sift_embedder == "model"
    prompt_scores = run.prompt_scores(embed=embed)
    if run.pool is None:
        pool_scores = prompt_scores
    elif not embed and (run.tlm_args.per_prompt or isinstance(run.pool, LazyPool)):
        pool_scores = {}  # per prompt, pool rows need no score; a pool store's picked rows are scored once picked
    else:
        pool_scores = run.score(run.pool, embed=embed, desc="embedding the pool")
        pool_scores["log_ppl"] = mean_nll(pool_scores, "loss_mask")
    prompt_emb, pool_emb = _embeddings(run, prompt_scores, pool_scores)
    return prompt_scores, pool_scores, prompt_emb, pool_emb


def write_selection(run, lines: list[dict[str, Any]]) -> None:
    if run.is_main:
        outputs.atomic_write(
            os.path.join(run.output_dir, outputs.SIFT_SELECTION_FILE), "".join(json.dumps(x) + "\n" for x in lines)
        )


def run_pool_subset(run) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """SIFT / nearest for all prompts at once: pick ``tlm_sift_budget`` pool rows (repeats allowed, one training
    step each), weighted by TLM's lambda * exp(log P - log P0), train on them, answer."""
    tlm_args = run.tlm_args
    start = time.perf_counter()
    prompt_scores, pool_scores, prompt_emb, pool_emb = pool_scores_and_embeddings(run)
    run.timings["score_before_s"] = time.perf_counter() - start
    rows = base_rows(run, prompt_scores)

    start = time.perf_counter()
    pool_emb = torch.from_numpy(pool_emb) if isinstance(pool_emb, np.ndarray) else pool_emb
    picks, variances = run.trainer.selector.select(torch.from_numpy(prompt_emb), pool_emb)
    picks = picks.tolist()
    write_selection(run, [{"targets": "all", "picks": picks, "variances": variances.tolist()}])
    run.timings["select_s"] = time.perf_counter() - start
    if "log_ppl" not in pool_scores:  # a pool store: only the picked rows are scored
        unique = sorted(set(picks))
        scored = run.score(run.pool.select(unique), desc="scoring the picked pool rows") if unique else None
        by_row = dict(zip(unique, mean_nll(scored, "loss_mask"))) if unique else {}
        pool_log_ppl = np.array([by_row[p] for p in picks], dtype=np.float64)
    else:
        pool_log_ppl = pool_scores["log_ppl"][picks]
    weights = pool_log_ppl_weights(pool_log_ppl, tlm_args.tlm_lambda, tlm_args.tlm_log_p0)
    counts = np.bincount(np.asarray(picks, dtype=np.int64), minlength=len(pool_emb))
    for row in rows:  # which test prompts were learned from (only meaningful when the pool is the test set)
        count = int(counts[row["index"]]) if run.pool is None else 0
        row.update(
            selected=count > 0,
            picks=count,
            weight=float(tlm_args.tlm_lambda * np.exp(row["log_ppl"] - tlm_args.tlm_log_p0)) if count else 0.0,
        )
    pool = run.pool if run.pool is not None else run.prompts
    train_rows = pool.select(picks).add_column("tlm_weight", weights.tolist()) if picks else None
    stats = _empty_stats()
    _train_and_answer(run, train_rows, rows, stats)
    return rows, stats


def pool_log_ppl_weights(log_ppl: np.ndarray, lam: float, log_p0: float) -> np.ndarray:
    """TLM's weight lambda * exp(log P - log P0) for rows a pool selector picked (the pick replaces the threshold)."""
    return (lam * np.exp(np.nan_to_num(log_ppl, nan=log_p0) - log_p0)).astype(np.float32)
