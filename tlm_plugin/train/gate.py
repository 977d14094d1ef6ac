"""Is the model unsure about a prompt? The gates of per-prompt learning (``tlm_gate``).

- ``perplexity``: TLM's selection, S(x) > 0, i.e. the prompt's log-perplexity above log P0 (Hu et al., ICML 2025).
- ``margin``: TT-SI's uncertainty estimator (Acikgoz et al., 2025, Algorithm 1): candidate answers a_1..a_N are scored
  by their log-probability given the prompt, l_n = log P(a_n | x) (here: mean per token, so that long and short
  answers compare), p = softmax(l), u = p_(1) - p_(2); the prompt is uncertain when u < tau (paper: 0.95).
  Candidates are the answer options when the row has them (a dataset column, or a multiple-choice prompt whose
  options are lettered A, B, ...), otherwise ``tlm_gate_candidates`` answers sampled from the model, deduplicated.

With ``tlm_gate_fraction`` the threshold is calibrated instead: the given fraction of prompts is flagged (the most
uncertain ones: the lowest margins or the highest log-perplexities), over all prompts offline or running online.
The functions here are pure; the per-prompt loop wires them to the model.
"""

import math
import re
from collections.abc import Sequence


# an option: a capital letter at the start of a line or right after a colon ("Options: A. ..."), then ".", ")" or ":"
_OPTION = re.compile(r"(?:^|(?<=:))[ \t]*\(?([A-Z])[\.\):][ \t]+\S", re.MULTILINE)


def margin(scores: Sequence[float]) -> tuple[float, list[float]]:
    """(u, p): the softmax p of the candidates' scores and u = p_(1) - p_(2) (1.0 for fewer than two candidates)."""
    if len(scores) == 0:
        return 1.0, []
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    probs = [e / total for e in exps]
    if len(probs) < 2:
        return 1.0, probs
    first, second = sorted(probs, reverse=True)[:2]
    return first - second, probs


def uncertain(u: float, tau: float) -> bool:
    """TT-SI's rule: uncertain when the margin is below tau."""
    return u < tau


def option_letters(text: str) -> list[str]:
    """The letters of a multiple-choice prompt's options (``A. ...``, ``(B) ...``, ``C) ...``), A first and in order;
    empty when the prompt has fewer than two such options."""
    letters = []
    for match in _OPTION.finditer(text):
        letter = match.group(1)
        if letter == chr(ord("A") + len(letters)):
            letters.append(letter)
        elif letter == "A":  # a new list starts: keep the last complete one
            letters = ["A"]
    return letters if len(letters) >= 2 else []


def dedupe(texts: Sequence[str]) -> list[str]:
    """Distinct non-empty candidates in first-seen order (compared after stripping and collapsing whitespace)."""
    seen, out = set(), []
    for text in texts:
        key = " ".join(text.split())
        if key and key not in seen:
            seen.add(key)
            out.append(text.strip())
    return out


def flag_fraction(values: Sequence[float], fraction: float, higher_is_unsure: bool) -> list[bool]:
    """Flag floor(fraction * N + 1/2) of the values, the most uncertain first (ties broken by order)."""
    count = math.floor(fraction * len(values) + 0.5)
    order = sorted(range(len(values)), key=lambda i: (-values[i] if higher_is_unsure else values[i], i))
    chosen = set(order[:count])
    return [i in chosen for i in range(len(values))]


class RunningFraction:
    """Online calibration: flag a prompt when it is among the ``fraction`` most uncertain of those seen so far."""

    def __init__(self, fraction: float, higher_is_unsure: bool) -> None:
        self.fraction, self.higher_is_unsure, self.seen = fraction, higher_is_unsure, []

    def __call__(self, value: float) -> bool:
        self.seen.append(value)
        flags = flag_fraction(self.seen, self.fraction, self.higher_is_unsure)
        return flags[-1]
