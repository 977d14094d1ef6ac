"""Paired statistics for AdaptEval cells: how sure is a method's change vs ``base`` on the same rows?

``paired_bootstrap`` resamples row indices with replacement and recomputes the mean of the per-row differences
(method - base) on each resample; the interval is the percentile interval of those means. Rows are paired: the
same resampled rows are used for both lists, so what the two cells share (row difficulty) cancels out.

The generator is seeded (``numpy.random.default_rng(seed)``), so the same scores always give the same interval.
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
