"""Test-time fine-tuning per prompt (``tlm_reset: prompt``), as in the SIFT paper (Hübotter et al., ICLR 2025).

For each test prompt: pick ``tlm_sift_budget`` pool rows for it (SIFT or nearest), take one gradient step per pick
(repeats are more steps) on the row's log-perplexity, answer the prompt, then restore the trainable weights and
the optimizer to their starting state, bit for bit, before the next prompt. Prompts are sharded across ranks;
each rank adapts its own copy independently (no gradient synchronisation is needed or wanted).
"""

import contextlib
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from tlm_plugin.train.loss import log_perplexity


def snapshot_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, snapshot: dict[str, torch.Tensor]) -> None:
    """Trainable weights back to ``snapshot`` (bitwise) and the optimizer back to its empty starting state."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in snapshot:
                param.copy_(snapshot[name])
    optimizer.state.clear()
    optimizer.zero_grad(set_to_none=True)


def _autocast(args) -> contextlib.AbstractContextManager:
    device = args.device.type
    if device == "cuda" and (args.bf16 or args.fp16):
        return torch.autocast("cuda", dtype=torch.bfloat16 if args.bf16 else torch.float16)
    return contextlib.nullcontext()


def _loss_mask(row: dict, ids: torch.Tensor) -> torch.Tensor:
    mask = row.get("loss_mask")
    return torch.ones_like(ids) if mask is None else torch.tensor([mask], device=ids.device)


def run_per_prompt(trainer, prompts, pool, prompt_emb, pool_emb, gen_kwargs) -> dict[str, Any]:
    """Adapt-answer-restore for every prompt of this rank; returns the merged per-prompt records on every rank."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    device = args.device
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    snapshot = snapshot_trainable(model)
    pad_id = trainer.processing_class.pad_token_id
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    pool_t = torch.from_numpy(pool_emb)
    records: dict[int, dict[str, Any]] = {}
    start = time.perf_counter()
    for p in range(rank, len(prompts), world):
        indices, variances = trainer.selector.pick(torch.from_numpy(prompt_emb[p : p + 1]), pool_t)
        model.train()
        losses = []
        for row in indices.tolist():
            ids = torch.tensor([pool[row]["input_ids"]], device=device)
            with _autocast(args):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
                loss, _ = log_perplexity(logits, ids, _loss_mask(pool[row], ids))
            if not torch.isfinite(loss).all():
                optimizer.zero_grad(set_to_none=True)
                losses.append(float("nan"))
                continue
            loss.sum().backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))

        model.eval()
        ids = torch.tensor([prompts[p]["input_ids"]], device=device)
        with torch.no_grad(), _autocast(args):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            after, _ = log_perplexity(logits, ids, _loss_mask(prompts[p], ids))
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen_kwargs)
        answer = generated[0, ids.shape[1] :].tolist()
        restore(model, optimizer, snapshot)
        records[p] = {
            "index": p,
            "picks": indices.tolist(),
            "variances": [float(v) for v in variances],
            "step_losses": losses,
            "log_ppl_after": float(after),
            "answer_ids": [t for t in answer if t != pad_id],
        }
    elapsed = time.perf_counter() - start
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (records, elapsed))
        merged: dict[int, dict[str, Any]] = {}
        for part, _ in parts:
            merged.update(part)
        records, elapsed = merged, max(e for _, e in parts)
    return {"records": [records[i] for i in range(len(prompts))], "seconds": elapsed}


def pool_log_ppl_weights(log_ppl: np.ndarray, lam: float, log_p0: float) -> np.ndarray:
    """TLM's weight lambda * exp(log P - log P0) for rows a pool selector picked (the pick replaces the threshold)."""
    return (lam * np.exp(log_ppl - log_p0)).astype(np.float32)
