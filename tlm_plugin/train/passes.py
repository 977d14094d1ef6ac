"""No-grad passes over a set of rows: per-row NLL sums under one or more token masks, and embeddings.

One function serves every measurement of a run: the prompts' log-perplexity before and after adaptation (TLM's S(x)),
the user-token log-perplexity, SIFT's "model" embeddings and the reference answers' likelihood (bits per byte). Rows
are sharded across ranks and sorted by length; a batch holds either ``batch_size`` rows or as many rows as fit a token
budget (by default: the tokens of the largest training batch, so a pass never needs more activation or logit memory
than a training step). The tokens that every row starts with are run once and their key/value cache is reused
(:mod:`tlm_plugin.train.prefix`). Under ZeRO-3 / FSDP every rank runs the same number of batches
(:mod:`tlm_plugin.train.backend`). Results come back complete on every rank, ordered by the rows' ``index``, as
float64 / int64 / float32 NumPy arrays on the CPU.
"""

import math
from typing import Any

import numpy as np
import torch
from llamafactory.extras import logging

from tlm_plugin.train.backend import (
    all_agree,
    all_gather_objects,
    lockstep_count,
    my_rows,
    no_grad_model,
    progress,
    shards_parameters,
)
from tlm_plugin.train.batching import pad_batch
from tlm_plugin.train.loss import masked_nll, token_nll
from tlm_plugin.train.prefix import (
    CHECK_SUFFIX_TOKENS,
    MIN_PREFIX_TOKENS,
    SharedPrefix,
    agrees,
    common_prefix_length,
    tolerance,
)


logger = logging.get_logger(__name__)


def plan_batches(lengths: list[int], rows: list[int], batch_size: int | None, token_budget: int) -> list[list[int]]:
    """Rows grouped into batches, longest first: ``batch_size`` rows each, or (None) as many as keep
    rows x longest-row-length within ``token_budget`` (at least one row per batch)."""
    order = sorted(rows, key=lambda r: (-lengths[r], r))
    batches: list[list[int]] = []
    for r in order:
        if batches:
            last = batches[-1]
            fits = len(last) < batch_size if batch_size else (len(last) + 1) * lengths[last[0]] <= token_budget
            if fits:
                last.append(r)
                continue
        batches.append([r])
    return batches


def nll_pass(
    trainer,
    dataset,
    masks: tuple[str, ...] = ("loss_mask",),
    embed: bool = False,
    batch_size: int | None = None,
    token_budget: int | None = None,
    prefix_cache: bool = True,
    desc: str = "no-grad pass",
) -> dict[str, Any]:
    """Per-row NLL sums (nats) and counted tokens under each mask, with the current model, without gradient.

    Args:
        dataset: rows with ``input_ids``, ``index`` and the mask columns (0/1 per token; the NLL of token t counts
            when ``mask[t]`` is 1 and t > 0). Rows without a mask column count every token.
        masks: mask columns to sum over; ``"{mask}_nll"`` (N,) float64 and ``"{mask}_tokens"`` (N,) int64 come back.
        embed: also return ``"embedding"`` (N, hidden) float32: the last layer's unit-normalised state at each row's
            last token (SIFT's "model" embedding).
        batch_size / token_budget: rows per batch, or the token budget (default: the longest row, i.e. batch 1).

    Returns:
        ``index`` and ``n_tokens`` (N,) int64 in index order, the arrays above, and ``shared_prefix_tokens`` (int).
    """
    n = len(dataset)
    ids_column = dataset["input_ids"]
    lengths = [len(ids) for ids in ids_column]
    budget = token_budget or (max(lengths) if lengths else 1)
    batches = plan_batches(lengths, my_rows(n), batch_size, budget)
    lockstep = shards_parameters(trainer)
    n_batches = lockstep_count(len(batches), lockstep) if n else 0
    prefix_len = common_prefix_length(ids_column) if prefix_cache and n else 0
    prefix_ids = [int(t) for t in ids_column[0][:prefix_len]] if prefix_len >= MIN_PREFIX_TOKENS else None

    local: dict[str, list] = {"index": [], "n_tokens": [], "embedding": []}
    for mask in masks:
        local[f"{mask}_nll"], local[f"{mask}_tokens"] = [], []
    state = {"shared": None, "checked": False, "off": prefix_ids is None, "used": 0}
    device = trainer.args.device
    with no_grad_model(trainer) as model, trainer.accelerator.autocast(), progress(n_batches, desc) as bar:
        for b in range(n_batches):
            bar.update()
            padding = b >= len(batches)
            batch_rows = batches[b] if not padding else [batches[0][0] if batches else 0]
            batch = _collate([dataset[r] for r in batch_rows], masks, trainer.processing_class.pad_token_id, device)
            nll, hidden, offset = _forward(model, batch, prefix_ids, state, embed, lockstep)
            if padding:
                continue
            attention = batch["attention_mask"]
            local["index"] += batch["index"].tolist()
            local["n_tokens"] += attention.sum(-1).tolist()
            for mask in masks:
                kept = masked_nll(nll, batch[mask])
                local[f"{mask}_nll"] += kept.double().sum(-1).tolist()
                local[f"{mask}_tokens"] += batch[mask][:, 1:].sum(-1).tolist()
            if embed:
                last = attention.sum(-1) - 1 - offset
                states = hidden[torch.arange(len(last), device=hidden.device), last].float()
                local["embedding"].append(torch.nn.functional.normalize(states, dim=-1).cpu().numpy())
    return _merge(local, masks, embed, state["used"])


def _collate(features: list[dict], masks: tuple[str, ...], pad_id: int, device) -> dict[str, torch.Tensor]:
    batch = pad_batch(
        [f["input_ids"] for f in features], pad_id, {m: [f.get(m) for f in features] for m in masks}, device=device
    )
    batch["index"] = torch.tensor([int(f["index"]) for f in features], dtype=torch.long)
    return batch


def _forward(model, batch, prefix_ids, state, embed: bool, lockstep: bool):
    """(B, T-1) NLLs (0 on padding), the last layer's states (or None) and their position offset."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    if not state["off"]:
        if state["shared"] is None:
            state["shared"] = SharedPrefix.build(model, prefix_ids, ids.device)
            if state["shared"] is None:
                state["off"] = True
                logger.info_rank0("Scoring without a shared prefix: the model's cache cannot be shared.")
        shared = state["shared"]
        if shared is not None:
            nll, outputs = shared.forward(model, ids, attention, embed)
            nll = masked_nll(nll, attention)  # padding positions: exactly 0
            if not state["checked"]:  # causal: the first tokens of a row suffice to compare the two paths
                state["checked"] = True
                n = min(int(attention[0].sum()), shared.length + CHECK_SUFFIX_TOKENS)
                full, _, _ = _full_forward(model, ids[:1, :n], attention[:1, :n], False)
                via_prefix, direct = float(nll[0, : n - 1].sum() / (n - 1)), float(full[0].sum() / (n - 1))
                dtype = outputs.logits.dtype
                disagree = not agrees(via_prefix, direct, dtype)
                if lockstep:  # every rank must take the same path from here on
                    (disagree,) = all_agree([disagree])
                if disagree:
                    state["off"] = True
                    logger.warning_rank0(
                        f"Scoring with a shared prefix disagrees with a full forward ({via_prefix:.6f} vs "
                        f"{direct:.6f}, tolerance {tolerance(dtype):g}); scoring with full forwards instead."
                    )
            if not state["off"]:
                state["used"] = shared.length
                hidden = outputs.hidden_states[-1] if embed else None
                return nll, hidden, shared.length
    return _full_forward(model, ids, attention, embed)


def _full_forward(model, ids, attention, embed: bool):
    outputs = model(input_ids=ids, attention_mask=attention, use_cache=False, output_hidden_states=embed)
    hidden = outputs.hidden_states[-1] if embed else None
    return token_nll(outputs.logits, ids, attention), hidden, 0


def _merge(local: dict[str, list], masks, embed: bool, prefix_tokens: int) -> dict[str, Any]:
    parts = all_gather_objects(local)
    index = np.asarray([i for p in parts for i in p["index"]], dtype=np.int64)
    order = np.argsort(index, kind="stable")
    result: dict[str, Any] = {
        "index": index[order],
        "n_tokens": np.asarray([x for p in parts for x in p["n_tokens"]], dtype=np.int64)[order],
        "shared_prefix_tokens": prefix_tokens,
    }
    for mask in masks:
        result[f"{mask}_nll"] = np.asarray([x for p in parts for x in p[f"{mask}_nll"]], dtype=np.float64)[order]
        result[f"{mask}_tokens"] = np.asarray([x for p in parts for x in p[f"{mask}_tokens"]], dtype=np.int64)[order]
    if embed:
        blocks = [e for p in parts for e in p["embedding"]]
        result["embedding"] = np.concatenate(blocks, axis=0)[order] if blocks else np.zeros((0, 0), np.float32)
    return result


def mean_nll(result: dict[str, Any], mask: str) -> np.ndarray:
    """Per-row log-perplexity (mean NLL, nats) under ``mask``: NaN for a row with no counted token."""
    total, count = result[f"{mask}_nll"], result[f"{mask}_tokens"]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), math.nan)


def row_nll(model, row: dict, masks: tuple[str, ...], device) -> dict[str, float]:
    """One row through ``model`` (already in eval mode, no grad), on this rank only: ``{mask: (nll sum, tokens)}``.

    For the per-prompt loop, whose ranks work independently (no collective pass may run there).
    """
    ids = torch.as_tensor([row["input_ids"]], dtype=torch.long, device=device)
    attention = torch.ones_like(ids)
    nll = token_nll(model(input_ids=ids, attention_mask=attention, use_cache=False).logits, ids, attention)
    out = {}
    for mask in masks:
        values = row.get(mask)
        m = torch.as_tensor([values], device=device) if values is not None else attention
        out[mask] = (float(masked_nll(nll, m).double().sum()), int(m[:, 1:].sum()))
    return out
