"""Selectors: which test prompts (or pool rows) test-time learning uses, behind one registry."""

from tlm_plugin.selectors import demos, generate, perplexity, pool  # noqa: F401  (register every selector)
from tlm_plugin.selectors.base import SELECTORS, Selector, register_selector
from tlm_plugin.selectors.pool import PER_PROMPT_POOL, PoolSelector, RandomPoolSelector
from tlm_plugin.selectors.sift import nearest_select, posterior_variance, sift_select


__all__ = [
    "PER_PROMPT_POOL",
    "SELECTORS",
    "PoolSelector",
    "RandomPoolSelector",
    "Selector",
    "nearest_select",
    "posterior_variance",
    "register_selector",
    "sift_select",
]
