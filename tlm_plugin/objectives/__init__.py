"""Test-time objectives other than TLM's own (which lives in ``tlm_plugin.train.loss``): the entropy baselines."""

from tlm_plugin.objectives.entropy import (
    come_entropy,
    come_loss,
    come_opinion,
    conservative_logits,
    eata_loss,
    eata_redundancy_mask,
    eata_threshold,
    eata_weights,
    estimate_fisher_diagonal,
    fisher_penalty,
    mean_entropy,
    mean_probs,
    tent_loss,
    token_entropy,
    uncertainty_lower_bound,
)


__all__ = [
    "come_entropy",
    "come_loss",
    "come_opinion",
    "conservative_logits",
    "eata_loss",
    "eata_redundancy_mask",
    "eata_threshold",
    "eata_weights",
    "estimate_fisher_diagonal",
    "fisher_penalty",
    "mean_entropy",
    "mean_probs",
    "tent_loss",
    "token_entropy",
    "uncertainty_lower_bound",
]
