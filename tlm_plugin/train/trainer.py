"""The TLM trainer: LLaMA-Factory's seq2seq trainer with the TLM loss and updates that can be skipped.

Wiring only; the math lives in :mod:`tlm_plugin.train.loss` and :mod:`tlm_plugin.objectives`, the selection in
:mod:`tlm_plugin.selectors`. The training loop is HF Trainer's own, under whatever backend the recipe chose; this
class changes three things through the hooks HF offers:

- ``compute_loss``: TLM's weighted log-perplexity (or an entropy objective) and the decision whether a micro-batch
  contributes: some row selected, and a finite loss. The decision is agreed across ranks.
- ``training_step``: a micro-batch that does not contribute raises inside ``compute_loss`` and never reaches
  ``backward`` (HF's own ``training_step`` does the backward, gradient-accumulation scaling and DeepSpeed scaling
  for the others). The last micro-batch of an accumulation window that did contribute runs its (zero) backward so
  that DDP / DeepSpeed reduce the window's gradients.
- a window without any backward, or with a non-finite loss, is a skipped update: ``_clip_grad_norm`` and
  ``_get_grad_norm`` return None, the optimizer wrapper sees no sync step (so no optimizer, GradScaler or DeepSpeed
  step) and the LR scheduler does not advance (:class:`SkippableScheduler`). Skipped updates are counted.
"""

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from llamafactory.extras import logging
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from transformers import TrainerCallback

from tlm_plugin.objectives.step import entropy_step
from tlm_plugin.train.backend import all_agree, all_gather_objects
from tlm_plugin.train.loss import masked_log_perplexity, tlm_loss, token_nll


if TYPE_CHECKING:
    from tlm_plugin.hparams import TLMArguments
    from tlm_plugin.selectors import Selector


logger = logging.get_logger(__name__)


class _NoBackward(Exception):
    """Raised by ``compute_loss`` for a micro-batch that must not reach ``backward``."""

    def __init__(self, loss: torch.Tensor) -> None:
        super().__init__("no backward")
        self.loss = loss


class SkippableScheduler:
    """The LR scheduler HF created, whose ``step`` does nothing during a skipped update."""

    def __init__(self, scheduler, trainer: "TLMTrainer") -> None:
        self.scheduler = scheduler
        self._trainer = trainer

    def step(self, *args, **kwargs):
        if self._trainer.skip_update:
            return None
        return self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.scheduler, name)


class _UpdateCounter(TrainerCallback):
    """Counts real optimizer steps and skipped updates; ends a skipped update after HF's step bookkeeping."""

    def __init__(self, trainer: "TLMTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if t.skip_update:
            t.stats["skipped_steps"] += 1
        elif t.accelerator.optimizer_step_was_skipped:
            t.stats["overflow_steps"] += 1  # fp16 / DeepSpeed loss scaling found inf gradients
        else:
            t.stats["optimizer_steps"] += 1
        t.skip_update = False


class TLMTrainer(CustomSeq2SeqTrainer):
    """Trains a LoRA adapter on unlabeled prompts with loss sum_i S(x_i) log P(x_i) / #selected.

    Offline, ``tlm_weight`` arrives with each training row (scored by the unadapted model). In a stream (online
    mode), the weights come from the current model's forward pass of the same step: ``selector`` sees the scores of
    every row of the update, gathered across ranks. Rows with ``index`` < 0 are padding of the stream (weight 0).
    """

    def __init__(self, tlm_args: "TLMArguments", selector: "Selector | None", **kwargs) -> None:
        super().__init__(**kwargs)
        self.generation_kwargs = dict(kwargs.get("gen_kwargs") or {})
        self.model_accepts_loss_kwargs = False  # our loss is already a per-batch mean; scale by GA steps
        self.tlm_args = tlm_args
        self.selector = selector
        self.streaming = False
        self.fisher = None  # EATA's (anchor, diagonal Fisher), estimated before training: see use_fisher
        self.records: dict[int, dict[str, Any]] = {}  # streaming: per-row score at training time
        self.nonfinite_rows: list[int] = []
        self.stats = {"backward_rows": 0, "optimizer_steps": 0, "skipped_steps": 0, "overflow_steps": 0}
        self.on_window_start: Callable[[dict], None] | None = None  # streaming: called before each update's rows
        self.skip_update = False
        self._window = {"backward": False, "discard": False}
        self._window_open = False
        self.add_callback(_UpdateCounter(self))

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.tlm_args.tlm_objective != "perplexity":
            loss, log_ppl, weights, entropy = self._entropy_loss(model, inputs)
        else:
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            nll = token_nll(outputs.logits, inputs["input_ids"], inputs["attention_mask"])
            log_ppl, _ = masked_log_perplexity(nll, inputs["loss_mask"])
            weights = self._selection_weights(inputs, log_ppl.detach())
            loss, entropy = tlm_loss(log_ppl, weights), None
            if self.streaming and "user_mask" in inputs:  # the record's user-token log-perplexity, same forward
                user = masked_log_perplexity(nll.detach(), inputs["user_mask"])[0]
                self._user_log_ppl = dict(zip(inputs["index"].tolist(), user.tolist()))
        self._record(inputs, log_ppl.detach(), weights, entropy)
        self._decide(inputs, loss, weights)
        self.stats["backward_rows"] += int((weights > 0).sum())
        return loss

    def _decide(self, inputs, loss: torch.Tensor, weights: torch.Tensor) -> None:
        """Raise :class:`_NoBackward` unless this micro-batch's backward is needed (same decision on every rank)."""
        any_selected, any_nonfinite = all_agree([bool((weights > 0).any()), not bool(torch.isfinite(loss))])
        boundary = self.accelerator.sync_gradients
        zero = torch.zeros((), device=self.args.device)
        if any_nonfinite:
            self._window["discard"] = True
            rows = [int(i) for i in inputs["index"].tolist() if i >= 0]
            self.nonfinite_rows += [r for part in all_gather_objects(rows) for r in part]
            raise _NoBackward(zero)
        if not any_selected and not (boundary and self._window["backward"] and not self._window["discard"]):
            raise _NoBackward(zero)

    def _selection_weights(self, inputs, log_ppl: torch.Tensor) -> torch.Tensor:
        if "tlm_weight" in inputs:  # offline: fixed scores from the model before adaptation
            return inputs["tlm_weight"].to(log_ppl.device)
        # streaming: S(x) from the current model, this very forward pass, over all rows of the update
        index = inputs["index"].to(log_ppl.device)
        parts = all_gather_objects((index.tolist(), log_ppl.float().cpu().tolist()))
        pairs = sorted((i, lp) for idx, lps in parts for i, lp in zip(idx, lps) if i >= 0)
        weights = {}
        if pairs:
            global_weights = self.selector.weights(torch.tensor([lp for _, lp in pairs], dtype=torch.float32))
            weights = {i: float(w) for (i, _), w in zip(pairs, global_weights.tolist())}
        return torch.tensor([weights.get(int(i), 0.0) for i in index.tolist()], device=log_ppl.device)

    def _entropy_loss(self, model, inputs):
        """Tent / EATA / COME (see :mod:`tlm_plugin.objectives.step`); the selector decides which rows count."""
        selected = {}

        def select(log_ppl: torch.Tensor) -> torch.Tensor:
            selected["w"] = self._selection_weights(inputs, log_ppl)
            return selected["w"] > 0

        loss, stats = entropy_step(self, model, inputs, select)
        weights = stats["weights"] * (selected["w"] > 0)
        return loss, stats["log_ppl"], weights, stats["entropy"]

    def use_fisher(self, anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> None:
        """EATA's anti-forgetting term beta * sum F (theta - theta0)^2, as a gradient hook on each trainable weight.

        Each backward adds 2 beta F (theta - theta0) / (accumulation steps), times the fp16 loss scale when one is
        active, so an update carries the penalty's gradient once. Identical on every rank (same weights, anchor and
        Fisher), so DDP's averaging leaves it unchanged.
        """
        from tlm_plugin.objectives.entropy import fisher_penalty_grad

        self.fisher = (anchor, fisher)
        coeff = self.tlm_args.tlm_eata_fisher_coeff
        for name, param in self.accelerator.unwrap_model(self.model).named_parameters():
            if name not in fisher:
                continue

            def hook(grad, param=param, a=anchor[name], f=fisher[name]):
                scaler = self.accelerator.scaler
                scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
                extra = fisher_penalty_grad(param, a, f, coeff) * scale / self.current_gradient_accumulation_steps
                return grad + extra.to(grad.dtype)

            param.register_hook(hook)

    def _record(self, inputs, log_ppl: torch.Tensor, weights: torch.Tensor, entropy=None) -> None:
        """Per-row score at training time (streaming: the score that decided; entropy objectives: H(x))."""
        if not self.streaming and entropy is None:
            return
        n_tokens = inputs["attention_mask"].sum(-1).tolist()
        ent = entropy.tolist() if entropy is not None else [None] * len(n_tokens)
        for idx, n, lp, w, h in zip(inputs["index"].tolist(), n_tokens, log_ppl.tolist(), weights.tolist(), ent):
            if idx < 0:
                continue
            record = {"n_tokens": n, "log_ppl": lp, "selected": w > 0, "weight": w}
            if idx in getattr(self, "_user_log_ppl", {}):
                record["log_ppl_user"] = self._user_log_ppl[idx]
            if h is not None:
                record["entropy"] = h
            self.records[idx] = record

    # ------------------------------------------------------------------ the update
    def training_step(self, model, inputs, num_items_in_batch=None):
        boundary = self.accelerator.sync_gradients
        if not self._window_open:
            self._window = {"backward": False, "discard": False}
            self._window_open = True
            if self.on_window_start is not None:
                self.on_window_start(inputs)
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._window["backward"] = True
        except _NoBackward as skipped:
            loss = skipped.loss
        if boundary:
            self._window_open = False
            self.skip_update = self._window["discard"] or not self._window["backward"]
            if self.skip_update:  # the optimizer wrapper only steps on a sync step
                self.accelerator.gradient_state._set_sync_gradients(False)
        return loss

    def _clip_grad_norm(self, model):
        return None if self.skip_update else super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        return None if self.skip_update else super()._get_grad_norm(model, grad_norm=grad_norm)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if not isinstance(scheduler, SkippableScheduler):
            self.lr_scheduler = scheduler = SkippableScheduler(scheduler, self)
        return scheduler

    def _get_train_sampler(self, *args, **kwargs):
        if self.streaming:  # the stream is consumed in order
            return torch.utils.data.SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    def fit(self, train_dataset, resume_from_checkpoint=None) -> dict[str, Any]:
        """Train on ``train_dataset``, save metrics and state; return the run statistics merged over ranks."""
        self.train_dataset = train_dataset
        result = self.train(resume_from_checkpoint=resume_from_checkpoint)
        self.log_metrics("train", result.metrics)
        self.save_metrics("train", result.metrics)
        self.save_state()
        return self.gathered_stats()

    def save_adapter(self) -> None:
        """Save the adapter (and tokenizer, arguments) to output_dir, with or without a DeepSpeed engine.

        HF's ``save_model`` asks the DeepSpeed engine to save; runs that never entered the training loop (per-prompt
        mode, nothing selected) have none, and their adapter weights are complete on every rank, so the main rank
        saves them directly.
        """
        if not self.is_deepspeed_enabled or self.deepspeed is not None:
            self.save_model()
            return
        if self.args.should_save:
            out = self.args.output_dir
            os.makedirs(out, exist_ok=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(out)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(out)
            torch.save(self.args, os.path.join(out, "training_args.bin"))

    def gathered_stats(self) -> dict[str, Any]:
        """Backward rows (summed over ranks), optimizer / skipped steps and non-finite rows of this run."""
        parts = all_gather_objects((self.stats, self.nonfinite_rows))
        stats = dict(parts[0][0])
        stats["backward_rows"] = sum(p[0]["backward_rows"] for p in parts)
        stats["nonfinite_rows"] = sorted({r for _, rows in parts for r in rows})
        return stats

    def gathered_records(self) -> dict[int, dict[str, Any]]:
        merged: dict[int, dict[str, Any]] = {}
        for part in all_gather_objects(self.records):
            merged.update(part)
        return merged
