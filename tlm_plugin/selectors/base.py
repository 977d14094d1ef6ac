"""The selector interface: which test prompts a TLM update learns from, and with which weight."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch


if TYPE_CHECKING:
    from tlm_plugin.hparams import TLMArguments


class Selector(ABC):
    """Maps the log-perplexities of a set of prompts to per-prompt loss weights (0 = not selected).

    Offline mode calls :meth:`weights` once with every prompt's score from the frozen base model; online mode
    calls it once per training batch with the current model's scores (so a selector may keep running state).
    """

    name: str = ""

    def __init__(self, args: "TLMArguments", seed: int = 0) -> None:
        self.args = args
        self.generator = torch.Generator().manual_seed(seed)

    @abstractmethod
    def weights(self, log_ppl: torch.Tensor) -> torch.Tensor:
        """(N,) float log-perplexities -> (N,) float weights, detached; 0 marks an unselected prompt."""


SELECTORS: dict[str, type[Selector]] = {}


def register_selector(name: str) -> Callable[[type[Selector]], type[Selector]]:
    def wrap(cls: type[Selector]) -> type[Selector]:
        if name in SELECTORS:
            raise ValueError(f"A selector named {name!r} is already registered.")
        cls.name = name
        SELECTORS[name] = cls
        return cls

    return wrap


def get_selector(args: "TLMArguments", seed: int = 0) -> Selector:
    return SELECTORS[args.tlm_selector](args, seed=seed)
