"""Online adaptation (``tlm_mode: online``, Algorithm 1 of the paper): answer each chunk of the stream, then learn from it.

The stream is one HF training run over the prompts in order, under the recipe's backend. Each chunk is padded with
rows of weight 0 (``index`` -1) to a whole number of updates (batch x accumulation x ranks), so an update never mixes
two chunks: chunk c is answered by exactly the adapter that learned chunks 0..c-1, before any of its own rows.

Runs survive interruption. As soon as a chunk is answered its predictions are appended to
``generated_predictions.jsonl``; as soon as it is learned its records are appended to ``tlm_scores.jsonl`` and a
checkpoint is saved (adapter, optimizer, scheduler, RNG, and this module's state in ``trainer_state.json``: chunks
done, line counts, counters, selector state). Rerunning the same command resumes after the last learned chunk:
the files are cut back to what that checkpoint recorded, and the chunk in flight is answered again by the same
adapter. ``save_strategy: no`` turns the chunk checkpoints off.
"""

import json
import os
import time
from typing import Any

import torch
from datasets import Dataset
from llamafactory.extras.logging import get_logger
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from tlm_plugin.objectives.step import estimate_fisher
from tlm_plugin.train import outputs
from tlm_plugin.train.backend import all_gather_objects, barrier, rank_and_world
from tlm_plugin.train.generation import (
    append_lines,
    generate_answers,
    prediction_lines,
    similarity_metrics,
)
from tlm_plugin.train.run import add_answer_fields, measure_after
from tlm_plugin.train.snapshot import TrainingSnapshot


logger = get_logger(__name__)


def build_stream(prompts: Dataset, chunk_size: int, per_update: int) -> tuple[Dataset, list[int]]:
    """The prompts in order with a ``chunk`` column, each chunk padded to a multiple of ``per_update`` rows by
    repeating its last row with ``index`` -1; and the global step at which each chunk's last update ends."""
    n = len(prompts)
    order, index, chunk_of, end_steps, steps = [], [], [], [], 0
    for c, start in enumerate(range(0, n, chunk_size)):
        rows = list(range(start, min(start + chunk_size, n)))
        pad = -len(rows) % per_update
        order += rows + [rows[-1]] * pad
        index += rows + [-1] * pad
        chunk_of += [c] * (len(rows) + pad)
        steps += (len(rows) + pad) // per_update
        end_steps.append(steps)
    stream = prompts.select(order).remove_columns("index").add_column("index", index).add_column("chunk", chunk_of)
    return stream, end_steps


class TLMStreamCallback(TrainerCallback, ExportableState):
    """Chunk bookkeeping of the stream: predict before learning, records and a checkpoint after."""

    def __init__(self, stream: "OnlineStream") -> None:
        self.stream = stream

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": self.stream.state()}

    def on_train_begin(self, args, state, control, **kwargs):
        self.stream.on_train_begin()

    def on_step_end(self, args, state, control, **kwargs):
        finished = self.stream.chunk_ending_at.get(state.global_step)
        if finished is not None:
            self.stream.finish_chunk(finished)
        control.should_save = finished is not None and self.stream.checkpoints


class OnlineStream:
    def __init__(self, run) -> None:
        self.run = run
        self.trainer = run.trainer
        args = run.training_args
        self.chunk_size = run.tlm_args.tlm_chunk_size
        self.n_rows = len(run.prompts)
        self.n_chunks = (self.n_rows + self.chunk_size - 1) // self.chunk_size
        per_update = args.per_device_train_batch_size * args.gradient_accumulation_steps * rank_and_world()[1]
        self.stream, end_steps = build_stream(run.prompts, self.chunk_size, per_update)
        self.chunk_ending_at = {step: c for c, step in enumerate(end_steps)}
        self.checkpoints = str(args.save_strategy) not in ("no", "SaveStrategy.NO", "IntervalStrategy.NO")
        self.predicted = -1  # last chunk answered
        self.finished = -1  # last chunk learned and recorded
        self.prediction_lines = 0
        self.score_lines = 0
        self.chunk_metrics: list[dict[str, float]] = []
        self.answer_bpb: dict[int, dict] = {}  # answers' bpb under the adapter that answered the row's chunk
        self.answer_bpb_base: dict[int, dict] = {}  # ... under the unadapted model
        self.predict_s = 0.0
        self.snapshot: TrainingSnapshot | None = None

    # ------------------------------------------------------------------ state (checkpoints)
    def state(self) -> dict[str, Any]:
        return {
            "chunks_done": self.finished + 1,
            "prediction_lines": self.prediction_lines,
            "score_lines": self.score_lines,
            "chunk_metrics": self.chunk_metrics,
            "stats": self.trainer.stats,
            "nonfinite_rows": self.trainer.nonfinite_rows,
            "selector": self.trainer.selector.state_dict(),
            "predict_s": self.predict_s,
        }

    def resume(self, checkpoint: str) -> None:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            saved = json.load(f)["stateful_callbacks"][TLMStreamCallback.__name__]["attributes"]
        self.finished = self.predicted = saved["chunks_done"] - 1
        self.prediction_lines, self.score_lines = saved["prediction_lines"], saved["score_lines"]
        self.chunk_metrics = saved["chunk_metrics"]
        self.trainer.stats.update(saved["stats"])
        self.trainer.nonfinite_rows = list(saved["nonfinite_rows"])
        self.trainer.selector.load_state_dict(saved["selector"])
        self.predict_s = saved["predict_s"]
        if self.run.is_main:
            outputs.truncate_lines(os.path.join(self.run.output_dir, outputs.PREDICTIONS_FILE), self.prediction_lines)
            outputs.truncate_lines(os.path.join(self.run.output_dir, outputs.SCORES_FILE), self.score_lines)
        barrier()
        logger.warning_rank0(f"Resuming the stream after chunk {self.finished} of {self.n_chunks} (0-based).")

    # ------------------------------------------------------------------ chunk boundaries
    def on_train_begin(self) -> None:
        if self.run.tlm_args.tlm_reset != "chunk":
            return
        trainer, path = self.trainer, os.path.join(self.run.output_dir, outputs.SNAPSHOT_FILE)
        if self.run.resume_from is not None and os.path.isfile(path):
            self.snapshot = TrainingSnapshot(**torch.load(path, weights_only=False))
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.snapshot = TrainingSnapshot.take(
            model, trainer.optimizer, trainer.lr_scheduler, trainer.accelerator.scaler
        )
        if self.run.is_main:
            torch.save(self.snapshot.__dict__, path)

    def on_window_start(self, inputs: dict[str, torch.Tensor]) -> None:
        chunk = int(inputs["chunk"][0])
        first_update = chunk > self.predicted
        self.predict_through(chunk)
        if first_update and chunk > 0 and self.snapshot is not None:  # tlm_reset: chunk
            trainer = self.trainer
            self.snapshot.restore(
                trainer.accelerator.unwrap_model(trainer.model),
                trainer.optimizer,
                trainer.lr_scheduler,
                trainer.accelerator.scaler,
            )

    def rows_of(self, chunk: int) -> list[int]:
        return list(range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.n_rows)))

    def predict_through(self, chunk: int) -> None:
        """Answer every chunk up to ``chunk`` that has not been answered, with the current model."""
        run = self.run
        while self.predicted < min(chunk, self.n_chunks - 1):
            c = self.predicted + 1
            start = time.perf_counter()
            if run.answers is not None:
                mine = [i for i, idx in enumerate(run.answers["index"]) if idx in set(self.rows_of(c))]
                if mine:
                    self.answer_bpb.update(run.answer_bpb(run.answers.select(mine)))
            if run.training_args.do_predict:
                part = run.eval_dataset.select(self.rows_of(c))
                answers = generate_answers(
                    self.trainer, part, run.gen_kwargs, run.training_args.per_device_eval_batch_size
                )
                labels = [list(x) for x in part["labels"]]
                if run.is_main:
                    tokenizer = self.trainer.processing_class
                    lines = prediction_lines(
                        tokenizer, part["input_ids"], answers, labels, run.generating_args.skip_special_tokens
                    )
                    append_lines(os.path.join(run.output_dir, outputs.PREDICTIONS_FILE), lines)
                    metrics = similarity_metrics(tokenizer, answers, labels)
                    self.chunk_metrics.append({"n": len(answers), **metrics})
                self.prediction_lines += len(part)
            self.predicted = c
            self.predict_s += time.perf_counter() - start

    def finish_chunk(self, chunk: int) -> None:
        """Records of a learned chunk, appended to tlm_scores.jsonl (the checkpoint follows)."""
        records = self.trainer.gathered_records()
        self.trainer.records = {}
        lines = []
        for index in self.rows_of(chunk):
            rec = records.get(
                index,
                {
                    "n_tokens": len(self.run.prompts[index]["input_ids"]),
                    "log_ppl": None,
                    "selected": False,
                    "weight": 0.0,
                },
            )
            row = {"index": index, "chunk": chunk, **rec}
            add_answer_fields(self.run, [row], self.answer_bpb_base, "_base")
            add_answer_fields(self.run, [row], self.answer_bpb)
            lines.append(outputs.jsonl_line(row))
        if self.run.is_main:
            append_lines(os.path.join(self.run.output_dir, outputs.SCORES_FILE), lines)
        self.score_lines += len(lines)
        self.finished = chunk


def run(run) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The mode's entry: the stream, then the after-pass."""
    rows, stats = run_online(run)
    measure_after(run, rows, stats)
    return rows, stats


def run_online(run) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    trainer, args = run.trainer, run.training_args
    stream = OnlineStream(run)
    if run.answers is not None:
        stream.answer_bpb_base = run.answer_bpb()
    if run.resume_from is not None:
        stream.resume(run.resume_from)
    if args.save_total_limit is None and stream.checkpoints:
        args.save_total_limit = 1  # only the last chunk's checkpoint is needed to resume

    start = time.perf_counter()
    if args.do_train and run.tlm_args.tlm_eata_fisher_coeff > 0:  # EATA's Fisher: the first prompts, before updates
        n = min(run.tlm_args.tlm_eata_fisher_samples, len(run.prompts))
        trainer.use_fisher(*estimate_fisher(trainer, [run.prompts[i] for i in range(n)]))
    if args.do_train:
        trainer.streaming = True
        trainer.on_window_start = stream.on_window_start
        callback = TLMStreamCallback(stream)
        trainer.add_callback(callback)
        trainer.fit(stream.stream, resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.on_window_start = None
        trainer.save_adapter()
    for c in range(stream.finished + 1, stream.n_chunks):  # chunks no update reached (do_train: false)
        stream.predict_through(c)
        stream.finish_chunk(c)
    run.timings["train_s"] = time.perf_counter() - start - stream.predict_s
    run.timings["predict_s"] = stream.predict_s
    _save_metrics(run, stream)

    rows = outputs.read_jsonl(os.path.join(run.output_dir, outputs.SCORES_FILE)) if run.is_main else []
    rows = all_gather_objects(rows)[0]
    return rows, trainer.gathered_stats()


def _save_metrics(run, stream: OnlineStream) -> None:
    """predict_results.json: LLaMA-Factory's metrics over every chunk (means weighted by chunk size)."""
    if not (run.is_main and run.training_args.do_predict and stream.chunk_metrics):
        return
    total = sum(m["n"] for m in stream.chunk_metrics)
    keys = [k for k in stream.chunk_metrics[0] if k != "n"]
    metrics = {f"predict_{k}": sum(m[k] * m["n"] for m in stream.chunk_metrics) / total for k in keys}
    metrics.update(
        predict_runtime=round(stream.predict_s, 4),
        predict_samples_per_second=round(total / max(stream.predict_s, 1e-9), 3),
    )
    run.trainer.log_metrics("predict", metrics)
    run.trainer.save_metrics("predict", metrics)
