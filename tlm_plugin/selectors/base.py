"""The base classes of the methods (``tlm_selector``, registered in :mod:`tlm_plugin.registry`).

Weighting and pool selectors are built from plain values (numbers, strings), never from the run's settings object;
:func:`tlm_plugin.train.setup.build_selector` maps ``tlm_*`` settings to them. Per-prompt data sources receive a
:class:`PromptContext`. The kinds:

- :class:`Selector` weights prompts by their log-perplexity (TLM's S(x) and its controls);
- :class:`~tlm_plugin.selectors.pool.PoolSelector` picks pool rows by embedding (SIFT, nearest neighbours, random),
  for all prompts or per prompt.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from tlm_plugin.seeding import prompt_seed
from tlm_plugin.train.outputs import PROMPT_RECORDS_FILE


class Selector(ABC):
    """Maps the log-perplexities of a set of prompts to per-prompt loss weights (0 = not selected).

    Offline mode calls :meth:`weights` once with every prompt's score from the unadapted model; online mode calls it
    once per update with the scores of all rows of that update, across ranks, from the current model (so a selector
    may keep running state, saved with :meth:`state_dict` at every chunk checkpoint).
    """

    name: str = ""

    def __init__(
        self, lam: float = 0.10, log_p0: float = 3.0, fraction: float | None = None, streaming: bool = False, seed=0
    ) -> None:
        self.lam, self.log_p0, self.fraction, self.streaming = lam, log_p0, fraction, streaming
        self.generator = torch.Generator().manual_seed(seed)
        self.log_p0_used = log_p0

    @abstractmethod
    def weights(self, log_ppl: torch.Tensor) -> torch.Tensor:
        """(N,) float log-perplexities -> (N,) float32 weights, detached; 0 marks an unselected prompt."""

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state().tolist(), "log_p0_used": self.log_p0_used}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.log_p0_used = state["log_p0_used"]


@dataclass
class PromptContext:
    """What a per-prompt data source may use (never the whole run): its own settings group (only those fields),
    the prompts and LLaMA-Factory's aligned rows behind them, the encoder of new conversations, the model being
    adapted in its starting state (TT-SI's own generator), where it runs, and the run's seed."""

    settings: Any  # the fields of the method's own settings group (TLMArguments.method_settings)
    prompts: Any  # datasets.Dataset: input_ids, loss_mask, index
    aligned: Any  # datasets.Dataset: _prompt, _response, _system, _tools
    encoder: Any  # tlm_plugin.train.data.Encoder
    tokenizer: Any
    model: Any
    device: Any
    dtype: Any
    seed: int

    def prompt_seed(self, index: int) -> int:
        return prompt_seed(self.seed, self.prompts[index]["input_ids"])


class PromptDataSource(ABC):
    """Turns one test prompt into the rows a per-prompt update trains on (``tlm_mode: per_prompt``).

    The per-prompt loop (:mod:`tlm_plugin.modes.per_prompt`) is the same for every source: gate, ``rows(index)``,
    training steps, answer, restore. A source is one more registry entry; it never runs its own loop.
    """

    name: str = ""
    record_file: str = PROMPT_RECORDS_FILE  # the per-prompt records of this source, in dataset order
    measure_data_loss: bool = False  # record the loss on the training rows before / after the steps

    def prepare(self, ctx: PromptContext) -> None:  # noqa: B027  (optional hook)
        """Once per run, on every rank together."""

    def cache_key(self, index: int) -> str | None:
        """Prompts with the same key learn the same thing: the adapter trained for the first is reused, with what
        was measured around its training (None: no sharing). Known before the rows are built."""
        return None

    def fields(self, index: int) -> dict[str, Any]:
        """The record fields of :meth:`rows` without building the rows (a prompt whose task adapter is cached)."""
        return self.rows(index)[1]

    def vote(self, index: int, augments: list[str], answers: list[str]) -> dict[str, Any]:
        """The answer kept among the prompt's ``answers`` (its own first, then one per ``vote_forms`` entry, each
        written under ``augments[i]``): ``winner`` (the text), ``winner_position`` (the answer that wrote it, or
        None), and what the record keeps. By default: the majority of the texts."""
        keys = [" ".join(a.split()) for a in answers]
        position = keys.index(max(keys, key=lambda k: (keys.count(k), -keys.index(k))))
        return {"winner": answers[position], "winner_position": position, "votes": answers}

    def loss_rows(self, index: int, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows whose loss is recorded before and after training (``measure_data_loss``): by default all."""
        return rows

    @abstractmethod
    def rows(self, index: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Training rows for prompt ``index`` (each with ``input_ids`` and ``loss_mask``: the tokens whose NLL
        the update lowers) and the fields this source adds to the prompt's record. The fields may hold
        ``answer_messages``: the messages to answer with instead of the prompt's own (in-context demonstrations), and
        ``vote_forms``: more forms to answer the prompt in (``{"messages", "augment"}`` each), all answered in one
        batched ``generate`` with the prompt's own, the answer kept by :meth:`vote`."""
