"""Per-prompt test-time learning (``tlm_mode: per_prompt``): one loop for every data source.

For each test prompt: gate (is the model unsure?) -> training rows from the data source (a ``pool`` method's picks:
SIFT / nearest / random; a ``source`` method: generated examples, the prompt's demonstrations; see
:mod:`tlm_plugin.registry`) -> training steps (:class:`~tlm_plugin.train.learner.PromptLearner`) -> answer ->
restore of adapter, optimizer state and learning rates, bit for bit.

Prompts are sharded across ranks (rank, rank + world, ...); each rank adapts its own copy of the adapter, so no
gradient is synchronised. Under ZeRO-3 every rank first gathers the whole model (it must fit one device).

Interruptible: each answered prompt is appended at once to ``tlm_prompts.rank<r>.jsonl``; rerunning the same command
skips the prompts found there (whatever the number of ranks) and the final files are assembled in dataset order
when every prompt is done (records travel between ranks by collectives, so nodes need no shared file system).
"""

import datetime
import glob
import math
import os
import time
from typing import Any

import numpy as np
import torch
from llamafactory.extras.logging import get_logger
from tqdm import tqdm

from tlm_plugin import registry
from tlm_plugin.modes.offline import pool_scores_and_embeddings
from tlm_plugin.seeding import prompt_seed
from tlm_plugin.selectors.base import PromptContext, PromptDataSource
from tlm_plugin.train import outputs
from tlm_plugin.train.backend import all_gather_objects, full_parameters, rank_and_world, wait_for_all
from tlm_plugin.train.gate import RunningFraction, dedupe, flag_fraction, margin, option_letters, uncertain
from tlm_plugin.train.generation import append_lines, generate_ids
from tlm_plugin.train.learner import PromptLearner, TaskAdapters, candidate_scores, mean_loss
from tlm_plugin.train.passes import row_nll
from tlm_plugin.train.run import ANSWER_MASKS, add_answer_fields, base_rows, save_predictions
from tlm_plugin.train.setup import build_pool_selector


logger = get_logger(__name__)

PART_PATTERN = outputs.PART_PATTERN
TRAINER_LOG = "trainer_log.jsonl"  # LLaMA-Factory's name: LlamaBoard reads progress and losses from it
AS_GIVEN = "identity"  # the augmentation name of the prompt's own answer
NOT_TRAINED = {"step_losses": [], "step_lrs": [], "steps": 0, "skipped_steps": 0, "overflow_steps": 0}


class PoolSource(PromptDataSource):
    """A ``pool`` method's rows for each prompt, one training step per pick (the SIFT paper's TTFT)."""

    record_file = outputs.SIFT_SELECTION_FILE

    def __init__(self, run) -> None:
        self.run = run

    def prepare(self, ctx: PromptContext) -> None:
        run = self.run
        start = time.perf_counter()
        self.prompt_scores, _, self.prompt_emb, self.pool_emb = pool_scores_and_embeddings(run)
        run.timings["score_before_s"] = time.perf_counter() - start
        self.pool = run.pool if run.pool is not None else run.prompts
        self.ctx = ctx

    def rows(self, index: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        selector = build_pool_selector(self.run.tlm_args, seed=self.ctx.prompt_seed(index))
        pool = torch.from_numpy(self.pool_emb) if isinstance(self.pool_emb, np.ndarray) else self.pool_emb
        picks, variances = selector.select(torch.from_numpy(self.prompt_emb[index : index + 1]), pool)
        rows = [
            {"input_ids": self.pool[r]["input_ids"], "loss_mask": self.pool[r]["loss_mask"]} for r in picks.tolist()
        ]
        return rows, {"picks": picks.tolist(), "variances": [float(v) for v in variances]}


def make_source(run) -> PromptDataSource:
    """The data source of the run's method: a pool method's picks, or the method's own source class."""
    found = registry.impl(run.tlm_args.tlm_selector, "per_prompt")
    if found.kind == "pool":
        return PoolSource(run)
    return registry.load(found.cls)()


def prompt_context(run) -> PromptContext:
    trainer, args = run.trainer, run.training_args
    dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)
    return PromptContext(
        settings=run.tlm_args.method_settings(),
        prompts=run.prompts,
        aligned=run.aligned,
        encoder=run.encoder,
        tokenizer=trainer.processing_class,
        model=trainer.accelerator.unwrap_model(trainer.model),
        device=args.device,
        dtype=dtype,
        seed=args.seed,
    )


def _done(output_dir: str) -> dict[int, dict[str, Any]]:
    """Records of the prompts already answered, from the part files every rank sees (complete lines only),
    merged over ranks (nodes without a shared file system each contribute their own files)."""
    local = {}
    for path in sorted(glob.glob(os.path.join(output_dir, PART_PATTERN.format(rank="*")))):
        for record in outputs.read_jsonl(path):
            local[int(record["index"])] = record
    done: dict[int, dict[str, Any]] = {}
    for part in all_gather_objects(local):
        done.update(part)
    return done


class Gate:
    """``tlm_gate`` wired to the model: which prompts learn (none, perplexity, margin; tau or a calibrated fraction).

    Margins need candidate answers: the row's options (``tlm_gate_options`` column, or the lettered options of a
    multiple-choice prompt), else ``tlm_gate_candidates`` answers sampled in one batched call, deduplicated; each
    candidate is scored by its mean token log-probability given the prompt, in one batched forward.
    """

    def __init__(self, run, learner: PromptLearner, base_rows: list[dict[str, Any]]) -> None:
        self.run, self.learner, self.args = run, learner, run.tlm_args
        self.kind = self.args.tlm_gate
        self.log_ppl = {r["index"]: r["log_ppl"] for r in base_rows}
        self.options = run.gate_options
        self.flags: dict[int, bool] | None = None

    def calibrate(self, indices: list[int]) -> None:
        """With ``tlm_gate_fraction``: the gate values of every prompt (each rank its share), then the flags."""
        if self.kind == "none" or self.args.tlm_gate_fraction is None:
            return
        rank, world = rank_and_world()
        mine = {p: self.value(p)[0] for p in indices[rank::world]}
        values: dict[int, float] = {}
        for part in all_gather_objects(mine):
            values.update(part)
        order = sorted(values)
        higher = self.kind == "perplexity"  # higher log-perplexity, lower margin: more uncertain
        series = [values[p] if values[p] == values[p] else -math.inf for p in order]
        if self.args.tlm_gate_stream:  # the prompts seen so far, in dataset order
            running = RunningFraction(self.args.tlm_gate_fraction, higher)
            flags = [running(v) for v in series]
        else:
            flags = flag_fraction(series, self.args.tlm_gate_fraction, higher)
        self.flags = dict(zip(order, flags))

    def value(self, p: int) -> tuple[float, dict[str, Any]]:
        """The prompt's gate value (log-perplexity or margin) and what the record keeps about it."""
        if self.kind == "perplexity":
            return self.log_ppl[p], {}
        candidates, scores = self.candidates(p)
        u, probs = margin(scores)
        return u, {"candidates": [{"text": c, "score": s, "p": q} for c, s, q in zip(candidates, scores, probs)]}

    def __call__(self, p: int) -> dict[str, Any]:
        if self.kind == "none":
            return {"flagged": True}
        value, info = self.value(p)
        if self.flags is not None:
            flagged = self.flags[p]
        elif self.kind == "perplexity":
            flagged = value > self.args.tlm_log_p0
        else:
            flagged = uncertain(value, self.args.tlm_gate_tau)
        return {"gate": self.kind, "gate_score": value, "flagged": bool(flagged), **info}

    def candidates(self, p: int) -> tuple[list[str], list[float]]:
        run, learner = self.run, self.learner
        prompt = list(run.prompts[p]["input_ids"])
        tokenizer = run.trainer.processing_class
        texts = self.options[p] if self.options is not None else None
        if not texts:
            texts = option_letters(run.aligned[p]["_prompt"][-1]["content"])
        if texts:
            answers = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        else:
            torch.manual_seed(prompt_seed(run.training_args.seed, prompt))
            kwargs = {
                **run.gen_kwargs,
                "do_sample": True,
                "temperature": self.args.tlm_gate_temperature,
                "top_p": 1.0,
                "num_return_sequences": self.args.tlm_gate_candidates,
                "max_new_tokens": self.args.tlm_gate_max_tokens,
            }
            learner.model.eval()
            with torch.no_grad():
                sampled = generate_ids(run.trainer, learner.model, [prompt], kwargs, False)
            eos = set(kwargs.get("eos_token_id") or [])
            cut = [[t for t in ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]] for ids in sampled]
            texts = dedupe(tokenizer.batch_decode(cut, skip_special_tokens=True))
            answers = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        keep = [(t, a) for t, a in zip(texts, answers) if a]
        if not keep:
            return [], []
        return [t for t, _ in keep], candidate_scores(learner, prompt, [a for _, a in keep])


def run(run) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The mode's entry."""
    return run_per_prompt(run)


def run_per_prompt(run) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rank, world = rank_and_world()
    source = make_source(run)
    with full_parameters(run.trainer):
        source.prepare(prompt_context(run))
        prompt_scores = getattr(source, "prompt_scores", None)
        if prompt_scores is None:
            prompt_scores = run.prompt_scores()
        rows = base_rows(run, prompt_scores, answers=False)  # answers are measured prompt by prompt
        done = _done(run.output_dir) if run.resume_from is not None else {}
        if done:
            logger.warning_rank0(f"Resuming: {len(done)} of {len(rows)} prompts were answered before.")
        learner = PromptLearner(run)
        run.task_adapters = TaskAdapters(run.output_dir)
        gate = Gate(run, learner, rows)
        gate.calibrate(list(range(len(run.prompts))))
        todo = [p for p in range(rank, len(run.prompts), world) if p not in done]
        part = os.path.join(run.output_dir, PART_PATTERN.format(rank=rank))
        start = time.perf_counter()
        bar = tqdm(todo, desc="per-prompt", disable=rank != 0, dynamic_ncols=True)
        log = os.path.join(run.output_dir, TRAINER_LOG) if rank == 0 else None
        for done_here, p in enumerate(bar, start=1):
            record = answer_one(run, learner, source, gate, p, phase=lambda name: bar.set_postfix_str(name))
            append_lines(part, [outputs.jsonl_line(record)])
            if log is not None:
                append_lines(log, [outputs.jsonl_line(progress_line(record, done_here, len(todo), start))])
        run.timings["per_prompt_s"] = time.perf_counter() - start
    wait_for_all()  # shares take different times: a wait of days, over host memory, not a ddp_timeout barrier
    return _assemble(run, rows, source)


def progress_line(record: dict[str, Any], done: int, total: int, start: float) -> dict[str, Any]:
    """One line of LLaMA-Factory's ``trainer_log.jsonl`` (what LlamaBoard's progress bar and loss curve read) after
    a prompt of this rank: prompts answered as steps, the prompt's mean training loss (none when it did not train)."""
    losses = [x for x in record.get("step_losses", []) if x == x]
    elapsed = time.perf_counter() - start
    remaining = elapsed / done * (total - done)
    return {
        "current_steps": done,
        "total_steps": total,
        "loss": round(sum(losses) / len(losses), 4) if losses else None,
        "lr": record["step_lrs"][0] if record.get("step_lrs") else None,
        "percentage": round(done / max(total, 1) * 100, 2),
        "elapsed_time": str(datetime.timedelta(seconds=int(elapsed))),
        "remaining_time": str(datetime.timedelta(seconds=int(remaining))),
        "prompt": record["index"],
    }


def answer_one(run, learner: PromptLearner, source: PromptDataSource, gate: Gate, p: int, phase=None) -> dict:
    """Gate, data, steps, answer, restore for prompt ``p``; the prompt's complete record."""
    phase = phase or (lambda name: None)
    timings = {}
    t = time.perf_counter()
    phase("gate")
    gated = gate(p)
    timings["gate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    phase("data")
    key = source.cache_key(p) if gated["flagged"] and run.tlm_args.tlm_demo_cache else None
    cached = run.task_adapters.load(key) if key else None
    if not gated["flagged"]:
        data, fields = [], {"status": "not flagged"}
    elif cached is not None:  # a task trained for an earlier prompt: nothing to build
        data, fields = [], source.fields(p)
    else:
        data, fields = source.rows(p)
    answer_messages = fields.pop("answer_messages", None)
    vote_forms = fields.pop("vote_forms", None)
    timings["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    phase("train")
    start_state = {f"{k}_before": v for k, v in measure_likelihoods(run, learner.model, p).items()}
    if cached is not None:  # its adapter, and the losses measured around its training, without training again
        state, stored = cached
        learner.load_trainable(state)
        trained = {**NOT_TRAINED, **stored, "cache_hit": True}
    else:
        measured = source.loss_rows(p, data) if getattr(source, "measure_data_loss", False) and data else []
        before = mean_loss(learner, measured) if measured else None
        trained = learner.train(data) if data else dict(NOT_TRAINED)
        stored = {}
        if measured:
            stored = {"data_loss_before": before, "data_loss_after": mean_loss(learner, measured)}
            trained.update(stored)
        if key and data:
            run.task_adapters.save(key, learner.trainable_state(), {**stored, "trained_steps": trained["steps"]})
            trained["cache_hit"] = False
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    phase("answer")
    record: dict[str, Any] = {"index": p, **gated, **fields, **trained, **start_state}
    if key and (data or cached is not None):
        record["task"] = key
    record.update(measure_answer(run, learner.model, p, answer_messages, vote_forms, source))
    timings["answer_s"] = time.perf_counter() - t

    t = time.perf_counter()
    learner.restore()
    timings["restore_s"] = time.perf_counter() - t
    record["seconds"] = {k: round(v, 4) for k, v in timings.items()}
    return record


def measure_likelihoods(run, model, p: int, answer_messages: list[dict] | None = None) -> dict[str, Any]:
    """The prompt's log-perplexity (and its user tokens') and its reference answer's bits per byte under ``model`` as
    it is now, one row at a time on this rank, under the run's autocast. The one measurement of per-prompt mode,
    before learning and after, so that their difference is the learning's and not two code paths'. With
    ``answer_messages`` the answer is measured after those messages (in-context demonstrations)."""
    out: dict[str, Any] = {}
    prompt, device = run.prompts[p], run.training_args.device
    model.eval()
    with torch.no_grad(), run.trainer.accelerator.autocast():
        masks = ("loss_mask", "user_mask") if "user_mask" in prompt else ("loss_mask",)
        scores = row_nll(model, prompt, masks, device)
        out["log_ppl"] = scores["loss_mask"][0] / max(scores["loss_mask"][1], 1)
        if "user_mask" in scores:
            out["log_ppl_user"] = scores["user_mask"][0] / max(scores["user_mask"][1], 1)
        answer_row = run.answer_row(p, answer_messages)
        if answer_row is not None:
            nll = row_nll(model, answer_row, ANSWER_MASKS, device)
            out["answer_bpb"] = nll["answer_mask"][0] / math.log(2) / answer_row["answer_bytes"]
            content, counted = nll["answer_content_mask"]
            out["answer_content_bpb"] = content / math.log(2) / answer_row["answer_bytes"] if counted else None
    return out


def measure_answer(
    run,
    model,
    p: int,
    answer_messages: list[dict] | None = None,
    vote_forms: list[dict] | None = None,
    source: PromptDataSource | None = None,
) -> dict[str, Any]:
    """:func:`measure_likelihoods` after learning (``*_after`` / ``answer_*``) and the answer itself, with ``model``
    as it is now; ``answer_messages`` replaces the prompt's messages (in-context demonstrations); with
    ``vote_forms`` the prompt is also answered in those forms (all in one batched ``generate``, in slices of
    ``per_device_eval_batch_size``) and ``source.vote`` keeps one answer."""
    measured = measure_likelihoods(run, model, p, answer_messages)
    out: dict[str, Any] = {f"{k}_after" if k.startswith("log_ppl") else k: v for k, v in measured.items()}
    prompt = run.prompts[p]
    model.eval()
    with torch.no_grad():
        if run.training_args.do_predict:
            ids = list(prompt["input_ids"]) if answer_messages is None else run.prompt_ids_for(p, answer_messages)
            if answer_messages is not None:
                out["answer_prompt_ids"] = ids
            prompts = [ids] + [run.prompt_ids_for(p, form["messages"]) for form in vote_forms or []]
            size = max(run.training_args.per_device_eval_batch_size, 1)
            answers = []
            for i in range(0, len(prompts), size):
                answers += generate_ids(run.trainer, model, prompts[i : i + size], run.gen_kwargs, False)
            out["answer_ids"] = answers[0]
            if vote_forms:
                tokenizer = run.trainer.processing_class
                texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
                augments = [AS_GIVEN] + [form["augment"] for form in vote_forms]
                voted = source.vote(p, augments, texts)
                winner, position = voted.pop("winner"), voted.pop("winner_position")
                out.update(voted)
                if position is not None:
                    out["answer_ids"] = answers[position]
                else:  # an answer mapped back by an inverse: its text, encoded
                    out["answer_ids"] = tokenizer.encode(winner, add_special_tokens=False)
    return out


def _assemble(run, rows: list[dict[str, Any]], source) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Merge every rank's records into the run's rows (dataset order) and write the final files (main rank)."""
    done = _done(run.output_dir)
    missing = [r["index"] for r in rows if r["index"] not in done]
    if missing:
        raise RuntimeError(f"per-prompt records missing for prompts {missing[:10]} (of {len(missing)})")
    stats = {"backward_rows": 0, "optimizer_steps": 0, "skipped_steps": 0, "overflow_steps": 0, "nonfinite_rows": []}
    for row in rows:
        rec = done[row["index"]]
        row.update(selected=rec["steps"] > 0, weight=1.0 if rec["steps"] > 0 else 0.0)
        for key in ("log_ppl", "log_ppl_user"):  # measured as the "after" values are (measure_likelihoods)
            if f"{key}_before" in rec:
                row[key] = rec[f"{key}_before"]
        if "answer_bpb_before" in rec:
            base = {"answer_bpb": rec["answer_bpb_before"], "answer_content_bpb": rec["answer_content_bpb_before"]}
            add_answer_fields(run, [row], {row["index"]: base}, "_base")
        for key in (
            "picks",
            "log_ppl_after",
            "log_ppl_user_after",
            "answer_bpb",
            "answer_content_bpb",
            "flagged",
            "cache_hit",
            "n_demos",
        ):
            if key in rec:
                row[key] = len(rec[key]) if key == "picks" else rec[key]
        stats["backward_rows"] += sum(1 for loss in rec["step_losses"] if loss == loss)
        stats["optimizer_steps"] += rec["steps"]
        stats["skipped_steps"] += rec["skipped_steps"]
        stats["overflow_steps"] += rec.get("overflow_steps", 0)
        if rec["skipped_steps"]:
            stats["nonfinite_rows"].append(row["index"])
    records = [done[r["index"]] for r in rows]
    stats["per_prompt"] = per_prompt_counts(records)
    if run.is_main:
        drop = ("answer_ids", "answer_prompt_ids")
        lines = [outputs.jsonl_line({k: v for k, v in r.items() if k not in drop}) for r in records]
        outputs.atomic_write(os.path.join(run.output_dir, source.record_file), "".join(lines))
    run.trainer.save_adapter()  # the restored starting adapter: every prompt's adaptation was discarded by design
    if run.training_args.do_predict:
        eval_ids = run.eval_dataset["input_ids"]
        prompts = [r.get("answer_prompt_ids") or list(eval_ids[i]) for i, r in enumerate(records)]
        start = time.perf_counter() - run.timings.get("per_prompt_s", 0)
        save_predictions(run, [r["answer_ids"] for r in records], start, prompts)
    return rows, stats


def per_prompt_counts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Summary counts of a per-prompt run: flagged prompts, trained prompts, generated examples by status."""
    counts: dict[str, Any] = {
        "n_flagged": sum(bool(r.get("flagged", True)) for r in records),
        "n_trained": sum(r["steps"] > 0 for r in records),
        "n_cache_hits": sum(bool(r.get("cache_hit")) for r in records),
        "mean_seconds": {},
    }
    if any("n_demos" in r for r in records):
        counts["n_without_demos"] = sum(r.get("n_demos", 0) < 2 for r in records)
    for field in ("augments_skipped", "vote_augments_skipped"):  # prompts an augmentation did not apply to
        skipped: dict[str, int] = {}
        for r in records:
            for name in r.get(field) or {}:
                skipped[name] = skipped.get(name, 0) + 1
        if any(field in r for r in records):
            counts[f"n_{field}"] = skipped
    statuses: dict[str, int] = {}
    for r in records:
        for ex in r.get("generated", []):
            statuses[ex["status"]] = statuses.get(ex["status"], 0) + 1
    if statuses:
        counts["generated_examples"] = statuses
        counts["n_generator_failed"] = sum(r.get("generator_error") is not None for r in records)
    for key in ("gate_s", "data_s", "train_s", "answer_s", "restore_s"):
        values = [r["seconds"].get(key, 0.0) for r in records]
        counts["mean_seconds"][key] = round(sum(values) / max(len(values), 1), 4)
    return counts
