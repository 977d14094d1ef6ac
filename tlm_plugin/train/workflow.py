"""``stage: tlm``: test-time learning on the test prompts themselves (Hu et al., ICML 2025), and its relatives.

Reads top to bottom like LLaMA-Factory's sft workflow: checks, tokenizer, template, data, model, trainer, then the
mode (one entry of :data:`tlm_plugin.registry.MODES`, dispatched once), the records and the summary. Every check that
can fail on the recipe alone runs before the model loads, and a refused run writes nothing to ``output_dir``.
"""

import json
import os
from typing import TYPE_CHECKING

from datasets import Dataset
from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_template_and_fix_tokenizer
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.logging import get_logger
from llamafactory.extras.ploting import plot_loss
from llamafactory.model import load_model, load_tokenizer

from tlm_plugin import registry
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.train import outputs, report
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
    run_id = identity(model_args, data_args, training_args, finetuning_args, generating_args, tlm_args)
    if _already_finished(training_args, tlm_args, run_id):
        return
    if not training_args.do_train:
        logger.warning_rank0(
            "stage tlm with do_train: false: no adaptation; the run measures and answers with the unadapted model."
        )

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
            tlm_args.tlm_pool_dataset,
            template,
            model_args,
            data_args,
            training_args,
            tokenizer_module,
            loss_tokens,
            lazy=tlm_args.uses_pool_store,
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
    resume_from = _resume_point(training_args, tlm_args, run_id)

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

    out = training_args.output_dir
    if run.is_main:
        result = report.summary(
            rows,
            stats,
            tlm_args,
            training_args,
            run.timings,
            getattr(trainer.selector, "log_p0_used", None),
            pool_store=run.pool_store,
        )
        outputs.write_records(out, rows, result)
        if training_args.do_train and finetuning_args.plot_loss:
            plot_loss(out, keys=["loss"])
    barrier()
    if is_local_main():  # per-prompt records, now in the files above (every node's own copy)
        outputs.remove_parts(out)
    barrier()
    if run.is_main:
        outputs.mark_finished(out)
        print("\n".join(report.console_lines(result, out, trained=training_args.do_train)), flush=True)


def _already_finished(training_args, tlm_args: "TLMArguments", run_id: str) -> bool:
    """A rerun of a finished run (same output_dir, same settings, no overwrite_output_dir) says so and where its
    results are, and does nothing else; a finished run with other settings is refused (rank 0 decides)."""
    if tlm_args.finished_in is None:
        return False
    out = tlm_args.finished_in
    decision = {"finished": False, "error": None}
    if rank_and_world()[0] == 0:
        record = outputs.finished_run(out)
        if record is not None and record.get("identity") == run_id:
            decision["finished"] = True
        elif record is not None:
            decision["error"] = (
                f"output_dir {out} holds a finished stage-tlm run made with other settings ({record.get('identity')} "
                f"vs {run_id} now). Choose another output_dir, or set overwrite_output_dir: true to replace it."
            )
    decision = broadcast_object(decision)
    if decision["error"] is not None:
        raise TLMConfigError(decision["error"])
    if decision["finished"] and rank_and_world()[0] == 0:
        with open(os.path.join(out, outputs.SUMMARY_FILE), encoding="utf-8") as f:
            result = json.load(f)
        print(
            f"stage tlm: this run is already finished; its results are in {out}. Set overwrite_output_dir: true to "
            "run it again, or choose another output_dir.",
            flush=True,
        )
        print("\n".join(report.console_lines(result, out, trained=training_args.do_train)), flush=True)
    return decision["finished"]


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
