"""Answer extraction for AdaptEval's exact-match datasets (GSM8K, MetaMath, LogiQA) and ARC's grids.

An extractor turns a free-text output (or a reference) into a canonical answer string, or ``None`` when nothing
answer-like is in it. ``answers_match`` compares two canonical answers: as exact rationals when both parse as numbers
("18.0" == "18", "1/2" == "0.5" == "\\frac{1}{2}"), else as normalised strings; a format may compare its own way
(``AnswerFormat.match``: grids, cell for cell).

Rules (tlm.md, "Exact match"):
- GSM8K: the last number in the text, thousands separators removed. Applied to the reference too: 52 of the 5,000
  released GSM8K labels carry a separator ("100,000"), and the reference scorer's failure to strip them made those
  rows unmatchable.
- MetaMath: the content of the last ``\\boxed{...}`` (nested braces allowed), else the last fraction, else the last
  number. The reference is the dataset's final answer ("The answer is: X" -> X), used whole.
- LogiQA: the option letter A-D, from outputs such as "B", "B.", "(B)", "The answer is (B)", "Answer: B. ...".
- Grid (ARC): the first grid of the answer (``tlm_plugin.grids.extract_grid``: the first run of grid lines, text
  around it ignored), the whole reference as a grid (``parse_grid``), both written canonically (cells separated by
  single spaces, one row per line) and compared exactly: same shape, same cells. An answer without a grid matches
  nothing.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from tlm_plugin import grids


# A number not glued to a preceding word or dot: "-12", "3.5", "1,000", "1,234,567.89", ".5".
# Thousands groups must have exactly three digits, so "1,2,3" reads as three numbers, not 123.
_NUMBER = re.compile(r"(?<![\w.])-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
# "3/4" but not a date "3/4/2020" or "1/2.5"
_SLASH_FRACTION = re.compile(r"(?<![\w./])(-?\d+)\s*/\s*(\d+)(?![\d/]|\.\d)")
_LATEX_FRACTION = re.compile(r"(-?)\\[dt]?frac\s*(?:\{\s*(-?\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
_BOXED = re.compile(r"\\(?:boxed|fbox)")
_TEXT_BLOCK = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def last_number(text: str | None) -> str | None:
    """The last number in ``text`` with thousands separators removed ("1,000" -> "1000"), or None."""
    if not text:
        return None
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "")


def boxed_content(text: str | None) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces included."""
    if not text:
        return None
    commands = list(_BOXED.finditer(text))
    if not commands:
        return None
    rest = text[commands[-1].end() :].lstrip()
    if not rest.startswith("{"):
        # "\boxed 5": the argument is the next token
        token = re.match(r"[^\s$]+", rest)
        return token.group(0) if token else None
    depth = 0
    for i, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip()
    return None  # unbalanced braces: the output was cut off inside the box


def last_fraction(text: str | None) -> str | None:
    """The last fraction in ``text`` as "a/b" ("\\frac{3}{4}", "\\dfrac34", "3/4" all give "3/4"), or None."""
    if not text:
        return None
    found: list[tuple[int, str]] = []
    for match in _SLASH_FRACTION.finditer(text):
        found.append((match.start(), f"{match.group(1)}/{match.group(2)}"))
    for match in _LATEX_FRACTION.finditer(text):
        numerator = match.group(2) or match.group(3)
        denominator = match.group(4) or match.group(5)
        sign = "-" if match.group(1) and not numerator.startswith("-") else ""
        found.append((match.start(), f"{sign}{numerator}/{denominator}"))
    if not found:
        return None
    return max(found)[1]


def metamath_answer(text: str | None) -> str | None:
    """MetaMath prediction rule: ``\\boxed{}`` content, else the last fraction, else the last number."""
    for extract in (boxed_content, last_fraction, last_number):
        answer = extract(text)
        if answer:
            return answer
    return None


def metamath_reference(text: str | None) -> str | None:
    """A MetaMath reference is already the final answer; unwrap a ``\\boxed{}`` if one is there."""
    if not text or not text.strip():
        return None
    return boxed_content(text) or text.strip()


_LETTER_RULES = (
    re.compile(r"^\s*\(?([A-Da-d])\)?\s*\.?\s*$"),  # the whole output is a letter: "B", "(b)", "C."
    re.compile(r"^\s*\(?([A-D])(?:[).:]|$)"),  # starts with an option label: "B. Zhao ...", "(C) ..."
    re.compile(r"(?i:answer)\s*(?:(?i:is)\s*)?[:：]?\s*(?:(?i:option)\s*)?\(?([A-D])(?![A-Za-z])"),
    re.compile(r"(?i:option|choice)\s*\(?([A-D])(?![A-Za-z])"),
    re.compile(r"\(([A-D])\)"),
)


def option_letter(text: str | None) -> str | None:
    """The LogiQA option letter (A-D) an output commits to, or None.

    Rules are tried in order and the first match of the first rule that matches wins: a bare letter, a leading
    option label, "answer (is) (:) X", "option/choice X", then a parenthesised letter. Letters must be capitals
    except in a bare answer, so "the answer is a trap" does not read as "A".
    """
    if not text:
        return None
    for rule in _LETTER_RULES:
        match = rule.search(text)
        if match:
            return match.group(1).upper()
    return None


def normalize_answer(answer: str) -> str:
    """Canonical string form: no spaces, no ``$``, no LaTeX sizing/spacing commands, no trailing period."""
    text = answer.strip().strip("$").strip()
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "^\\circ", "^{\\circ}", "\\%", "%", "\\$"):
        text = text.replace(token, "")
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = _TEXT_BLOCK.sub(r"\1", text)
    text = re.sub(r"\s+", "", text)
    return text.rstrip(".")


def to_number(answer: str | None) -> Fraction | None:
    """The exact value of an answer that is a number or a numeric fraction, or None.

    Unit words in ``\\text{}`` are ignored ("18\\text{ dollars}" -> 18), thousands separators are removed.
    """
    if not answer:
        return None
    text = _TEXT_BLOCK.sub("", answer)
    text = normalize_answer(text)
    text = re.sub(r"(?<=\d),(?=\d{3}(?:\D|$))", "", text)
    if _PLAIN_NUMBER.fullmatch(text):
        return Fraction(text)
    fraction = last_fraction(text)
    if fraction is not None and (text == fraction or _LATEX_FRACTION.fullmatch(text)):
        numerator, denominator = fraction.split("/")
        if int(denominator) == 0:
            return None
        return Fraction(int(numerator), int(denominator))
    return None


def answers_match(prediction: str | None, reference: str | None) -> bool:
    """Whether two extracted answers agree: numerically when both are numbers, else as normalised strings."""
    if prediction is None or reference is None:
        return False
    predicted_value, reference_value = to_number(prediction), to_number(reference)
    if predicted_value is not None and reference_value is not None:
        return predicted_value == reference_value
    return normalize_answer(prediction) == normalize_answer(reference)


def grid_answer(text: str | None) -> str | None:
    """The first grid in a model's answer, written canonically, or None."""
    grid = grids.extract_grid(text) if isinstance(text, str) else None
    return None if grid is None else grids.format_grid(grid)


def grid_reference(text: str | None) -> str | None:
    """A reference that is a grid (the whole text), written canonically, or None."""
    grid = grids.parse_grid(text) if isinstance(text, str) else None
    return None if grid is None else grids.format_grid(grid)


def grids_match(prediction: str | None, reference: str | None) -> bool:
    """Two canonical grids agree when their texts are equal (same shape, same cells); None matches nothing."""
    return prediction is not None and reference is not None and prediction == reference


@dataclass(frozen=True)
class AnswerFormat:
    """How one exact-match dataset reads answers: one extractor for model outputs, one for references, and how two
    extracted answers are compared."""

    name: str
    extract_prediction: Callable[[str | None], str | None]
    extract_reference: Callable[[str | None], str | None]
    description: str
    match: Callable[[str | None, str | None], bool] = answers_match


ANSWER_FORMATS: dict[str, AnswerFormat] = {
    fmt.name: fmt
    for fmt in (
        AnswerFormat("gsm8k", last_number, last_number, "last number, thousands separators removed (both sides)"),
        AnswerFormat(
            "metamath", metamath_answer, metamath_reference, "\\boxed{} content, else fraction, else last number"
        ),
        AnswerFormat("logiqa", option_letter, option_letter, "option letter A-D"),
        AnswerFormat("grid", grid_answer, grid_reference, "the first grid of the answer, cell for cell", grids_match),
    )
}
