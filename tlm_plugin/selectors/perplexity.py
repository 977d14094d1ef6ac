"""TLM's perplexity-based selection (Hu et al., ICML 2025, Eq. 6) and the two controls of its ablation."""

import torch

from tlm_plugin.selectors.base import Selector, register_selector
from tlm_plugin.train.loss import selection_score


def quantile_threshold(log_ppl: torch.Tensor, fraction: float) -> float:
    """The log P0 that selects round(fraction * N) of these prompts under the strict rule log P(x) > log P0."""
    ordered = torch.sort(log_ppl.detach().double().flatten(), descending=True).values
    keep = round(fraction * len(ordered))
    if keep >= len(ordered):
        return float(ordered[-1]) - 1e-6
    return float(ordered[keep]) if keep > 0 else float(ordered[0])


@register_selector("perplexity")
class PerplexitySelector(Selector):
    """S(x) = lambda * exp(log P(x) - log P0) if log P(x) > log P0, else 0.

    With ``tlm_select_fraction``, log P0 is calibrated instead of fixed: offline, the quantile of all scored
    prompts; online, the quantile of every prompt seen so far (a running threshold). ``log_p0_used`` records it.
    """

    def __init__(self, args, seed: int = 0) -> None:
        super().__init__(args, seed)
        self.seen: list[torch.Tensor] = []
        self.log_p0_used = args.tlm_log_p0

    def weights(self, log_ppl: torch.Tensor) -> torch.Tensor:
        fraction = self.args.tlm_select_fraction
        if fraction is not None:
            if self.args.tlm_mode == "online":
                self.seen.append(log_ppl.detach().flatten().cpu())
                self.log_p0_used = quantile_threshold(torch.cat(self.seen), fraction)
            else:
                self.log_p0_used = quantile_threshold(log_ppl, fraction)
        return selection_score(log_ppl, self.args.tlm_lambda, self.log_p0_used)


@register_selector("all")
class AllSelector(Selector):
    """Every prompt with weight 1: plain input-perplexity minimisation (the ablation's first control)."""

    def weights(self, log_ppl: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(log_ppl, dtype=torch.float32)


@register_selector("random")
class RandomSelector(Selector):
    """As many prompts as ``perplexity`` would pick, chosen uniformly at random, weight 1.

    Offline (one call over all prompts) the count matches exactly. Online the selector sees one batch at a time,
    so each prompt is kept with the running fraction that the perplexity rule has selected so far.
    """

    def __init__(self, args, seed: int = 0) -> None:
        super().__init__(args, seed)
        self.seen = 0
        self.would_select = 0

    def weights(self, log_ppl: torch.Tensor) -> torch.Tensor:
        rule = log_ppl > self.args.tlm_log_p0
        out = torch.zeros_like(log_ppl, dtype=torch.float32)
        if self.args.tlm_mode == "offline":
            count = int(rule.sum())
            picks = torch.randperm(len(log_ppl), generator=self.generator)[:count]
            out[picks] = 1.0
            return out
        self.seen += len(log_ppl)
        self.would_select += int(rule.sum())
        rate = self.would_select / self.seen
        draws = torch.rand(len(log_ppl), generator=self.generator)
        out[draws < rate] = 1.0
        return out
