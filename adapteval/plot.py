"""The AdaptEval bar chart: one group of bars per dataset, one bar per method (headline metric)."""

from pathlib import Path
from typing import Any


def plot_results(results: dict[str, Any], path: str | Path) -> Path:
    """Draw ``results`` (the results.json document) as a grouped bar chart PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe to call from tests and servers
    import matplotlib.pyplot as plt

    datasets, methods = results["settings"]["datasets"], results["settings"]["methods"]
    score = {(cell["dataset"], cell["method"]): cell["score"] for cell in results["cells"]}
    metric = {cell["dataset"]: cell["metric"] for cell in results["cells"]}
    width = 0.8 / max(len(methods), 1)

    fig, ax = plt.subplots(figsize=(min(14.0, max(4.0, 0.7 * len(datasets) * max(len(methods), 1) * 0.6 + 2)), 4.0))
    for offset, method in enumerate(methods):
        xs = [i + (offset - (len(methods) - 1) / 2) * width for i in range(len(datasets))]
        heights = [score.get((name, method)) or 0.0 for name in datasets]
        ax.bar(xs, heights, width=width, label=method)
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels([f"{name}\n({metric[name]})" for name in datasets], fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(0, max([1e-6, *score.values()]) * 1.15)
    ax.set_title("AdaptEval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path
