"""Scoring prompts that share a prefix: run the shared tokens through the model once, not once per prompt.

Every templated test prompt of a run starts with the same tokens: the chat template's opening, the system prompt,
the user role header and often a fixed instruction. A scoring pass (the no-grad forward that gives each prompt its
log-perplexity) runs that prefix once, keeps its key/value cache and, for every batch, runs only the tokens after
it. With causal attention the prefix's hidden states do not depend on what follows, so the per-token NLLs are those
of a full forward up to floating-point rounding; the first batch of every pass is checked against a full forward of
the start of one row (the prefix and the next ``CHECK_SUFFIX_TOKENS`` tokens) and the pass falls back to full forwards if the two disagree (or the model's cache is not a plain
:class:`transformers.DynamicCache`, e.g. sliding-window layers).
"""

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from llamafactory.extras import logging
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tlm_plugin.train.loss import token_nll


logger = logging.get_logger(__name__)

MIN_PREFIX_TOKENS = 4  # below this the bookkeeping costs more than the forward it saves
CHECK_SUFFIX_TOKENS = 16  # the check's full forward covers the prefix and this many tokens after it
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # |log_ppl difference|, nats; half dtypes: 5e-2
HALF_TOLERANCE = 5e-2


def common_prefix_length(sequences) -> int:
    """Length of the longest common token prefix of ``sequences``, leaving every sequence at least one own token."""
    sequences = list(sequences)
    if not sequences:
        return 0
    prefix = list(sequences[0])
    shortest = len(prefix)
    for seq in sequences[1:]:
        shortest = min(shortest, len(seq))
        n = min(len(prefix), len(seq))
        i = 0
        while i < n and prefix[i] == seq[i]:
            i += 1
        del prefix[i:]
        if not prefix:
            return 0
    return max(0, min(len(prefix), shortest - 1))


def _plain_cache(cache: Any) -> bool:
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass
class SharedPrefix:
    """The prefix's key/value cache, the NLL of its own tokens and the log-probabilities of the token after it."""

    length: int
    cache: Any
    nll: torch.Tensor  # (length - 1,) NLL of prefix tokens 1 .. length-1, float32
    next_log_probs: torch.Tensor  # (V,) log-probabilities at the prefix's last position, float32

    @classmethod
    def build(cls, model, prefix_ids: list[int], device) -> "SharedPrefix | None":
        """Encode the prefix; None when the model's cache cannot be reused across a batch."""
        ids = torch.as_tensor([prefix_ids], dtype=torch.long, device=device)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        if not _plain_cache(getattr(out, "past_key_values", None)):
            return None
        log_probs = out.logits[0].float().log_softmax(dim=-1)
        nll = -log_probs[:-1].gather(1, ids[0, 1:, None])[:, 0]
        return cls(len(prefix_ids), out.past_key_values, nll, log_probs[-1])

    def forward(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool):
        """Per-position NLLs (B, T-1) of the full prompts, and the model outputs over the tokens after the prefix.

        ``input_ids``/``attention_mask`` are the full right-padded rows (they all start with the prefix); in the
        outputs, position j is prompt position ``length + j``.
        """
        batch, p = input_ids.size(0), self.length
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        out = model(
            input_ids=input_ids[:, p:],
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=output_hidden_states,
        )
        suffix = input_ids[:, p:]
        tail = token_nll(out.logits, suffix, torch.ones_like(suffix))  # predicts suffix tokens 1.. from 0..
        first = -self.next_log_probs[suffix[:, 0]]  # the first token after the prefix, predicted by the prefix
        head = self.nll.to(tail.device)[None, :].expand(batch, -1)
        return torch.cat([head, first[:, None].to(tail.device), tail], dim=1), out


def tolerance(dtype: torch.dtype) -> float:
    return CHECK_TOLERANCE.get(dtype, HALF_TOLERANCE)


def agrees(shared: float, full: float, dtype: torch.dtype) -> bool:
    return (
        math.isfinite(shared) and math.isfinite(full) and abs(shared - full) <= tolerance(dtype) * max(1.0, abs(full))
    )
