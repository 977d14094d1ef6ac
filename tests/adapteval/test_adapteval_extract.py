"""Answer extraction rules of the exact-match datasets, on hand-made outputs."""

import pytest

from adapteval.extract import (
    answers_match,
    boxed_content,
    last_fraction,
    last_number,
    metamath_answer,
    metamath_reference,
    option_letter,
    to_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She pays 5 + 3 = 8 dollars. The answer is 18.", "18"),
        ("Total: 1,000,000 grains", "1000000"),
        ("It costs $1,234.50 in all", "1234.50"),
        ("so 5-3 = 2 apples", "2"),  # a minus glued to a digit is subtraction, not a sign
        ("the change is -7 degrees", "-7"),
        ("1,2,3", "3"),  # not thousands groups: three numbers
        ("no digits at all", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_gsm8k_thousands_separators_removed_on_both_sides():
    # 52 released GSM8K labels look like "100,000"; predictions may or may not use separators.
    assert answers_match(last_number("So they raise 100000 dollars."), last_number("100,000"))
    assert answers_match(last_number("So they raise 100,000 dollars."), last_number("100000"))
    assert answers_match(last_number("The answer is 18.0"), last_number("18"))
    assert not answers_match(last_number("The answer is 180"), last_number("18"))


def test_boxed_content_handles_nested_braces_and_takes_the_last_box():
    assert boxed_content(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert boxed_content(r"\boxed{\{1, 2\}} then \boxed{x^{2}+\sqrt{3}}") == r"x^{2}+\sqrt{3}"
    assert boxed_content(r"answer: \boxed 7$") == "7"
    assert boxed_content(r"cut off \boxed{\frac{1}{2") is None
    assert boxed_content("no box here") is None


def test_last_fraction_forms():
    assert last_fraction(r"we get \frac{3}{4}") == "3/4"
    assert last_fraction(r"we get \dfrac34") == "3/4"
    assert last_fraction(r"first 1/2 then -\frac{5}{6}") == "-5/6"
    assert last_fraction("on 3/4/2020 we had 7") is None  # a date is not a fraction


def test_metamath_prefers_boxed_then_fraction_then_number():
    assert metamath_answer(r"3/4 of them, so \boxed{12}") == "12"
    assert metamath_answer("so 6 of the 8 cups: 6/8 = 3/4") == "3/4"
    assert metamath_answer("there are 4 cats and 12 dogs") == "12"
    assert metamath_answer("") is None
    assert metamath_reference(r"\boxed{5}") == "5"
    assert metamath_reference(" x^2+1 ") == "x^2+1"


@pytest.mark.parametrize(
    ("prediction", "reference", "match"),
    [
        ("18.0", "18", True),
        ("1/2", "0.5", True),
        (r"\frac{1}{2}", "0.5", True),
        (r"-\frac{3}{4}", "-0.75", True),
        (r"18\text{ dollars}", "18", True),
        (r"x^2 + 1", "x^2+1", True),  # non-numeric: compared as normalised strings
        ("2/3", "0.67", False),  # exact values, no tolerance
        (None, "18", False),
    ],
)
def test_answers_match(prediction, reference, match):
    assert answers_match(prediction, reference) is match


def test_to_number_rejects_zero_denominator():
    assert to_number("3/0") is None


@pytest.mark.parametrize(
    ("output", "letter"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(b)", "B"),
        ("The answer is (B)", "B"),
        ("Answer: B. Zhao does not choose to travel by car.", "B"),
        ("The answer is: C", "C"),
        ("Answer:\nD", "D"),
        ("C) Li chose to travel by ship.", "C"),
        ("I would pick option D here.", "D"),
        ("The correct one is (A) because ...", "A"),
        ("A careful reading shows nothing", None),  # the article "A" is not an answer
        ("the answer is a trap", None),  # lower-case letters only count as a bare answer
        ("None of them", None),
        ("", None),
    ],
)
def test_option_letter(output, letter):
    assert option_letter(output) == letter
