"""The TLM trainer: LLaMA-Factory's seq2seq trainer with the TLM loss, scoring passes and online streaming.

Wiring only; the math lives in :mod:`tlm_plugin.train.loss` and the selection in :mod:`tlm_plugin.selectors`.
"""

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from llamafactory.extras import logging
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer
from transformers import Trainer
from transformers.trainer_utils import PredictionOutput

from tlm_plugin.objectives.entropy import fisher_penalty
from tlm_plugin.objectives.step import entropy_step, pseudo_label_nll
from tlm_plugin.train.loss import log_perplexity, masked_log_perplexity, masked_nll, tlm_loss, token_nll
from tlm_plugin.train.prefix import (
    CHECK_SUFFIX_TOKENS,
    MIN_PREFIX_TOKENS,
    SharedPrefix,
    agrees,
    common_prefix_length,
    tolerance,
)


if TYPE_CHECKING:
    from tlm_plugin.hparams import TLMArguments
    from tlm_plugin.selectors import Selector


logger = logging.get_logger(__name__)


class TLMTrainer(CustomSeq2SeqTrainer):
    """Trains a LoRA adapter on unlabeled prompts with loss sum_i S(x_i) log P(x_i) / #selected.

    Offline, ``tlm_weight`` arrives with each training row (scored by the model before any update). Online,
    the weight comes from the current model's forward pass of the same step, via ``selector``.
    A step whose batch (across all ranks) has no selected prompt or a non-finite loss runs no backward pass;
    its gradients stay ``None``, so the optimizer leaves the weights and moments untouched.
    """

    def __init__(self, tlm_args: "TLMArguments", selector: "Selector", **kwargs) -> None:
        super().__init__(**kwargs)
        self.generation_kwargs = dict(kwargs.get("gen_kwargs") or {})
        self.model_accepts_loss_kwargs = False  # our loss is already a per-batch mean; scale by GA steps
        self.tlm_args = tlm_args
        self.selector = selector
        self._scoring = False
        self._embed = False
        self._prefix: dict[str, Any] | None = None  # scoring: the prompts' shared prefix (tlm_plugin.train.prefix)
        self.score_prefix_tokens = 0  # length of the shared prefix the last scoring pass used (0: none)
        self._fisher = None  # EATA's diagonal Fisher and anchor weights, estimated before the first update
        self._anchor = None
        self.records: dict[int, dict[str, Any]] = {}  # online: per-row score at training time
        self.nonfinite_rows: list[int] = []
        self.backward_rows = 0  # selected rows that went through a backward pass (the paper's "#Backwards")
        self.skipped_steps = 0
        self.before_step: Callable[[int], None] | None = None  # online: called with the batch's top global row
        self._stream_high = -1

    # ------------------------------------------------------------------ training
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.tlm_args.tlm_objective != "perplexity":
            return self._entropy_loss(model, inputs)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        log_ppl, _ = log_perplexity(outputs.logits, inputs["input_ids"], inputs["loss_mask"])
        weights = self._selection_weights(inputs, log_ppl.detach())
        self._record(inputs, log_ppl, weights)
        self._last_weights = weights
        loss = tlm_loss(log_ppl, weights)
        return (loss, outputs) if return_outputs else loss

    def _selection_weights(self, inputs, log_ppl: torch.Tensor) -> torch.Tensor:
        if "tlm_weight" in inputs:  # offline: fixed scores from the model before adaptation
            return inputs["tlm_weight"].to(log_ppl.device)
        # online: S(x) from the current model, this very forward pass; rows repeated to even out the last batch
        # across ranks (index at or below what earlier steps covered) are not new and get weight 0
        weights = self.selector.weights(log_ppl.cpu()).to(log_ppl.device)
        return torch.where(inputs["index"].to(log_ppl.device) > self._stream_high, weights, 0.0)

    def _entropy_loss(self, model, inputs):
        """Tent / EATA / COME (see :mod:`tlm_plugin.objectives.step`); the selector decides which rows count."""
        selected = {}

        def select(log_ppl: torch.Tensor) -> torch.Tensor:
            selected["w"] = self._selection_weights(inputs, log_ppl)
            return selected["w"] > 0

        loss, stats = entropy_step(self, model, inputs, select)
        if self.tlm_args.tlm_eata_fisher_coeff > 0:
            loss = loss + self._fisher_penalty(model)
        weights = stats["weights"] * (selected["w"] > 0)
        self._record(inputs, stats["log_ppl"], weights, entropy=stats["entropy"])
        self._last_weights = weights
        return loss

    def _fisher_penalty(self, model) -> torch.Tensor:
        """EATA's beta * sum F (theta - theta0)^2; F and theta0 are taken once, before the first update."""
        unwrapped = self.accelerator.unwrap_model(model)
        params = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
        if self._fisher is None:
            rows = self.train_dataset.select(
                range(min(self.tlm_args.tlm_eata_fisher_samples, len(self.train_dataset)))
            )

            def sample_loss(i: int) -> torch.Tensor:
                batch = self._prepare_inputs(self.data_collator([rows[i]]))
                return pseudo_label_nll(self, model, batch)

            self._anchor = {n: p.detach().clone() for n, p in params.items()}
            # backward() into .grad rather than autograd.grad: the latter cannot see through reentrant
            # activation checkpointing, which LLaMA-Factory enables by default
            fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
            for i in range(len(rows)):
                sample_loss(i).backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += p.grad.detach().float().pow(2) / len(rows)
                        p.grad = None
            self._fisher = fisher
        return fisher_penalty(params, self._anchor, self._fisher, self.tlm_args.tlm_eata_fisher_coeff)

    def _record(self, inputs, log_ppl: torch.Tensor, weights: torch.Tensor, entropy=None) -> None:
        """Per-row score at training time (online: the score that decided; offline entropy objectives: H(x))."""
        if self.tlm_args.tlm_mode != "online" and entropy is None:
            return
        n_tokens = inputs["attention_mask"].sum(-1).tolist()
        ent = entropy.tolist() if entropy is not None else [None] * len(n_tokens)
        for idx, n, lp, w, h in zip(inputs["index"].tolist(), n_tokens, log_ppl.tolist(), weights.tolist(), ent):
            if self.tlm_args.tlm_mode == "online" and idx <= self._stream_high:
                continue
            record = {"n_tokens": n, "log_ppl": lp, "selected": w > 0, "weight": w}
            if h is not None:
                record["entropy"] = h
            self.records[idx] = record

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.before_step is not None:
            self.before_step(self._global_max(int(inputs["index"].max())))

        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        indices = inputs["index"]
        del inputs

        local_selected = int((self._last_weights > 0).sum())
        finite = bool(torch.isfinite(loss))
        any_selected, all_finite = self._agree(local_selected > 0, finite)
        if self.tlm_args.tlm_mode == "online":
            self._stream_high = max(self._stream_high, self._global_max(int(indices.max())))
        if not all_finite:
            self.nonfinite_rows += [int(i) for i in indices.tolist()]
        deepspeed = self.accelerator.distributed_type.name == "DEEPSPEED"
        if (not any_selected or not all_finite) and not deepspeed:
            self.skipped_steps += 1
            return torch.zeros((), device=loss.device)
        if not all_finite:  # DeepSpeed's engine needs a backward before each step: make it a no-op one
            loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0.0

        loss = loss / self.current_gradient_accumulation_steps
        kwargs = {"scale_wrt_gas": False} if deepspeed else {}
        self.accelerator.backward(loss, **kwargs)
        self.backward_rows += local_selected if all_finite else 0
        return loss.detach()

    def _agree(self, any_selected: bool, finite: bool) -> tuple[bool, bool]:
        """Make the skip decision identical on every rank (a skipped backward on one rank would hang DDP)."""
        if not (dist.is_available() and dist.is_initialized()):
            return any_selected, finite
        flags = torch.tensor([int(any_selected), int(not finite)], device=self.args.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0]), not bool(flags[1])

    def _global_max(self, value: int) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return value
        t = torch.tensor([value], device=self.args.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def _get_train_sampler(self, *args, **kwargs):
        if self.tlm_args.tlm_mode == "online":  # the stream is consumed in order
            return torch.utils.data.SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    def fit(self, train_dataset, resume_from_checkpoint=None) -> dict[str, Any]:
        """Train on ``train_dataset``, save metrics and state; return the run statistics merged over ranks."""
        self.train_dataset = train_dataset
        result = self.train(resume_from_checkpoint=resume_from_checkpoint)
        self.log_metrics("train", result.metrics)
        self.save_metrics("train", result.metrics)
        self.save_state()
        records, nonfinite, backward_rows, skipped = self.gathered_online_state()
        return {
            "optimizer_steps": self.state.global_step,
            "backward_rows": backward_rows,
            "skipped_steps": skipped,
            "nonfinite_rows": nonfinite,
            "records": records,
        }

    def predict_prompts(self, eval_dataset, timings: dict[str, float]) -> PredictionOutput:
        """Answer ``eval_dataset`` with the current model (LLaMA-Factory's batched generation)."""
        start = time.perf_counter()
        prediction = self.predict(eval_dataset, metric_key_prefix="predict", **self.generation_kwargs)
        timings["predict_s"] = time.perf_counter() - start
        return prediction

    # ------------------------------------------------------------------ scoring
    def score(self, dataset, batch_size: int | None = None, embed: bool = False) -> dict[str, np.ndarray]:
        """One batched no-grad pass of the current model over ``dataset`` (rows sharded across ranks).

        Returns arrays ordered by the dataset's ``index`` column and complete on every rank:
        ``index``, ``n_tokens`` (prompt tokens), ``log_ppl`` (over the ``tlm_loss_tokens`` scope), ``log_ppl_user``
        (over the user's own tokens, when the prompts carry a ``user_mask``) and, with ``embed``, ``embedding``
        (N, hidden): the last layer's hidden state at the last prompt token, unit-normalised (SIFT's "model"
        embedding).
        """
        saved = (self.args.per_device_eval_batch_size, self.compute_metrics, self.args.prediction_loss_only)
        self._scoring, self._embed = True, embed
        self._prefix = None
        if self.tlm_args.tlm_score_prefix_cache:
            length = common_prefix_length(dataset["input_ids"])
            if length >= MIN_PREFIX_TOKENS:
                ids = [int(t) for t in dataset[0]["input_ids"][:length]]
                self._prefix = {"ids": ids, "shared": None, "checked": False, "off": False}
        self.compute_metrics = None
        self.args.prediction_loss_only = False
        if batch_size is not None:
            self.args.per_device_eval_batch_size = batch_size
        try:
            output = Trainer.predict(self, dataset, metric_key_prefix="tlm_score")  # not Seq2Seq: keeps _gen_kwargs
        finally:
            self._scoring, self._embed, self._prefix = False, False, None
            self.args.per_device_eval_batch_size, self.compute_metrics, self.args.prediction_loss_only = saved
        table = np.asarray(output.predictions, dtype=np.float64)
        table = table[np.argsort(table[:, 0], kind="stable")]
        result = {"index": table[:, 0].astype(np.int64), "n_tokens": table[:, 1].astype(np.int64)}
        result["log_ppl"] = table[:, 2]
        if not np.isnan(table[:, 3]).all():
            result["log_ppl_user"] = table[:, 3]
        if embed:
            result["embedding"] = table[:, 4:].astype(np.float32)
        return result

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if not self._scoring:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            nll, outputs, offset = self._score_forward(model, inputs["input_ids"], inputs["attention_mask"])
            log_ppl, _ = masked_log_perplexity(nll, inputs["loss_mask"])
            user = inputs.get("user_mask")
            log_ppl_user = masked_log_perplexity(nll, user)[0] if user is not None else None
        n_tokens = inputs["attention_mask"].sum(-1)
        columns = [inputs["index"].double()[:, None], n_tokens.double()[:, None], log_ppl.double()[:, None]]
        # the user-token column is always there (NaN without a user mask) so every batch has the same width
        columns.append(log_ppl_user.double()[:, None] if user is not None else torch.full_like(columns[0], math.nan))
        if self._embed:  # right padding: the last prompt token sits at n_tokens - 1 (offset: the shared prefix)
            last = outputs.hidden_states[-1][torch.arange(len(n_tokens)), n_tokens - 1 - offset].double()
            columns.append(torch.nn.functional.normalize(last, dim=-1))
        return None, torch.cat(columns, dim=-1), None

    def _score_forward(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Per-position NLLs (B, T-1, zero on padding), the outputs and the position offset of those outputs.

        With a shared prefix (:mod:`tlm_plugin.train.prefix`) the outputs cover only the tokens after it; the first
        batch is checked against a full forward of its first row.
        """
        state = self._prefix
        if state is not None and not state["off"]:
            if state["shared"] is None:
                state["shared"] = SharedPrefix.build(model, state["ids"], input_ids.device)
                if state["shared"] is None:
                    state["off"] = True
                    logger.info_rank0("Scoring without a shared prefix: the model's cache cannot be shared.")
            shared = state["shared"]
            if shared is not None:
                nll, outputs = shared.forward(model, input_ids, attention_mask, self._embed)
                nll = masked_nll(nll, attention_mask)  # padding positions: exactly 0
                if not state["checked"]:  # causal: the first tokens of a row suffice to compare the two paths
                    state["checked"] = True
                    n = min(int(attention_mask[0].sum()), shared.length + CHECK_SUFFIX_TOKENS)
                    full, _, _ = self._full_forward(model, input_ids[:1, :n], attention_mask[:1, :n])
                    via_prefix, direct = float(nll[0, : n - 1].sum() / (n - 1)), float(full[0].sum() / (n - 1))
                    dtype = outputs.logits.dtype
                    if not agrees(via_prefix, direct, dtype):
                        state["off"] = True
                        logger.warning_rank0(
                            f"Scoring with a shared prefix disagrees with a full forward ({via_prefix:.6f} vs "
                            f"{direct:.6f}, tolerance {tolerance(dtype):g}); scoring with full forwards instead."
                        )
                if not state["off"]:
                    self.score_prefix_tokens = shared.length
                    return nll, outputs, shared.length
        return self._full_forward(model, input_ids, attention_mask)

    def _full_forward(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        outputs = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=self._embed
        )
        return token_nll(outputs.logits, input_ids, attention_mask), outputs, 0

    # ------------------------------------------------------------------ online bookkeeping
    def gathered_online_state(self) -> tuple[dict[int, dict[str, Any]], list[int], int, int]:
        """Per-row online records, non-finite rows, backward rows and skipped steps, merged over ranks."""
        local = (self.records, self.nonfinite_rows, self.backward_rows, self.skipped_steps)
        if not (dist.is_available() and dist.is_initialized()):
            return local
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        records, nonfinite, backward_rows = {}, [], 0
        for rec, nf, br, _ in parts:
            records.update(rec)
            nonfinite += nf
            backward_rows += br
        return records, sorted(set(nonfinite)), backward_rows, max(p[3] for p in parts)


def concat_predictions(outputs: list[PredictionOutput], pad_token_id: int, label_pad_id: int) -> PredictionOutput:
    """Join generation outputs of consecutive chunks (token arrays of different widths) into one."""

    def join(arrays: list[np.ndarray], pad: int) -> np.ndarray:
        width = max(a.shape[1] for a in arrays)
        padded = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=pad) for a in arrays]
        return np.concatenate(padded, axis=0)

    predictions = join([o.predictions for o in outputs], pad_token_id)
    label_ids = join([o.label_ids for o in outputs], label_pad_id)
    metrics: dict[str, float] = {}
    total = sum(len(o.predictions) for o in outputs)
    for key in outputs[0].metrics or {}:
        values = [(o.metrics or {}).get(key) for o in outputs]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            if key.endswith(("_runtime", "_samples")):
                metrics[key] = float(sum(values))
            else:
                metrics[key] = float(sum(v * len(o.predictions) for v, o in zip(values, outputs)) / total)
    return PredictionOutput(predictions=predictions, label_ids=label_ids, metrics=metrics)
