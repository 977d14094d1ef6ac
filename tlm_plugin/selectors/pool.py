"""Selectors that pick rows of a data pool by their embeddings (SIFT and nearest-neighbour retrieval).

Unlike the perplexity selectors, these do not weight the test prompts: they choose which pool rows to learn
from (repeats allowed) for a set of targets (all test prompts, or one prompt at a time with ``tlm_reset: prompt``).
"""

from abc import abstractmethod

import torch

from tlm_plugin.selectors.base import Selector, register_selector
from tlm_plugin.selectors.sift import nearest_select, sift_select


class PoolSelector(Selector):
    """Chooses pool rows for target embeddings: ``pick(target (m, d), pool (n, d)) -> (indices, variances)``."""

    def weights(self, log_ppl: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"The {self.name!r} selector picks pool rows by embedding; it does not weight prompts.")

    @abstractmethod
    def pick(self, target: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool row indices in pick order (repeats allowed) and the targets' total variance after each pick."""


@register_selector("sift")
class SiftSelector(PoolSelector):
    """SIFT (Hübotter et al., ICLR 2025): greedy minimisation of the targets' posterior variance."""

    def pick(self, target, pool):
        args = self.args
        candidates = (
            args.tlm_sift_candidates if args.tlm_sift_candidates and args.tlm_sift_candidates < len(pool) else None
        )
        return sift_select(
            target,
            pool,
            args.tlm_sift_budget,
            lambda_=args.tlm_sift_lambda,
            candidates=candidates,
            alpha=args.tlm_sift_alpha,
        )


@register_selector("nearest")
class NearestSelector(PoolSelector):
    """Nearest-neighbour retrieval: the top-N pool rows by cosine to the targets, no repeats."""

    def pick(self, target, pool):
        return nearest_select(target, pool, self.args.tlm_sift_budget, lambda_=self.args.tlm_sift_lambda)
