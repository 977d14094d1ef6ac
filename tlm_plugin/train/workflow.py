"""``stage: tlm``: test-time learning on the test prompts themselves (Hu et al., ICML 2025), and its relatives.

Reads top to bottom like LLaMA-Factory's sft workflow: checks, tokenizer, template, data, model, trainer, then the
mode (offline, online, pool subset or per prompt), the after-pass, the records and the predictions. Every check that
can fail on the recipe alone runs before the model loads, and a refused run writes nothing to ``output_dir``.
"""

import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.logging import get_logger
from llamafactory.extras.ploting import plot_loss
from llamafactory.model import load_model, load_tokenizer

from tlm_plugin.hparams import TLMConfigError
from tlm_plugin.train import outputs
from tlm_plugin.train.backend import barrier, broadcast_object, is_local_main, rank_and_world, set_timeouts
from tlm_plugin.train.collator import TLMDataCollator
from tlm_plugin.train.data import Encoder, answer_rows, load_pool, load_prompts, raw_column
from tlm_plugin.train.passes import mean_nll, nll_pass
from tlm_plugin.train.setup import (
    build_selector,
    check_backend,
    check_generator,
    check_training_args,
    generation_kwargs,
    identity,
)
from tlm_plugin.train.trainer import TLMTrainer


if TYPE_CHECKING:
    from datasets import Dataset
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
    from transformers import Seq2SeqTrainingArguments, TrainerCallback

    from tlm_plugin.hparams import TLMArguments


logger = get_logger(__name__)
LN2 = math.log(2.0)


@dataclass
class Run:
    """Everything a mode needs, built once by :func:`run_tlm`."""

    trainer: TLMTrainer
    tlm_args: "TLMArguments"
    training_args: "Seq2SeqTrainingArguments"
    generating_args: "GeneratingArguments"
    prompts: "Dataset"
    eval_dataset: "Dataset | None"
    pool: "Dataset | None"
    answers: "Dataset | None"
    gen_kwargs: dict[str, Any]
    resume_from: str | None
    aligned: "Dataset | None" = None  # LLaMA-Factory's aligned rows behind the prompts (messages, system, ...)
    encoder: Any = None  # data.Encoder: new conversations encoded as LLaMA-Factory encodes rows
    gate_options: list | None = None  # tlm_gate_options: each row's answer options
    task_adapters: Any = None  # per_prompt.TaskAdapters: adapters of tasks (shared demonstrations) trained so far
    timings: dict[str, float] = field(default_factory=dict)

    def answer_row(self, p: int, messages: list[dict] | None = None) -> dict[str, Any] | None:
        """Row ``p``'s reference answer to measure: after its own prompt (precomputed), or after ``messages``."""
        if self.answers is None or p not in self.answer_position:
            return None
        if messages is None:
            return self.answers[self.answer_position[p]]
        row = self.aligned[p]
        return self.encoder.answer_row(messages, row["_response"][0]["content"], row["_system"], row["_tools"])

    def prompt_ids_for(self, p: int, messages: list[dict]) -> list[int]:
        row = self.aligned[p]
        return self.encoder.prompt_ids(messages, row["_system"] or None, row["_tools"] or None)

    @property
    def output_dir(self) -> str:
        return self.training_args.output_dir

    @property
    def answer_position(self) -> dict[int, int]:
        """Row index -> position in ``answers`` (rows with a reference answer)."""
        if self.answers is None:
            return {}
        if not hasattr(self, "_answer_position"):
            self._answer_position = {int(i): k for k, i in enumerate(self.answers["index"])}
        return self._answer_position

    @property
    def is_main(self) -> bool:
        return rank_and_world()[0] == 0

    def score(self, dataset, masks=("loss_mask",), embed=False) -> dict[str, Any]:
        """A no-grad pass (:func:`tlm_plugin.train.passes.nll_pass`) with this run's batching settings."""
        return nll_pass(
            self.trainer,
            dataset,
            masks=masks,
            embed=embed,
            batch_size=self.tlm_args.tlm_score_batch_size,
            token_budget=self.training_args.per_device_train_batch_size * max(map(len, self.prompts["input_ids"])),
            prefix_cache=self.tlm_args.tlm_score_prefix_cache,
        )

    def prompt_scores(self, embed: bool = False) -> dict[str, Any]:
        masks = ("loss_mask", "user_mask") if "user_mask" in self.prompts.column_names else ("loss_mask",)
        result = self.score(self.prompts, masks=masks, embed=embed)
        result["log_ppl"] = mean_nll(result, "loss_mask")
        if "user_mask" in masks:
            result["log_ppl_user"] = mean_nll(result, "user_mask")
        return result

    def answer_bpb(self, answers=None) -> dict[int, dict[str, float | None]]:
        """Bits per byte of each reference answer under the current model: {row index: {"answer_bpb": x,
        "answer_content_bpb": y}} (the label tokens, and the answer's content tokens only)."""
        answers = self.answers if answers is None else answers
        if answers is None or len(answers) == 0:
            return {}
        return answer_bpb_from(self.score(answers, masks=ANSWER_MASKS), answers)


ANSWER_MASKS = ("answer_mask", "answer_content_mask")


def answer_bpb_from(result: dict[str, Any], answers) -> dict[int, dict[str, float | None]]:
    """Per-row bits per byte from a pass over answer rows: summed NLL (nats) / ln 2 / UTF-8 bytes of the answer."""
    nbytes = dict(zip(answers["index"], answers["answer_bytes"]))
    out = {}
    for i, nll, content_nll, content_n in zip(
        result["index"],
        result["answer_mask_nll"],
        result["answer_content_mask_nll"],
        result["answer_content_mask_tokens"],
    ):
        i = int(i)
        out[i] = {
            "answer_bpb": float(nll / LN2 / nbytes[i]),
            "answer_content_bpb": float(content_nll / LN2 / nbytes[i]) if content_n > 0 else None,
        }
    return out


def run_tlm(
    model_args: "ModelArguments",
    data_args: "DataArguments",
    training_args: "Seq2SeqTrainingArguments",
    finetuning_args: "FinetuningArguments",
    generating_args: "GeneratingArguments",
    tlm_args: "TLMArguments",
    callbacks: list["TrainerCallback"] | None = None,
) -> None:
    check_training_args(training_args, data_args, finetuning_args, tlm_args)
    check_backend(training_args, tlm_args)
    set_timeouts(training_args.ddp_timeout)

    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    loss_tokens = tlm_args.tlm_loss_tokens
    prompts, eval_dataset, aligned = load_prompts(
        template, model_args, data_args, training_args, tokenizer_module, loss_tokens
    )
    pool = None
    if tlm_args.pool_based and tlm_args.tlm_pool_dataset is not None:
        pool = load_pool(
            tlm_args.tlm_pool_dataset, template, model_args, data_args, training_args, tokenizer_module, loss_tokens
        )
    encoder = Encoder(template, tokenizer, data_args)
    answers = None
    if tlm_args.tlm_eval_answers:
        from datasets import Dataset

        rows = answer_rows(aligned, encoder)
        answers = Dataset.from_list(rows) if rows else None
    gate_options = (
        raw_column(data_args, tlm_args.tlm_gate_options, len(prompts)) if tlm_args.tlm_gate_options else None
    )
    check_generator(tlm_args, training_args)
    resume_from = _resume_point(
        training_args,
        tlm_args,
        identity(model_args, data_args, training_args, finetuning_args, generating_args, tlm_args),
    )

    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)
    tokenizer.padding_side = "left"  # generation batches; scoring/training batches are right-padded
    data_collator = TLMDataCollator(
        pad_token_id=tokenizer.pad_token_id,
        generation_collator=SFTDataCollatorWith4DAttentionMask(
            template=template,
            label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
            compute_dtype=model_args.compute_dtype,
            **tokenizer_module,
        ),
    )
    gen_kwargs = generation_kwargs(generating_args, tokenizer)
    trainer = TLMTrainer(
        tlm_args=tlm_args,
        selector=build_selector(tlm_args, seed=training_args.seed),
        model=model,
        args=training_args,
        finetuning_args=finetuning_args,
        data_collator=data_collator,
        callbacks=callbacks,
        gen_kwargs=gen_kwargs,
        train_dataset=prompts,
        **tokenizer_module,
    )
    run = Run(
        trainer,
        tlm_args,
        training_args,
        generating_args,
        prompts,
        eval_dataset,
        pool,
        answers,
        gen_kwargs,
        resume_from,
        aligned=aligned,
        encoder=encoder,
        gate_options=gate_options,
    )

    if tlm_args.tlm_reset == "prompt":
        from tlm_plugin.train.per_prompt import run_per_prompt as mode
    elif tlm_args.pool_based:
        from tlm_plugin.train.offline import run_pool_subset as mode
    elif tlm_args.tlm_mode == "offline":
        from tlm_plugin.train.offline import run_offline as mode
    else:
        from tlm_plugin.train.online import run_online as mode
    rows, stats = mode(run)

    if tlm_args.tlm_reset != "prompt":  # per-prompt runs measure each prompt before restoring its adapter
        start = time.perf_counter()
        after = run.prompt_scores()
        run.timings["score_after_s"] = time.perf_counter() - start
        for i, row in enumerate(rows):
            row["log_ppl_after"] = float(after["log_ppl"][i])
            if "log_ppl_user" in after:
                row["log_ppl_user_after"] = float(after["log_ppl_user"][i])
        if tlm_args.tlm_mode == "offline" and answers is not None:
            start = time.perf_counter()
            adapted = run.answer_bpb() if training_args.do_train else None
            for row in rows:
                if "answer_bpb_base" in row:
                    for key in ("answer_bpb", "answer_content_bpb"):
                        row[key] = adapted[row["index"]][key] if adapted is not None else row[f"{key}_base"]
            run.timings["answers_after_s"] = time.perf_counter() - start
        stats["score_shared_prefix_tokens"] = int(after["shared_prefix_tokens"])

    if run.is_main:
        outputs.write_records(
            training_args.output_dir,
            rows,
            summary(rows, stats, tlm_args, training_args, run.timings, getattr(trainer.selector, "log_p0_used", None)),
        )
        if training_args.do_train and finetuning_args.plot_loss:
            plot_loss(training_args.output_dir, keys=["loss"])
    barrier()
    if is_local_main():  # per-prompt records, now in the files above (every node's own copy)
        outputs.remove_parts(training_args.output_dir)


def _resume_point(training_args, tlm_args: "TLMArguments", run_id: str) -> str | None:
    """Where an interrupted run resumes (a checkpoint path, or the output_dir for per-prompt runs), or None.

    Rank 0 decides from what its ``output_dir`` holds and every rank follows that one decision (a rank that looked
    for itself could see files rank 0 has just written, or, on another node without a shared file system, none at
    all, and then enter collectives the others skip). A run that does not resume starts over: what an earlier
    stage-tlm run left in ``output_dir`` is removed, on every node's own copy.
    """
    out = training_args.output_dir
    decision = {"resume": None, "error": None}
    if rank_and_world()[0] == 0:
        try:
            decision["resume"] = _find_resume_point(training_args, tlm_args, run_id)
        except TLMConfigError as err:
            decision["error"] = str(err)
    decision = broadcast_object(decision)
    if decision["error"] is not None:
        raise TLMConfigError(decision["error"])
    resume = decision["resume"]
    if resume is not None:
        logger.warning_rank0(f"Resuming the interrupted stage-tlm run in {out} from {resume}.")
    else:
        earlier_run = is_local_main() and os.path.isfile(os.path.join(out, outputs.RUN_FILE))
        barrier()  # every node has looked before any removes (one shared output_dir, or one per node)
        if earlier_run:
            outputs.start_fresh(out, force=True)
        barrier()
    if rank_and_world()[0] == 0:
        outputs.write_identity(out, run_id, tlm_args.tlm_mode)
    barrier()
    training_args.resume_from_checkpoint = resume if resume != out else None
    return resume


def _find_resume_point(training_args, tlm_args: "TLMArguments", run_id: str) -> str | None:
    out = training_args.output_dir
    resume: str | None = None
    if tlm_args.tlm_reset == "prompt":
        if not training_args.overwrite_output_dir and os.path.isfile(os.path.join(out, outputs.RUN_FILE)):
            resume = out
    elif training_args.resume_from_checkpoint is not None:
        state_key = "TLMStreamCallback" if tlm_args.tlm_mode == "online" else None
        resume = outputs.complete_checkpoint(out, state_key) or None
        if resume is None:
            logger.warning(f"No complete stage-tlm checkpoint in {out}: the run starts over.")
    if resume is not None:
        outputs.check_identity(out, run_id)
    return resume


def summary(rows, stats, tlm_args, training_args, timings, log_p0_used=None) -> dict[str, Any]:
    import llamafactory

    import tlm_plugin

    def mean(values):
        values = [v for v in values if v is not None and v == v]
        return float(np.mean(values)) if values else None

    selected = [r for r in rows if r.get("selected")]
    answered = [r for r in rows if r.get("answer_bpb") is not None and not r.get("answer_truncated")]
    result = {
        "mode": tlm_args.tlm_mode,
        "settings": tlm_args.to_dict(),
        "loss_tokens": tlm_args.tlm_loss_tokens,
        "log_p0_used": log_p0_used,
        "n_prompts": len(rows),
        "n_selected": len(selected),
        "n_skipped": len(rows) - len(selected),
        "mean_log_ppl_before": mean([r.get("log_ppl") for r in rows]),
        "mean_log_ppl_after": mean([r.get("log_ppl_after") for r in rows]),
        "mean_log_ppl_before_selected": mean([r.get("log_ppl") for r in selected]),
        "mean_log_ppl_after_selected": mean([r.get("log_ppl_after") for r in selected]),
        "mean_log_ppl_user_before": mean([r.get("log_ppl_user") for r in rows]),
        "mean_log_ppl_user_after": mean([r.get("log_ppl_user_after") for r in rows]),
        "backward_passes": stats["backward_rows"],
        "optimizer_steps": stats["optimizer_steps"],
        "skipped_steps": stats["skipped_steps"],
        "overflow_steps": stats.get("overflow_steps", 0),
        "nonfinite_rows": stats["nonfinite_rows"],
        "score_shared_prefix_tokens": stats.get("score_shared_prefix_tokens", 0),
        **({"per_prompt": stats["per_prompt"]} if "per_prompt" in stats else {}),
        "wall_time_s": {k: round(v, 3) for k, v in timings.items()},
        "world_size": training_args.world_size,
        "versions": {"llamafactory_tlm": tlm_plugin.__version__, "llamafactory": llamafactory.__version__},
    }
    if tlm_args.tlm_eval_answers:
        result.update(
            {
                "n_answers": len(answered),
                "n_answers_missing": sum(r.get("answer_bpb_base") is None for r in rows),
                "n_answers_truncated": sum(bool(r.get("answer_truncated")) for r in rows),
                "mean_answer_bpb_base": mean([r.get("answer_bpb_base") for r in answered]),
                "mean_answer_bpb": mean([r.get("answer_bpb") for r in answered]),
                "mean_answer_content_bpb_base": mean([r.get("answer_content_bpb_base") for r in answered]),
                "mean_answer_content_bpb": mean([r.get("answer_content_bpb") for r in answered]),
            }
        )
    return result


def base_rows(run: Run, scores: dict[str, Any], answers: bool = True) -> list[dict[str, Any]]:
    """One record per prompt from a scoring pass of the unadapted model (and, with ``answers``, the base answer
    likelihoods)."""
    rows = [
        {"index": int(i), "n_tokens": int(n), "log_ppl": float(lp)}
        for i, n, lp in zip(scores["index"], scores["n_tokens"], scores["log_ppl"])
    ]
    if "log_ppl_user" in scores:
        for row, lp in zip(rows, scores["log_ppl_user"].tolist()):
            row["log_ppl_user"] = lp
    if answers:
        add_answer_fields(run, rows, run.answer_bpb() if run.answers is not None else {}, "_base")
    return rows


def add_answer_fields(run: Run, rows: list[dict[str, Any]], bpb: dict[int, dict], suffix: str = "") -> None:
    """Put the answers' bits per byte (``answer_bpb{suffix}``, ``answer_content_bpb{suffix}``) and their token /
    byte counts on the rows that have a reference answer."""
    for row in rows:
        position = run.answer_position.get(row["index"])
        if position is None or row["index"] not in bpb:
            continue
        answer = run.answers[position]
        row.update(
            answer_tokens=int(sum(answer["answer_mask"])),
            answer_content_tokens=int(sum(answer["answer_content_mask"])),
            answer_bytes=int(answer["answer_bytes"]),
            answer_truncated=bool(answer["answer_truncated"]),
        )
        for key, value in bpb[row["index"]].items():
            row[f"{key}{suffix}"] = value


def save_predictions(run: Run, answers: list[list[int]], start: float, prompts: list | None = None) -> None:
    """Write LLaMA-Factory's prediction files for ``answers`` to the eval rows (main rank); ``prompts`` are the
    prompt ids actually answered when they differ from the eval rows' (in-context demonstrations)."""
    from tlm_plugin.train.generation import PREDICTIONS_FILE, prediction_lines, similarity_metrics

    if not run.is_main:
        return
    tokenizer = run.trainer.processing_class
    labels = [list(x) for x in run.eval_dataset["labels"]]
    prompts = prompts if prompts is not None else run.eval_dataset["input_ids"]
    lines = prediction_lines(tokenizer, prompts, answers, labels, run.generating_args.skip_special_tokens)
    outputs.atomic_write(os.path.join(run.output_dir, PREDICTIONS_FILE), "".join(lines))
    runtime = time.perf_counter() - start
    metrics = {f"predict_{k}": v for k, v in similarity_metrics(tokenizer, answers, labels).items()}
    metrics.update(
        predict_runtime=round(runtime, 4),
        predict_samples_per_second=round(len(answers) / max(runtime, 1e-9), 3),
        predict_steps_per_second=round(
            len(answers) / max(runtime, 1e-9) / run.training_args.per_device_eval_batch_size, 3
        ),
    )
    run.trainer.log_metrics("predict", metrics)
    run.trainer.save_metrics("predict", metrics)
