"""One training step of an entropy objective (Tent, EATA, COME) on a batch of test prompts.

The model first answers each prompt greedily for ``tlm_entropy_tokens`` tokens (batched, no gradient, KV cache);
then ONE forward pass with gradient over prompt + answer gives the logits whose entropy is minimised at the
answer positions, and the prompt's log-perplexity at the prompt positions (for selectors and records).
"""

import math
from collections.abc import Callable
from typing import Any

import torch

from tlm_plugin import seam
from tlm_plugin.objectives.entropy import come_loss, eata_loss, eata_threshold, mean_entropy, tent_loss
from tlm_plugin.train.backend import generation_module, shards_parameters
from tlm_plugin.train.generation import generate
from tlm_plugin.train.loss import log_perplexity


OBJECTIVES = ("perplexity", "tent", "eata", "come")


def to_left_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) prompts -> left-padded, as generation needs; the three tensors move together."""
    lengths = attention_mask.sum(-1)
    shift = input_ids.size(1) - lengths
    cols = (torch.arange(input_ids.size(1), device=input_ids.device)[None, :] - shift[:, None]) % input_ids.size(1)
    left_ids = torch.gather(input_ids, 1, cols)
    real = torch.arange(input_ids.size(1), device=input_ids.device)[None, :] >= shift[:, None]
    left_ids = torch.where(real, left_ids, torch.full_like(left_ids, pad_id))
    left_loss = torch.where(real, torch.gather(loss_mask, 1, cols), torch.zeros_like(loss_mask))
    return left_ids, real.long(), left_loss


def _generated_mask(new_tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for generated tokens up to and including the first end-of-turn token, 0 after it."""
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids, device=new_tokens.device))
    ended_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~ended_before).long()


def generate_and_forward(trainer, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Greedy answers (no gradient, KV cache), then one forward pass with gradient over prompt + answer.

    Returns ``logits`` (B, T, V), ``sequences`` (B, T), ``answer_mask`` (positions whose logits predict a generated
    token) and ``prompt_mask`` (positions of counted prompt tokens), all aligned with left-padded ``sequences``, and
    ``answer_window``: the slice of positions that can predict a generated token (the only ones an objective reads).
    """
    args = trainer.tlm_args
    tokenizer = trainer.processing_class
    pad_id = tokenizer.pad_token_id
    left_ids, left_attn, left_loss = to_left_padding(
        inputs["input_ids"], inputs["attention_mask"], inputs["loss_mask"], pad_id
    )
    first_real = left_attn.argmax(-1)  # the first real token has no prediction from the padding before it
    left_loss[torch.arange(len(first_real)), first_real] = 0

    eos_ids = trainer.generation_kwargs.get("eos_token_id") or [tokenizer.eos_token_id]
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    decoder = generation_module(trainer, model)
    was_training = decoder.training
    decoder.eval()
    sequences = generate(
        decoder,
        left_ids,
        left_attn,
        shards_parameters(trainer),
        max_new_tokens=args.tlm_entropy_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
    )
    decoder.train(was_training)

    width = left_ids.size(1)
    gen_mask = _generated_mask(sequences[:, width:], eos_ids)
    attention = torch.cat([left_attn, gen_mask], dim=-1)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=sequences, attention_mask=attention, position_ids=position_ids, use_cache=False).logits
    answer_mask = torch.zeros_like(attention)
    answer_mask[:, width - 1 : -1] = gen_mask  # logits at t predict token t + 1: the generated tokens
    prompt_mask = torch.cat([left_loss, torch.zeros_like(gen_mask)], dim=-1)
    return {
        "logits": logits,
        "sequences": sequences,
        "answer_mask": answer_mask,
        "prompt_mask": prompt_mask,
        "answer_window": slice(width - 1, sequences.size(1) - 1),
    }


def pseudo_label_nll(trainer, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the model's own greedy answer (its argmax pseudo-labels): the loss of EATA's Fisher."""
    out = generate_and_forward(trainer, model, inputs)
    nll, _ = log_perplexity(out["logits"], out["sequences"], torch.roll(out["answer_mask"], 1, dims=-1))
    return nll.mean()


def estimate_fisher(trainer, rows: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """EATA's anchor weights and diagonal Fisher F = mean over ``rows`` of (d pseudo-label NLL / d theta)^2.

    Runs before training on the unwrapped model (no DDP reducer, no DeepSpeed engine is involved), one prompt at a
    time; ``backward()`` into ``.grad`` rather than ``autograd.grad``, which cannot see through the reentrant
    activation checkpointing LLaMA-Factory enables by default.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    anchor = {n: p.detach().clone() for n, p in params.items()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.train()
    for row in rows:
        batch = seam.prepare_inputs(trainer, trainer.data_collator([row]))
        pseudo_label_nll(trainer, model, batch).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float().pow(2) / len(rows)
                p.grad = None
    model.train(was_training)
    return anchor, fisher


def entropy_step(
    trainer, model, inputs: dict[str, torch.Tensor], select: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loss of ``trainer.tlm_args.tlm_objective`` on a batch and per-sample statistics (all detached).

    ``select`` maps the prompts' detached log-perplexities (B,) to a (B,) bool mask of the samples the selector
    keeps; the others are masked out of the objective (and so get no gradient).
    """
    args = trainer.tlm_args
    out = generate_and_forward(trainer, model, inputs)
    log_ppl, _ = log_perplexity(out["logits"], out["sequences"], out["prompt_mask"])
    # The objectives' fp32 softmax terms are (B, positions, V): over the answer window only, not the whole prompt
    # (with a 128k vocabulary and a 1k-token prompt the full tensor alone is several GB per sample).
    logits, answer_mask = out["logits"][:, out["answer_window"]], out["answer_mask"][:, out["answer_window"]]
    entropy = mean_entropy(logits.detach(), answer_mask)
    keep = select(log_ppl.detach()).to(answer_mask.device)
    answer_mask = answer_mask * keep[:, None].long()

    objective = args.tlm_objective
    if objective == "tent":
        loss = tent_loss(logits, answer_mask)
        weights = torch.ones_like(entropy)
    elif objective == "eata":
        e0 = args.tlm_eata_e0 * (math.log(logits.size(-1)) if args.tlm_eata_e0_scale == "ln_vocab" else 1.0)
        loss, weights, _ = eata_loss(logits, answer_mask, e0)
    elif objective == "come":
        loss = come_loss(logits, answer_mask)
        weights = torch.ones_like(entropy)
    else:
        raise ValueError(f"entropy_step does not handle tlm_objective {objective!r}")
    weights = torch.where(answer_mask.sum(-1) > 0, weights, torch.zeros_like(weights))
    stats = {
        "log_ppl": log_ppl.detach(),
        "entropy": entropy,
        "weights": weights.detach(),
        "answer_tokens": answer_mask.sum(-1),
    }
    return loss, stats


__all__ = ["OBJECTIVES", "eata_threshold", "entropy_step", "to_left_padding"]
