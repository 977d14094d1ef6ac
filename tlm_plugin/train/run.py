"""The context a mode runs in (:class:`Run`), and the records every mode builds from its passes.

Built once by :func:`tlm_plugin.train.workflow.run_tlm`; a mode (:mod:`tlm_plugin.modes`) reads what it needs from it.
"""

import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tlm_plugin.train import outputs
from tlm_plugin.train.backend import rank_and_world
from tlm_plugin.train.generation import prediction_lines, similarity_metrics
from tlm_plugin.train.passes import mean_nll, nll_pass
from tlm_plugin.train.trainer import TLMTrainer


if TYPE_CHECKING:
    from datasets import Dataset
    from llamafactory.hparams import GeneratingArguments
    from transformers import Seq2SeqTrainingArguments

    from tlm_plugin.hparams import TLMArguments


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
    pool_store: dict[str, Any] | None = None  # a pool store's description (folder, rows, index), for the summary
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

    def score(self, dataset, masks=("loss_mask",), embed=False, desc="scoring") -> dict[str, Any]:
        """A no-grad pass (:func:`tlm_plugin.train.passes.nll_pass`) with this run's batching settings."""
        return nll_pass(
            self.trainer,
            dataset,
            masks=masks,
            embed=embed,
            batch_size=self.tlm_args.tlm_score_batch_size,
            token_budget=self.training_args.per_device_train_batch_size * max(map(len, self.prompts["input_ids"])),
            prefix_cache=self.tlm_args.tlm_score_prefix_cache,
            desc=desc,
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
        return answer_bpb_from(self.score(answers, masks=ANSWER_MASKS, desc="answer likelihoods"), answers)


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
    if not run.is_main:
        return
    tokenizer = run.trainer.processing_class
    labels = [list(x) for x in run.eval_dataset["labels"]]
    prompts = prompts if prompts is not None else run.eval_dataset["input_ids"]
    lines = prediction_lines(tokenizer, prompts, answers, labels, run.generating_args.skip_special_tokens)
    outputs.atomic_write(os.path.join(run.output_dir, outputs.PREDICTIONS_FILE), "".join(lines))
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


def measure_after(run: Run, rows: list[dict[str, Any]], stats: dict[str, Any]) -> None:
    """The prompts' log-perplexity under the adapted model (and, offline, the answers' bits per byte), on ``rows``."""
    start = time.perf_counter()
    after = run.prompt_scores()
    run.timings["score_after_s"] = time.perf_counter() - start
    for i, row in enumerate(rows):
        row["log_ppl_after"] = float(after["log_ppl"][i])
        if "log_ppl_user" in after:
            row["log_ppl_user_after"] = float(after["log_ppl_user"][i])
    if run.tlm_args.tlm_mode == "offline" and run.answers is not None:
        start = time.perf_counter()
        adapted = run.answer_bpb() if run.training_args.do_train else None
        for row in rows:
            if "answer_bpb_base" in row:
                for key in ("answer_bpb", "answer_content_bpb"):
                    row[key] = adapted[row["index"]][key] if adapted is not None else row[f"{key}_base"]
        run.timings["answers_after_s"] = time.perf_counter() - start
    stats["score_shared_prefix_tokens"] = int(after["shared_prefix_tokens"])
