"""Selectors that pick rows of a data pool by their embeddings (SIFT and nearest-neighbour retrieval).

Unlike the perplexity selectors, these do not weight the test prompts: they choose which pool rows to learn from
(repeats allowed) for a set of targets (all test prompts, or one prompt at a time in ``tlm_mode: per_prompt``).
"""

from abc import ABC, abstractmethod

import torch

from tlm_plugin.selectors.sift import nearest_select, posterior_variance, sift_select


class PoolSelector(ABC):
    """Chooses pool rows for target embeddings: ``pick(target (m, d), pool (n, d)) -> (indices, variances)``."""

    name: str = ""

    def __init__(
        self,
        budget: int = 50,
        lambda_: float = 0.01,
        alpha: float | None = None,
        candidates: int | None = None,
        seed=0,
    ) -> None:
        self.budget, self.lambda_, self.alpha, self.candidates = budget, lambda_, alpha, candidates
        self.generator = torch.Generator().manual_seed(seed)

    @abstractmethod
    def pick(self, target: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool row indices in pick order (repeats allowed) and the targets' total variance after each pick."""


class SiftSelector(PoolSelector):
    """SIFT (Hübotter et al., ICLR 2025): greedy minimisation of the targets' posterior variance."""

    def pick(self, target, pool):
        candidates = self.candidates if self.candidates and self.candidates < len(pool) else None
        return sift_select(target, pool, self.budget, lambda_=self.lambda_, candidates=candidates, alpha=self.alpha)


class NearestSelector(PoolSelector):
    """Nearest-neighbour retrieval: the top-N pool rows by cosine to the targets, no repeats."""

    def pick(self, target, pool):
        return nearest_select(target, pool, self.budget, lambda_=self.lambda_)


class RandomPoolSelector(PoolSelector):
    """``tlm_selector: random`` per prompt: ``budget`` pool rows uniformly at random, no repeats (the control of the
    informed selectors at the same budget). Seeded per prompt by the caller, so resumed and sharded runs agree."""

    def pick(self, target, pool):
        rows = torch.randperm(len(pool), generator=self.generator)[: min(self.budget, len(pool))]
        variances = torch.stack(
            [posterior_variance(target, pool[rows[: n + 1]], self.lambda_).sum() for n in range(len(rows))]
        )
        return rows, variances


# per-prompt pool selection: the registry name -> the pool class (``random`` is TLM's control elsewhere)
PER_PROMPT_POOL = {"sift": SiftSelector, "nearest": NearestSelector, "random": RandomPoolSelector}
