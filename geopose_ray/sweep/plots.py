"""Learning-curve plots for MLflow artifacts (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def curves_plot(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    out: str | Path,
    rungs: Sequence[int] = (),
    highlight: Sequence[str] = (),
    title: str = "",
) -> Path:
    """Plot validation score against epoch for each trial; rungs as vertical lines, ``highlight`` (the
    finalists) drawn bold. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for trial, points in sorted(curves.items()):
        if not points:
            continue
        epochs, scores = zip(*sorted(points), strict=True)
        bold = trial in highlight
        ax.plot(epochs, scores, lw=2.2 if bold else 0.9, alpha=1.0 if bold else 0.6, label=trial if bold else None)
    for r in rungs:
        ax.axvline(r, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation score")
    ax.set_title(title)
    if highlight:
        ax.legend(title="finalists", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
