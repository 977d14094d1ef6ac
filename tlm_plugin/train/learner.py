"""The per-prompt learner: the adapter, optimizer and schedule of one prompt's own update on this rank, its exact
restore, and the adapters of tasks already trained.

Per-prompt learning adapts each rank's own copy of the adapter, outside the backend the recipe chose (no DDP
reduction, no DeepSpeed engine: under ZeRO-3 the model is gathered whole first). accelerate's ``backward`` /
optimizer wrapper would go to that backend, so the steps use torch's primitives directly (GradScaler, gradient
clipping, a window of accumulated batches) and transformers' ``get_scheduler`` for the prompt's own schedule; the
recipe's optimizer comes from the trainer (``optim``, LLaMA-Factory's custom optimizers).
"""

import math
import os
from typing import Any

import torch
from transformers import get_scheduler

from tlm_plugin.train import outputs
from tlm_plugin.train.batching import pad_batch
from tlm_plugin.train.loss import token_nll
from tlm_plugin.train.passes import row_nll
from tlm_plugin.train.snapshot import TrainingSnapshot


class PromptLearner:
    """The model, optimizer and schedule of the per-prompt updates on this rank, with the starting snapshot."""

    def __init__(self, run) -> None:
        self.trainer, self.args, self.settings = run.trainer, run.training_args, run.tlm_args
        trainer = self.trainer
        self.model = trainer.accelerator.unwrap_model(trainer.model)
        self.model.to(self.args.device)
        trainer.model_wrapped = trainer.model
        self.optimizer = trainer.create_optimizer()  # the recipe's optim (and LLaMA-Factory's custom optimizers)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(self.args.device.type) if self.args.fp16 else None
        self.snapshot = TrainingSnapshot.take(self.model, self.optimizer)

    def _schedule(self, n_steps: int):
        """The recipe's LR schedule type over this prompt's own steps, with ``tlm_prompt_warmup_steps`` of warm-up
        (the recipe's warm-up is for whole runs: over a prompt's few steps it would start at a learning rate of 0)."""
        args = self.args
        return get_scheduler(
            args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=self.settings.tlm_prompt_warmup_steps,
            num_training_steps=max(n_steps, 1),
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )

    def train(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``tlm_prompt_epochs`` passes over ``rows`` in batches of per_device_train_batch_size, one optimizer step
        per ``gradient_accumulation_steps`` batches; returns the losses and step counts."""
        args = self.args
        bs, ga = args.per_device_train_batch_size, args.gradient_accumulation_steps
        epochs = self.settings.tlm_prompt_epochs
        batches = [rows[i : i + bs] for _ in range(epochs) for i in range(0, len(rows), bs)]
        windows = [batches[i : i + ga] for i in range(0, len(batches), ga)]
        scheduler = self._schedule(len(windows))
        self.model.train()
        losses, steps, skipped, overflows, rates = [], 0, 0, 0, []
        for window in windows:
            finite = True
            for batch in window:
                loss = self._loss(batch) / len(window)
                if not torch.isfinite(loss):
                    finite = False
                    break
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                losses.append(float(loss.detach()) * len(window))
            if not finite:  # a non-finite loss: this update is dropped, nothing moves
                losses.append(math.nan)
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            rates.append(float(self.optimizer.param_groups[0]["lr"]))  # the rate this update steps at
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if args.max_grad_norm and args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)  # skips the optimizer step when the gradients hold an inf / nan
                self.scaler.update()
                stepped = self.scaler.get_scale() >= scale  # an overflow halves the scale
            else:
                self.optimizer.step()
                stepped = True
            self.optimizer.zero_grad(set_to_none=True)
            if stepped:
                scheduler.step()
                steps += 1
            else:
                overflows += 1
        return {
            "step_losses": losses,
            "step_lrs": rates,
            "steps": steps,
            "skipped_steps": skipped,
            "overflow_steps": overflows,
        }

    def _loss(self, batch: list[dict[str, Any]]) -> torch.Tensor:
        """Mean NLL over the counted tokens of the batch (LLaMA-Factory's sft loss for label masks; the row's
        log-perplexity for one pool row)."""
        pad = self.trainer.processing_class.pad_token_id
        padded = pad_batch(
            [r["input_ids"] for r in batch],
            pad,
            {"loss_mask": [r["loss_mask"] for r in batch]},
            device=self.args.device,
        )
        ids, attention, counted = padded["input_ids"], padded["attention_mask"], padded["loss_mask"]
        with self.trainer.accelerator.autocast():
            logits = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        nll = token_nll(logits, ids, counted)
        return nll.sum() / counted[:, 1:].sum().clamp(min=1)

    def restore(self) -> None:
        """Adapter, optimizer state and learning rates back to the start. The fp16 loss scale is carried on to the
        next prompt, as a training run carries it from step to step: restarting it at 2^16 for every prompt would
        repeat the first overflows (steps that change nothing) at every prompt."""
        self.snapshot.restore(self.model, self.optimizer)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in state:
                    param.copy_(state[name].to(param.device))


class TaskAdapters:
    """Adapters of the tasks trained so far (``output_dir/tlm_task_adapters/<key>.pt``: the trainable weights and
    what was measured around their training), shared across ranks and resumed runs; written atomically, so a rank
    that trains a task another rank trains too loses nothing."""

    def __init__(self, output_dir: str) -> None:
        self.folder = os.path.join(output_dir, outputs.TASK_ADAPTERS_DIR)

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(trainable weights, stored record fields) of task ``key``, or None if it was not trained yet."""
        path = os.path.join(self.folder, f"{key}.pt")
        if not os.path.isfile(path):
            return None
        saved = torch.load(path, map_location="cpu")
        return saved["trainable"], dict(saved.get("record") or {})

    def save(self, key: str, state: dict[str, torch.Tensor], record: dict[str, Any] | None = None) -> None:
        os.makedirs(self.folder, exist_ok=True)
        saved = {"trainable": state, "record": record or {}}
        outputs.atomic_replace(os.path.join(self.folder, f"{key}.pt"), lambda tmp: torch.save(saved, tmp))


def candidate_scores(learner: PromptLearner, prompt: list[int], answers: list[list[int]]) -> list[float]:
    """Mean log-probability per token of each answer after ``prompt``, one batched forward (no gradient)."""
    pad = learner.trainer.processing_class.pad_token_id
    seqs = [prompt + a for a in answers]
    counted_tokens = [[0] * len(prompt) + [1] * len(a) for a in answers]
    padded = pad_batch(seqs, pad, {"counted": counted_tokens}, device=learner.args.device)
    ids, attention, counted = padded["input_ids"], padded["attention_mask"], padded["counted"]
    learner.model.eval()
    with torch.no_grad(), learner.trainer.accelerator.autocast():
        logits = learner.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    nll = token_nll(logits, ids, counted)
    return (-(nll.sum(-1) / counted[:, 1:].sum(-1).clamp(min=1))).double().tolist()


def mean_loss(learner: PromptLearner, rows: list[dict[str, Any]]) -> float | None:
    """Mean NLL over the counted tokens of ``rows`` with the current model (no gradient)."""
    if not rows:
        return None
    learner.model.eval()
    total = count = 0.0
    with torch.no_grad(), learner.trainer.accelerator.autocast():
        for row in rows:
            nll, n = row_nll(learner.model, row, ("loss_mask",), learner.args.device)["loss_mask"]
            total, count = total + nll, count + n
    return total / max(count, 1)
