"""``stage: tlm``: test-time learning on the test prompts themselves (Hu et al., ICML 2025).

Reads top to bottom like LLaMA-Factory's sft workflow: tokenizer, template, data, model, collator, trainer, then
the offline or online loop, the records and the predictions.
"""

import copy
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.logging import get_logger
from llamafactory.extras.ploting import plot_loss
from llamafactory.model import load_model, load_tokenizer
from llamafactory.train.sft.metric import ComputeSimilarity

from tlm_plugin.hparams import TLMConfigError
from tlm_plugin.selectors import PoolSelector, get_selector
from tlm_plugin.train.collator import TLMDataCollator
from tlm_plugin.train.pool_workflow import run_pool_selection
from tlm_plugin.train.records import write_records
from tlm_plugin.train.scope_data import with_user_scope
from tlm_plugin.train.trainer import TLMTrainer, concat_predictions


if TYPE_CHECKING:
    from datasets import Dataset
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
    from transformers import Seq2SeqTrainingArguments, TrainerCallback

    from tlm_plugin.hparams import TLMArguments


logger = get_logger(__name__)


def run_tlm(
    model_args: "ModelArguments",
    data_args: "DataArguments",
    training_args: "Seq2SeqTrainingArguments",
    finetuning_args: "FinetuningArguments",
    generating_args: "GeneratingArguments",
    tlm_args: "TLMArguments",
    callbacks: list["TrainerCallback"] | None = None,
) -> None:
    _check_training_args(training_args, data_args, tlm_args)
    timings: dict[str, float] = {}

    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage="tlm", **tokenizer_module)
    prompts = prompt_dataset(dataset_module["train_dataset"])
    _check_prompts(prompts, template, tokenizer)
    prompts = with_user_scope(
        prompts, template, tokenizer, model_args, data_args, training_args, required=tlm_args.tlm_loss_tokens == "user"
    )
    eval_dataset = dataset_module.get("eval_dataset")
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)
    tokenizer.padding_side = "left"  # generation batches; scoring/training batches are right-padded by the collator

    data_collator = TLMDataCollator(
        pad_token_id=tokenizer.pad_token_id,
        generation_collator=SFTDataCollatorWith4DAttentionMask(
            template=template,
            label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
            compute_dtype=model_args.compute_dtype,
            **tokenizer_module,
        ),
    )
    trainer = TLMTrainer(
        tlm_args=tlm_args,
        selector=get_selector(tlm_args, seed=training_args.seed),
        model=model,
        args=training_args,
        finetuning_args=finetuning_args,
        data_collator=data_collator,
        callbacks=callbacks,
        gen_kwargs=generation_kwargs(generating_args, tokenizer),
        train_dataset=prompts,
        compute_metrics=ComputeSimilarity(tokenizer=tokenizer) if training_args.predict_with_generate else None,
        **tokenizer_module,
    )
    score_bs = tlm_args.tlm_score_batch_size or training_args.per_device_train_batch_size

    if isinstance(trainer.selector, PoolSelector):
        pool = prompts
        if tlm_args.tlm_pool_dataset is not None:
            pool = _pool_dataset(tlm_args, template, model_args, data_args, training_args, tokenizer_module)
        rows, stats, prediction = run_pool_selection(trainer, prompts, pool, eval_dataset, score_bs, timings)
    elif tlm_args.tlm_mode == "offline":
        rows, stats, prediction = _run_offline(
            trainer, prompts, eval_dataset, tlm_args, training_args, score_bs, timings
        )
    else:
        rows, stats, prediction = _run_online(trainer, prompts, eval_dataset, tlm_args, training_args, timings)

    if tlm_args.tlm_reset != "prompt":  # per-prompt runs measured each prompt before restoring the adapter
        start = time.perf_counter()
        after = trainer.score(prompts, batch_size=score_bs)
        timings["score_after_s"] = time.perf_counter() - start
        for i, row in enumerate(rows):
            row["log_ppl_after"] = float(after["log_ppl"][i])
            if "log_ppl_user" in after:
                row["log_ppl_user_after"] = float(after["log_ppl_user"][i])

    if trainer.is_world_process_zero():
        write_records(
            training_args.output_dir,
            rows,
            _summary(
                rows,
                stats,
                tlm_args,
                training_args,
                timings,
                getattr(trainer.selector, "log_p0_used", None),
                trainer.score_prefix_tokens,
            ),
        )
        if training_args.do_train and finetuning_args.plot_loss:
            plot_loss(training_args.output_dir, keys=["loss"])

    if prediction is not None:
        trainer.log_metrics("predict", prediction.metrics)
        trainer.save_metrics("predict", prediction.metrics)
        trainer.save_predictions(eval_dataset, prediction, generating_args.skip_special_tokens)


def _run_offline(trainer, prompts, eval_dataset, tlm_args, training_args, score_bs, timings):
    """Score every prompt once with the unadapted model, train on the selected ones, then predict."""
    start = time.perf_counter()
    before = trainer.score(prompts, batch_size=score_bs)
    timings["score_before_s"] = time.perf_counter() - start

    weights = trainer.selector.weights(torch.from_numpy(before["log_ppl"])).numpy()
    selected = np.flatnonzero(weights > 0)
    rows = [
        {"index": int(i), "n_tokens": int(n), "log_ppl": float(lp), "selected": bool(w > 0), "weight": float(w)}
        for i, n, lp, w in zip(before["index"], before["n_tokens"], before["log_ppl"], weights)
    ]
    if "log_ppl_user" in before:
        for row, lp in zip(rows, before["log_ppl_user"].tolist()):
            row["log_ppl_user"] = lp
    stats = {"backward_rows": 0, "optimizer_steps": 0, "skipped_steps": 0, "nonfinite_rows": []}

    if training_args.do_train:
        start = time.perf_counter()
        if len(selected) == 0:
            logger.warning_rank0(
                "No prompt is above the perplexity threshold: nothing to learn; the adapter is unchanged."
            )
        else:
            run = trainer.fit(
                prompts.select(selected.tolist()).add_column(
                    "tlm_weight", weights[selected].astype(np.float32).tolist()
                ),
                resume_from_checkpoint=training_args.resume_from_checkpoint,
            )
            stats.update({k: v for k, v in run.items() if k in stats})
            for row in rows:  # entropy objectives: the objective's own score of each trained row
                rec = run["records"].get(row["index"], {})
                if "entropy" in rec:
                    row.update(
                        entropy=rec["entropy"], objective_selected=rec["selected"], objective_weight=rec["weight"]
                    )
        trainer.save_model()
        timings["train_s"] = time.perf_counter() - start

    prediction = trainer.predict_prompts(eval_dataset, timings) if training_args.do_predict else None
    return rows, stats, prediction


def _run_online(trainer, prompts, eval_dataset, tlm_args, training_args, timings):
    """Algorithm 1: for each chunk of the stream, answer it with the current model, then learn from it."""
    n_rows, chunk = len(prompts), tlm_args.tlm_chunk_size
    n_chunks = (n_rows + chunk - 1) // chunk
    outputs: list = []
    state: dict[str, Any] = {"predicted": -1, "initial": None, "predict_s": 0.0}

    def predict_through(chunk_id: int) -> None:
        while state["predicted"] < min(chunk_id, n_chunks - 1):
            state["predicted"] += 1
            c = state["predicted"]
            if training_args.do_predict:
                start = time.perf_counter()
                part = eval_dataset.select(range(c * chunk, min((c + 1) * chunk, n_rows)))
                outputs.append(trainer.predict(part, metric_key_prefix="predict", **trainer.generation_kwargs))
                state["predict_s"] += time.perf_counter() - start
            if tlm_args.tlm_reset == "chunk":
                if state["initial"] is None:
                    state["initial"] = _snapshot(trainer)
                elif c > 0:
                    _restore(trainer, state["initial"])

    stats = {"backward_rows": 0, "optimizer_steps": 0, "skipped_steps": 0, "nonfinite_rows": []}
    start = time.perf_counter()
    records: dict = {}
    if training_args.do_train:
        trainer.before_step = lambda top_row: predict_through(top_row // chunk)
        run = trainer.fit(prompts, resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.before_step = None
        trainer.save_model()
        stats.update({k: v for k, v in run.items() if k in stats})
        records = run["records"]
    predict_through(n_chunks - 1)  # chunks the loop never reached (or no training at all)
    timings["train_s"] = time.perf_counter() - start - state["predict_s"]
    timings["predict_s"] = state["predict_s"]

    rows = []
    for index in range(n_rows):
        rec = records.get(
            index,
            {"n_tokens": len(prompts[index]["input_ids"]), "log_ppl": float("nan"), "selected": False, "weight": 0.0},
        )
        rows.append({"index": index, "chunk": index // chunk, **rec})
    prediction = None
    if outputs:
        prediction = concat_predictions(outputs, trainer.processing_class.pad_token_id, IGNORE_INDEX)
    return rows, stats, prediction


def _pool_dataset(tlm_args, template, model_args, data_args, training_args, tokenizer_module) -> "Dataset":
    """The ``tlm_pool_dataset`` rows as templated prompts (their responses, if any, are dropped like the test set's)."""
    pool_args = copy.copy(data_args)
    pool_args.dataset = [name.strip() for name in tlm_args.tlm_pool_dataset.split(",")]
    pool_args.eval_dataset, pool_args.val_size = None, 0.0
    try:
        module = get_dataset(template, model_args, pool_args, training_args, stage="tlm", **tokenizer_module)
    except ValueError as err:
        raise TLMConfigError(f"tlm_pool_dataset {tlm_args.tlm_pool_dataset!r}: {err}") from err
    return prompt_dataset(module["train_dataset"])


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(trainer, snapshot: dict[str, torch.Tensor]) -> None:
    """``tlm_reset: chunk``: trainable weights back to their initial values, optimizer moments cleared."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in snapshot:
                param.copy_(snapshot[name])
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    optimizer.state.clear()


def prompt_dataset(dataset: "Dataset") -> "Dataset":
    """The unlabeled test prompts: templated ``input_ids`` as at generation time, and the row ``index``.

    The reference answers (LLaMA-Factory's ``labels`` column for unsupervised data) are dropped here, so they
    cannot reach a training batch.
    """
    if dataset is None or len(dataset) == 0:
        raise TLMConfigError("The dataset has no valid prompt (check `dataset` and `dataset_dir`).")
    keep = {"input_ids", "attention_mask", "loss_mask", "user_mask"}
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    return dataset.add_column("index", list(range(len(dataset))))


def _check_prompts(prompts: "Dataset", template, tokenizer) -> None:
    """Refuse a dataset whose prompts are all empty (only the chat template's own tokens are left)."""
    empty, _ = template.encode_oneturn(
        tokenizer, [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    )
    empty_rows = [i for i, ids in enumerate(prompts["input_ids"]) if list(ids) == empty]
    if len(empty_rows) == len(prompts):
        raise TLMConfigError(
            f"All {len(prompts)} prompts of the dataset are empty: nothing to learn from. Check the dataset's "
            "columns (alpaca: instruction/input; or `columns` in dataset_info.json)."
        )
    if empty_rows:
        logger.warning_rank0(f"{len(empty_rows)} prompts are empty (rows {empty_rows[:10]}...); they are kept.")


def generation_kwargs(generating_args: "GeneratingArguments", tokenizer) -> dict[str, Any]:
    """Arguments of ``model.generate`` as LLaMA-Factory's sft stage builds them (every end-of-turn token stops)."""
    gen_kwargs = generating_args.to_dict(obey_generation_config=True)
    extra = getattr(tokenizer, "additional_special_tokens_ids", None)
    if not isinstance(extra, list):
        names = [str(t) for t in getattr(tokenizer, "_extra_special_tokens", [])]
        extra = tokenizer.convert_tokens_to_ids(names) if names else []
    gen_kwargs["eos_token_id"] = list(dict.fromkeys([tokenizer.eos_token_id] + [i for i in extra if i != -1]))
    gen_kwargs["pad_token_id"] = tokenizer.pad_token_id
    return gen_kwargs


def _check_training_args(training_args, data_args, tlm_args: "TLMArguments") -> None:
    if data_args.streaming:
        raise TLMConfigError("streaming cannot be used with stage: tlm: every prompt is scored before training.")
    if isinstance(data_args.eval_dataset, list) and data_args.eval_on_each_dataset:
        raise TLMConfigError("eval_on_each_dataset cannot be used with stage: tlm.")
    if tlm_args.tlm_reset == "prompt" and not training_args.do_train:
        raise TLMConfigError("tlm_reset: prompt adapts to every prompt: set do_train: true.")
    if tlm_args.tlm_reset == "prompt" and training_args.do_predict and data_args.eval_dataset != data_args.dataset:
        raise TLMConfigError("tlm_reset: prompt answers the test prompts themselves: leave eval_dataset unset.")
    if tlm_args.tlm_mode == "online":
        if training_args.do_predict and data_args.eval_dataset != data_args.dataset:
            raise TLMConfigError(
                "tlm_mode: online answers the stream itself: leave eval_dataset unset (or equal to dataset)."
            )
        if training_args.num_train_epochs != 1 or training_args.max_steps > 0:
            raise TLMConfigError("tlm_mode: online reads the stream once: set num_train_epochs: 1 and no max_steps.")
        if getattr(training_args, "group_by_length", False):
            raise TLMConfigError("group_by_length cannot be used with tlm_mode: online (it reorders the stream).")
        if tlm_args.tlm_reset == "chunk" and training_args.deepspeed:
            raise TLMConfigError("tlm_reset: chunk is not supported with DeepSpeed (optimizer state is partitioned).")


def _summary(rows, stats, tlm_args, training_args, timings, log_p0_used=None, score_prefix_tokens=0) -> dict[str, Any]:
    import llamafactory

    import tlm_plugin

    def mean(values):
        values = [v for v in values if v == v]
        return float(np.mean(values)) if values else None

    selected = [r for r in rows if r["selected"]]
    return {
        "mode": tlm_args.tlm_mode,
        "settings": tlm_args.to_dict(),
        "loss_tokens": tlm_args.tlm_loss_tokens,
        "log_p0_used": log_p0_used,
        "n_prompts": len(rows),
        "n_selected": len(selected),
        "n_skipped": len(rows) - len(selected),
        "mean_log_ppl_before": mean([r["log_ppl"] for r in rows]),
        "mean_log_ppl_after": mean([r["log_ppl_after"] for r in rows]),
        "mean_log_ppl_before_selected": mean([r["log_ppl"] for r in selected]),
        "mean_log_ppl_after_selected": mean([r["log_ppl_after"] for r in selected]),
        "mean_log_ppl_user_before": mean([r.get("log_ppl_user", math.nan) for r in rows]),
        "mean_log_ppl_user_after": mean([r.get("log_ppl_user_after", math.nan) for r in rows]),
        "backward_passes": stats["backward_rows"],
        "optimizer_steps": stats["optimizer_steps"],
        "skipped_steps": stats["skipped_steps"],
        "nonfinite_rows": stats["nonfinite_rows"],
        "score_shared_prefix_tokens": score_prefix_tokens,
        "wall_time_s": {k: round(v, 3) for k, v in timings.items()},
        "world_size": training_args.world_size,
        "versions": {"llamafactory_tlm": tlm_plugin.__version__, "llamafactory": llamafactory.__version__},
    }
