"""Offline instruction pack (InstructionBench stand-in): English question -> answer pairs of chatterbot-corpus,
from the files whose answers are informative text (not the bot's small talk).

Conversations other than a single question/answer pair are skipped (trivia.yml holds one malformed 88-item
"conversation" that is a sentence split into characters). ``tech_support.yml`` has 1,050 pairs but only 10 distinct
ones; the shared de-duplication keeps one of each.
"""

import yaml

from adapteval.datasets._base import DatasetSpec, SourcePart, alpaca, text
from adapteval.datasets._packages import package_dir, package_version


VERSION = "1"
FILES = ("trivia", "tech_support", "science", "coding", "literature", "history")
SPEC = DatasetSpec(
    name="chatterbot",
    title="Chatterbot (offline, chatterbot-corpus English)",
    bench="instruction",
    metric="rougeLsum",
    source="chatterbot-corpus==1.3.3: data/english/{" + ",".join(FILES) + "}.yml",
    needs_hub=False,
    packages=("chatterbot_corpus",),
)


def load_parts(n: int, seed: int) -> list:
    root = package_dir("chatterbot_corpus") / "data" / "english"
    parts = []
    for name in FILES:
        with (root / f"{name}.yml").open(encoding="utf-8") as handle:
            conversations = yaml.safe_load(handle).get("conversations") or []
        parts.append(
            SourcePart(
                rows=[{"conversation": conversation} for conversation in conversations],
                source="chatterbot-corpus",
                version=package_version("chatterbot_corpus"),
                file=f"chatterbot_corpus/data/english/{name}.yml",
            )
        )
    return parts


def format_row(example: dict) -> dict | None:
    conversation = example["conversation"]
    if not isinstance(conversation, list) or len(conversation) != 2:
        return None
    question, answer = (text(turn).strip() for turn in conversation)
    return alpaca(question, "", answer)
