"""Settings of the demos source (few-shot test-time training, Akyürek et al.): the prompt's own demonstrations."""

import re
from dataclasses import dataclass
from typing import Literal

from tlm_plugin.augment import resolve
from tlm_plugin.errors import TLMConfigError
from tlm_plugin.settings.base import SettingsGroup, setting


@dataclass
class DemoArguments(SettingsGroup):
    purpose = "tlm_selector: demos"

    tlm_demo_pattern: str = setting(
        "(?ms)^Q:[ \\t]*(?P<input>.+?)\\s*^A:[ \\t]*(?P<output>\\S.*?)\\s*(?=^Q:|\\Z)",
        "tlm_selector: demos, single-turn prompts: a regular expression whose named groups input and output find the demonstrations (default: 'Q: ... / A: ...' blocks, each at a line start; the final question without an answer is the query). Multi-turn prompts take their history instead.",
    )
    tlm_demo_orders: int = setting(
        40,
        "tlm_selector: demos: training sequences per prompt, each in a fresh seeded order (BBH: 40).",
        low=1,
    )
    tlm_demo_format: Literal["all", "loo"] = setting(
        "all",
        "all: each sequence holds every demonstration, the loss on every answer (the paper's choice). loo: leave one out, the other demonstrations as context, the loss on the held-out answer only.",
    )
    tlm_demo_votes: int = setting(
        1,
        "Answer each prompt this many times, its demonstrations in seeded orders (the first as given), and keep the majority answer (exact text; AdaptEval votes on extracted answers).",
        low=1,
    )
    tlm_demo_augment: str | None = setting(
        None,
        "Invertible augmentations of the demonstrations, comma-separated: every training order is written once as given and once under each (rot90, rot180, rot270, flip_h, flip_v, transpose, transpose_anti; dihedral for all seven; colors: a colour permutation keeping 0, seeded by the task; a+b composes; module.path:forward:inverse for your own pair of functions (text, seed) -> text or None). Grid augmentations apply to ARC-style text grids; one that does not apply to a prompt is left out for it and counted.",
    )
    tlm_demo_max_sequences: int = setting(
        250,
        "tlm_selector: demos: at most this many training sequences per prompt (orders x augmentations, order by order; ARC: 250).",
        low=1,
    )
    tlm_demo_vote_augment: bool = setting(
        False,
        "Augmented inference: answer the prompt under each tlm_demo_augment augmentation too (and in tlm_demo_votes orders), map every answer back with the inverse, and take the hierarchical vote (within each augmentation, then across); top2 in tlm_demos.jsonl is ARC's second attempt.",
    )
    tlm_demo_cache: bool = setting(
        True,
        "Prompts with the same training data (a task: the same system prompt, instruction and demonstrations, so the same orders and augmentations) train once: the adapter is kept in output_dir/tlm_task_adapters/ with the losses measured around its training, and reused (cache_hit in tlm_demos.jsonl).",
    )

    def check_group(self) -> None:
        compile_pattern(self.tlm_demo_pattern)
        augments = resolve(self.tlm_demo_augment)  # imports a user's own augmentation module, if one is named
        if self.tlm_demo_vote_augment and not augments:
            raise TLMConfigError("tlm_demo_vote_augment: true needs augmentations to vote over (tlm_demo_augment).")


def compile_pattern(pattern: str) -> re.Pattern:
    """``tlm_demo_pattern`` compiled; a TLMConfigError naming the problem (no groups input/output, bad syntax)."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise TLMConfigError(f"tlm_demo_pattern {pattern!r} is not a valid regular expression: {err}") from None
    missing = {"input", "output"} - set(compiled.groupindex)
    if missing:
        raise TLMConfigError(f"tlm_demo_pattern {pattern!r} needs the named groups (?P<input>...) and (?P<output>...)")
    return compiled
