"""The methods of stage tlm (``tlm_selector``): which prompts or pool rows learning uses, or what data a prompt
learns from; registered in :mod:`tlm_plugin.registry`."""

from tlm_plugin.selectors.base import PromptContext, PromptDataSource, Selector
from tlm_plugin.selectors.pool import PoolSelector, RandomPoolSelector
from tlm_plugin.selectors.sift import nearest_select, posterior_variance, sift_select


__all__ = [
    "PoolSelector",
    "PromptContext",
    "PromptDataSource",
    "RandomPoolSelector",
    "Selector",
    "nearest_select",
    "posterior_variance",
    "sift_select",
]
