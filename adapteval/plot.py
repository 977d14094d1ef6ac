"""The AdaptEval chart: per dataset, one bar per method for the headline metric and, when the cells measured them,
the change of the reference answers' bits per byte vs the unadapted model (lower is better)."""

from pathlib import Path
from typing import Any


def _bars(ax, datasets: list[str], methods: list[str], value: dict) -> None:
    width = 0.8 / max(len(methods), 1)
    for offset, method in enumerate(methods):
        xs = [i + (offset - (len(methods) - 1) / 2) * width for i in range(len(datasets))]
        ax.bar(xs, [value.get((name, method)) or 0.0 for name in datasets], width=width, label=method)
    ax.set_xticks(range(len(datasets)))


def plot_results(results: dict[str, Any], path: str | Path) -> Path:
    """Draw ``results`` (the results.json document) as a grouped bar chart PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe to call from tests and servers
    import matplotlib.pyplot as plt

    datasets, methods = results["settings"]["datasets"], results["settings"]["methods"]
    cells = results["cells"]
    score = {(c["dataset"], c["method"]): c["score"] for c in cells}
    metric = {c["dataset"]: c["metric"] for c in cells}
    bpb = {
        (c["dataset"], c["method"]): 100 * c["bpb_relative_change"]
        for c in cells
        if c.get("bpb_relative_change") is not None
    }
    panels = 2 if bpb else 1
    width = min(14.0, max(4.0, 0.42 * len(datasets) * max(len(methods), 1) + 2))
    fig, axes = plt.subplots(1, panels, figsize=(width if panels == 1 else min(14.0, 2 * width), 4.0), squeeze=False)
    ax = axes[0][0]
    _bars(ax, datasets, methods, score)
    ax.set_xticklabels([f"{name}\n({metric[name]})" for name in datasets], fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(0, max([1e-6, *(v for v in score.values() if v is not None)]) * 1.15)
    ax.set_title("AdaptEval: headline metric")
    ax.legend(fontsize=8)
    if bpb:
        ax = axes[0][1]
        adapted = [m for m in methods if any((d, m) in bpb for d in datasets)]
        _bars(ax, datasets, adapted, bpb)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticklabels(datasets, fontsize=8)
        ax.set_ylabel("change vs unadapted, %")
        ax.set_title("reference answers, bits per byte (lower is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path
