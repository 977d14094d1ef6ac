"""Paired statistics for AdaptEval cells: how sure is a method's change vs ``base`` on the same rows?

``paired_bootstrap`` resamples row indices with replacement and recomputes the mean of the per-row differences
(method - base) on each resample; the interval is the percentile interval of those means. Rows are paired: the
same resampled rows are used for both lists, so what the two cells share (row difficulty) cancels out.

The generator is seeded (``numpy.random.default_rng(seed)``), so the same scores always give the same interval.

``format_interval`` / ``format_percent`` print a change for the tables: never a non-zero bound as 0, and ``*`` only
on an interval whose printed bounds exclude 0.
"""

from collections.abc import Sequence

import numpy as np


DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


def paired_bootstrap(
    base_scores: Sequence[float],
    method_scores: Sequence[float],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> tuple[float, float, float]:
    """(mean difference, low, high): the mean of ``method - base`` over rows and its percentile bootstrap interval.

    ``base_scores[i]`` and ``method_scores[i]`` must be the same row's scores. The interval is
    ``[q((1 - confidence) / 2), q((1 + confidence) / 2)]`` of the resampled means.
    """
    base = np.asarray(base_scores, dtype=np.float64)
    method = np.asarray(method_scores, dtype=np.float64)
    if base.ndim != 1 or method.ndim != 1:
        raise ValueError("paired_bootstrap expects two flat lists of per-row scores")
    if len(base) != len(method):
        raise ValueError(f"paired_bootstrap needs paired rows: {len(base)} base scores vs {len(method)} method scores")
    if len(base) == 0:
        raise ValueError("paired_bootstrap needs at least one row")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if not (np.isfinite(base).all() and np.isfinite(method).all()):
        raise ValueError("paired_bootstrap got a non-finite score")

    diffs = method - base
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(diffs), size=(n_resamples, len(diffs)))
    means = diffs[rows].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(diffs.mean()), float(low), float(high)


# ----------------------------------------------------------------------------------------------------------------
# Printing a change and its interval
# ----------------------------------------------------------------------------------------------------------------

# The most decimals a value is printed with (6 significant digits of a metric or bits per byte near 1): a non-zero
# value smaller than that, such as the rounding noise of a mean of equal differences, prints as 0.
MAX_DECIMALS = 6


def decimals_needed(values: Sequence[float], decimals: int, max_decimals: int = MAX_DECIMALS) -> int:
    """The fewest decimals, at least ``decimals``, at which no non-zero value of ``values`` prints as 0 (at most
    ``max_decimals``; a value that is 0 even there does not ask for more)."""
    places = decimals
    for value in values:
        for more in range(places, max_decimals + 1):
            if value == 0 or float(f"{value:.{more}f}") != 0:
                places = more
                break
    return places


def signed(value: float, decimals: int) -> str:
    """``value`` with its sign (``+0.0000`` for either zero)."""
    return f"{value + 0.0:+.{decimals}f}"


def format_percent(fraction: float, decimals: int = 1) -> str:
    """``+31.1%``; a non-zero change that rounds to 0 at ``decimals`` gets the decimals that show it (``+0.004%``)."""
    percent = fraction * 100
    return signed(percent, decimals_needed([percent], decimals, MAX_DECIMALS - 2)) + "%"


def format_interval(low: float, high: float, decimals: int, diff: float | None = None) -> str:
    """``[+0.0412, +0.1101]*``, or with ``diff`` ``+0.0762 [+0.0412, +0.1101]*``: each number at ``decimals``, or
    at the decimals that keep a non-zero bound from printing as 0 (then all of them, so they line up). ``*`` marks an
    interval whose printed bounds exclude 0 (both above it or both below it)."""
    numbers = [low, high] if diff is None else [diff, low, high]
    places = decimals_needed(numbers, decimals)
    low_text, high_text = signed(low, places), signed(high, places)
    mark = "*" if float(low_text) > 0 or float(high_text) < 0 else ""
    interval = f"[{low_text}, {high_text}]{mark}"
    return interval if diff is None else f"{signed(diff, places)} {interval}"
