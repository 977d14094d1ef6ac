"""Selectors that pick rows of a data pool by their embeddings (SIFT and nearest-neighbour retrieval).

Unlike the perplexity selectors, these do not weight the test prompts: they choose which pool rows to learn from
(repeats allowed) for a set of targets (all test prompts, or one prompt at a time in ``tlm_mode: per_prompt``).
"""

from abc import ABC, abstractmethod

import numpy as np
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

    def search_size(self, rows: int) -> int:
        """How many rows to pre-select from a pool store's index before :meth:`pick` runs on them."""
        return rows

    absolute = True  # pre-select by |cosine| (SIFT's pre-selection) rather than by cosine (retrieval)

    def select(self, target: torch.Tensor, pool) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`pick` over ``pool``: an (n, d) tensor, or a pool store (``len``, ``candidates``, ``vectors``:
        :class:`tlm_plugin.train.pool_store.PoolStore`), whose index pre-selects the rows :meth:`pick` sees."""
        if isinstance(pool, torch.Tensor):
            return self.pick(target, pool)
        size = self.search_size(len(pool))
        rows = pool.candidates(target.numpy(), size, self.absolute) if size < len(pool) else np.arange(len(pool))
        local, variances = self.pick(target, torch.from_numpy(pool.vectors(rows)))
        return torch.from_numpy(rows)[local], variances


class SiftSelector(PoolSelector):
    """SIFT (Hübotter et al., ICLR 2025): greedy minimisation of the targets' posterior variance."""

    def pick(self, target, pool):
        candidates = self.candidates if self.candidates and self.candidates < len(pool) else None
        return sift_select(target, pool, self.budget, lambda_=self.lambda_, candidates=candidates, alpha=self.alpha)

    def search_size(self, rows):
        return min(self.candidates or rows, rows)


class NearestSelector(PoolSelector):
    """Nearest-neighbour retrieval: the top-N pool rows by cosine to the targets, no repeats."""

    absolute = False

    def pick(self, target, pool):
        return nearest_select(target, pool, self.budget, lambda_=self.lambda_)

    def search_size(self, rows):
        return min(self.budget, rows)


class RandomPoolSelector(PoolSelector):
    """``tlm_selector: random`` per prompt: ``budget`` pool rows uniformly at random, no repeats (the control of the
    informed selectors at the same budget). Seeded per prompt by the caller, so resumed and sharded runs agree."""

    def pick(self, target, pool):
        rows = self._rows(len(pool))
        return rows, self._variances(target, pool[rows])

    def select(self, target, pool):
        if isinstance(pool, torch.Tensor):
            return self.pick(target, pool)
        rows = self._rows(len(pool))
        return rows, self._variances(target, torch.from_numpy(pool.vectors(rows.numpy())))

    def _rows(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator)[: min(self.budget, n)]

    def _variances(self, target, picked: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [posterior_variance(target, picked[: n + 1], self.lambda_).sum() for n in range(len(picked))]
        )


# per-prompt pool selection: the registry name -> the pool class (``random`` is TLM's control elsewhere)
PER_PROMPT_POOL = {"sift": SiftSelector, "nearest": NearestSelector, "random": RandomPoolSelector}
