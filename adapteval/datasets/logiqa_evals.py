"""Offline LogiQA pack (ReasoningBench stand-in): the LogiQA set shipped in OpenAI Evals, re-rendered in the
AdaptEval LogiQA 2.0 prompt; the reference is the option letter.

The evals file holds 1,354 lines but only 677 distinct questions (the second half repeats the first); the shared
de-duplication keeps the first copy. Its options read "A. A.Zhao chose ..."; the inner label is removed.
"""

import re

from adapteval.datasets._base import DatasetSpec, alpaca, text
from adapteval.datasets._packages import evals_ideal, evals_part
from adapteval.datasets._prompts import OPTION_LETTERS, logiqa_prompt


VERSION = "1"
FILES = ("logiqa/logiqa.jsonl",)
SPEC = DatasetSpec(
    name="logiqa_evals",
    title="LogiQA (offline, from evals)",
    bench="reasoning",
    metric="em",
    answer_format="logiqa",
    source="evals==3.0.1.post1: " + ", ".join(FILES),
    needs_hub=False,
    packages=("evals",),
)

# "\nPassage: <text>Question: <question>\nA. A.<option>\nB. B.<option>\nC. ...\nD. ...\nAnswer:"
_USER_TURN = re.compile(
    r"^\s*Passage:\s*(?P<passage>.*?)\s*Question:\s*(?P<question>.*?)\s*"
    r"\nA\.\s(?P<A>.*?)\nB\.\s(?P<B>.*?)\nC\.\s(?P<C>.*?)\nD\.\s(?P<D>.*?)\nAnswer:\s*$",
    re.DOTALL,
)


def load_parts(n: int, seed: int) -> list:
    return [evals_part(path) for path in FILES]


def format_row(example: dict) -> dict | None:
    user = "\n".join(text(m["content"]) for m in example["input"] if m["role"] == "user")
    match = _USER_TURN.match(user)
    answer = evals_ideal(example)[0].upper()
    if match is None or answer not in OPTION_LETTERS:
        return None
    options = [re.sub(rf"^{letter}\.\s*", "", match.group(letter).strip()) for letter in OPTION_LETTERS]
    return alpaca(logiqa_prompt(match.group("passage"), match.group("question"), options), "", answer)
