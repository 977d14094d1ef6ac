"""Settings of the demos source (few-shot test-time training, Akyürek et al.): the prompt's own demonstrations."""

import re
from dataclasses import dataclass
from typing import Literal

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
    tlm_demo_cache: bool = setting(
        True,
        "Prompts with the same system prompt, instruction and demonstrations (a task) train once: the adapter is kept in output_dir/tlm_task_adapters/ and reused (cache_hit in tlm_demos.jsonl).",
    )

    def check_group(self) -> None:
        compile_pattern(self.tlm_demo_pattern)


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
