"""Selectors: which test prompts (or pool rows) test-time learning uses, behind one registry."""

from tlm_plugin.selectors import perplexity  # noqa: F401  (registers perplexity, all, random)
from tlm_plugin.selectors.base import SELECTORS, Selector, get_selector, register_selector


__all__ = ["SELECTORS", "Selector", "get_selector", "register_selector"]
