"""Test-time objectives other than TLM's own (which lives in ``tlm_plugin.train.loss``): the entropy baselines."""

from tlm_plugin.objectives.entropy import (
    come_entropy,
    come_loss,
    come_opinion,
    conservative_logits,
    eata_loss,
    eata_threshold,
    eata_weights,
    fisher_penalty,
    fisher_penalty_grad,
    mean_entropy,
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
    "eata_threshold",
    "eata_weights",
    "fisher_penalty",
    "fisher_penalty_grad",
    "mean_entropy",
    "tent_loss",
    "token_entropy",
    "uncertainty_lower_bound",
]
