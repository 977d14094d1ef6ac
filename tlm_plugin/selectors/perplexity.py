"""TLM's perplexity-based selection (Hu et al., ICML 2025, Eq. 6) and the two controls of its ablation."""

from typing import Any

import torch

from tlm_plugin.selectors.base import Selector
from tlm_plugin.train.loss import selection_score


def quantile_threshold(log_ppl: torch.Tensor, fraction: float) -> float:
    """The log P0 that selects round(fraction * N) of these prompts under the strict rule log P(x) > log P0."""
    ordered = torch.sort(log_ppl.detach().double().flatten(), descending=True).values
    keep = round(fraction * len(ordered))
    if keep >= len(ordered):
        return float(ordered[-1]) - 1e-6
    return float(ordered[keep]) if keep > 0 else float(ordered[0])


class PerplexitySelector(Selector):
    """S(x) = lambda * exp(log P(x) - log P0) if log P(x) > log P0, else 0.

    With ``fraction``, log P0 is calibrated instead of fixed: offline, the quantile of all scored prompts; streaming,
    the quantile of every prompt seen so far (a running threshold). ``log_p0_used`` records it.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[float] = []

    def threshold(self, log_ppl: torch.Tensor) -> float:
        if self.fraction is not None:
            if self.streaming:
                self.seen.extend(float(x) for x in log_ppl.detach().flatten())
                self.log_p0_used = quantile_threshold(torch.tensor(self.seen), self.fraction)
            else:
                self.log_p0_used = quantile_threshold(log_ppl, self.fraction)
        return self.log_p0_used

    def weights(self, log_ppl: torch.Tensor) -> torch.Tensor:
        return selection_score(log_ppl, self.lam, self.threshold(log_ppl))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seen = list(state["seen"])


class AllSelector(Selector):
    """Every prompt with weight 1: plain input-perplexity minimisation (the ablation's first control)."""

    def weights(self, log_ppl: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(log_ppl, dtype=torch.float32)


class RandomSelector(PerplexitySelector):
    """As many prompts as ``perplexity`` would pick (with the same P0 or ``fraction``), uniformly at random, weight 1.

    Offline (one call over all prompts) the count matches exactly. Streaming, the selector sees one update at a
    time, so each prompt is kept with the running fraction that the perplexity rule has selected so far.
    (In ``tlm_mode: per_prompt`` the registry maps ``random`` to random pool rows: ``selectors.pool``.)
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.n_seen = 0
        self.n_would_select = 0

    def weights(self, log_ppl: torch.Tensor) -> torch.Tensor:
        rule = log_ppl > self.threshold(log_ppl)
        out = torch.zeros_like(log_ppl, dtype=torch.float32)
        if not self.streaming:
            picks = torch.randperm(len(log_ppl), generator=self.generator)[: int(rule.sum())]
            out[picks] = 1.0
            return out
        self.n_seen += len(log_ppl)
        self.n_would_select += int(rule.sum())
        draws = torch.rand(len(log_ppl), generator=self.generator)
        out[draws < self.n_would_select / self.n_seen] = 1.0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "n_seen": self.n_seen, "n_would_select": self.n_would_select}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.n_seen, self.n_would_select = state["n_seen"], state["n_would_select"]
