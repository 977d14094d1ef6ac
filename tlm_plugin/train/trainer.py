"""The TLM trainer: LLaMA-Factory's seq2seq trainer with the TLM loss and updates that can be skipped.

Wiring only; the math lives in :mod:`tlm_plugin.train.loss` and :mod:`tlm_plugin.objectives`, the selection in
:mod:`tlm_plugin.selectors`. The training loop is HF Trainer's own, under whatever backend the recipe chose, and the
mechanism below holds for every transformers release the project supports (4.55 to 5.6: the 4.x loops clip inline
and set ``sync_gradients`` again after ``training_step``; 5.3+ call ``_clip_grad_norm`` / ``_get_grad_norm``):

- ``compute_loss``: TLM's weighted log-perplexity (or an entropy objective) and the decision whether a micro-batch
  contributes: some row selected, and a finite loss. The decision is agreed across ranks.
- ``training_step``: a micro-batch that does not contribute raises inside ``compute_loss`` and never reaches
  ``backward`` (HF's own ``training_step`` does the backward, gradient-accumulation scaling and DeepSpeed scaling
  for the others). The last micro-batch of an accumulation window that did contribute runs a zero backward so
  that DDP / DeepSpeed reduce and apply the window's gradients.
- A micro-batch with a non-finite loss is dropped (its rows are listed in ``nonfinite_rows``); the rest of its
  window updates as usual. No gradient is ever discarded after a backward, so no backend can carry one over.
- A window without any backward is a skipped update: the accelerator's ``clip_grad_norm_`` returns None (no
  unscaling, no norm), ``sync_gradients`` is off when the optimizer wrapper is called (no optimizer, GradScaler or
  DeepSpeed step), and the LR scheduler does not advance (:class:`SkippableScheduler`). Skipped updates are counted.
"""

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from llamafactory.extras import logging
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from transformers import TrainerCallback

from tlm_plugin import seam
from tlm_plugin.objectives.entropy import fisher_penalty_grad
from tlm_plugin.objectives.step import entropy_step
from tlm_plugin.train.backend import all_agree, all_gather_objects, gathered
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
    """Holds the optimizer wrapper back during a skipped update; counts real optimizer steps and skipped updates and
    ends a skipped update after HF's step bookkeeping."""

    def __init__(self, trainer: "TLMTrainer") -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.skip_update:  # accelerate's optimizer wrapper steps (optimizer, GradScaler) on sync steps only
            seam.set_sync_gradients(self.trainer.accelerator, False)

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
        self._window = {"backward": False}
        self._window_open = False
        self.add_callback(_UpdateCounter(self))
        clip = self.accelerator.clip_grad_norm_

        def clip_unless_skipped(*args, **kwargs):  # called by every HF loop before the optimizer step
            return None if self.skip_update else clip(*args, **kwargs)

        self.accelerator.clip_grad_norm_ = clip_unless_skipped

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
        if self._decide(inputs, loss, weights) == "zero":
            return self._zero_loss(model, inputs)
        self.stats["backward_rows"] += int((weights > 0).sum())
        return loss

    def _decide(self, inputs, loss: torch.Tensor, weights: torch.Tensor) -> str:
        """``"loss"`` (backward this micro-batch's loss), ``"zero"`` (a zero backward that closes a window whose
        earlier micro-batches contributed), or raise :class:`_NoBackward`. The same answer on every rank."""
        any_selected, any_nonfinite = all_agree([bool((weights > 0).any()), not bool(torch.isfinite(loss))])
        closes_window = self.accelerator.sync_gradients and self._window["backward"]
        if any_nonfinite:
            rows = [int(i) for i in inputs["index"].tolist() if i >= 0]
            self.nonfinite_rows += [r for part in all_gather_objects(rows) for r in part]
            if closes_window:
                return "zero"
            raise _NoBackward(torch.zeros((), device=self.args.device))
        if not any_selected and not closes_window:
            raise _NoBackward(torch.zeros((), device=self.args.device))
        return "loss"

    def _zero_loss(self, model, inputs) -> torch.Tensor:
        """A loss of exactly 0 from a fresh forward of one token: its backward closes the window (DDP / DeepSpeed
        reduce and step the earlier micro-batches' gradients) without the non-finite values of this micro-batch."""
        ids = inputs["input_ids"][:1, :1]
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        return logits.float().sum() * 0.0

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
            self._window = {"backward": False}
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
            self.skip_update = not self._window["backward"]
        return loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if type(scheduler).__name__ == "DummyScheduler":
            # the DeepSpeed config's own scheduler, stepped by the engine's step (which a skipped update never
            # reaches); transformers recognises it by this class name to hand it to accelerate
            return scheduler
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
        mode, nothing selected) have none. Their trainable weights may still be ZeRO-3 partitions (a ZeRO inference
        engine for the passes before training converts every parameter it finds), so every rank gathers them and the
        main rank saves.
        """
        if not self.is_deepspeed_enabled or self.deepspeed is not None:
            self.save_model()
            return
        model = self.accelerator.unwrap_model(self.model)
        with gathered([p for p in model.parameters() if p.requires_grad]):
            if self.args.should_save:
                out = self.args.output_dir
                os.makedirs(out, exist_ok=True)
                model.save_pretrained(out)
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
