"""``stage: tlm``: test-time learning on the test prompts themselves (Hu et al., ICML 2025), and its relatives.

Reads top to bottom like LLaMA-Factory's sft workflow: checks, tokenizer, template, data, model, trainer, then the
mode (one entry of :data:`tlm_plugin.registry.MODES`, dispatched once), the records and the summary. Every check that
can fail on the recipe alone runs before the model loads, and a refused run writes nothing to ``output_dir``.
"""

import os
from typing import TYPE_CHECKING, Any

import llamafactory
import numpy as np
from datasets import Dataset
from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.logging import get_logger
from llamafactory.extras.ploting import plot_loss
from llamafactory.model import load_model, load_tokenizer

import tlm_plugin
from tlm_plugin import registry
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.train import outputs
from tlm_plugin.train.backend import barrier, broadcast_object, is_local_main, rank_and_world, set_timeouts
from tlm_plugin.train.collator import TLMDataCollator
from tlm_plugin.train.data import Encoder, answer_rows, load_pool, load_prompts, raw_column
from tlm_plugin.train.run import Run
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

    rows, stats = registry.load(registry.MODES[tlm_args.tlm_mode].entry)(run)

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
    if tlm_args.per_prompt:
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


