"""Batches of unlabeled prompts for scoring and training (right padding, one loss mask per prompt)."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tlm_plugin.train.batching import pad_batch


@dataclass
class TLMDataCollator:
    """Pads prompt features; hands features that carry ``labels`` (generation batches) to LLaMA-Factory's collator.

    Prompt features: ``input_ids``, ``attention_mask``, ``index``, optionally ``loss_mask`` (the tokens that
    count, ``tlm_loss_tokens``; default every prompt token), optionally ``user_mask`` (the user's own tokens, for the
    ``log_ppl_user`` record) and, for training batches, ``tlm_weight`` (offline) or ``chunk`` (the stream).
    Padding is always on the right here, whatever the tokenizer's side (generation batches use the tokenizer's,
    which LLaMA-Factory sets to left), so positions need no adjustment in the forward pass.
    """

    pad_token_id: int
    generation_collator: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "labels" in features[0]:
            return self.generation_collator(features)

        masks = {"loss_mask": [f.get("loss_mask") for f in features]}
        if "user_mask" in features[0]:
            masks["user_mask"] = [f["user_mask"] for f in features]
        batch = pad_batch([f["input_ids"] for f in features], self.pad_token_id, masks)
        batch["index"] = torch.as_tensor([f["index"] for f in features], dtype=torch.long)
        if "chunk" in features[0]:
            batch["chunk"] = torch.as_tensor([f["chunk"] for f in features], dtype=torch.long)
        if "tlm_weight" in features[0]:
            batch["tlm_weight"] = torch.as_tensor([f["tlm_weight"] for f in features], dtype=torch.float32)
        return batch
