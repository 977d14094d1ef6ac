"""The one way stage tlm pads token sequences into a batch (every pass, training step and generation call)."""

from collections.abc import Sequence

import torch


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    masks: dict[str, Sequence[Sequence[int] | None]] | None = None,
    left: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """``input_ids`` (B, T) padded with ``pad_id``, ``attention_mask`` (B, T), and each of ``masks`` (0 on padding;
    a row whose mask is None counts every token). Right padding, or ``left`` (generation). T: the longest sequence.
    """
    width = max((len(s) for s in sequences), default=0)
    batch = {
        "input_ids": torch.full((len(sequences), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(sequences), width), dtype=torch.long),
    }
    for name in masks or {}:
        batch[name] = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        span = slice(width - n, width) if left else slice(0, n)
        batch["input_ids"][row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        batch["attention_mask"][row, span] = 1
        for name, values in (masks or {}).items():
            mask = values[row]
            batch[name][row, span] = torch.as_tensor(list(mask), dtype=torch.long) if mask is not None else 1
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch
