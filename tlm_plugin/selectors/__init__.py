"""Selectors: which test prompts (or pool rows) test-time learning uses, behind one registry."""

from tlm_plugin.selectors import perplexity, pool  # noqa: F401  (register perplexity, all, random, sift, nearest)
from tlm_plugin.selectors.base import SELECTORS, Selector, get_selector, register_selector
from tlm_plugin.selectors.pool import PoolSelector
from tlm_plugin.selectors.sift import nearest_select, posterior_variance, sift_select


__all__ = [
    "SELECTORS",
    "PoolSelector",
    "Selector",
    "get_selector",
    "nearest_select",
    "posterior_variance",
    "register_selector",
    "sift_select",
]
