"""Figures written as PNG next to the DVC plot data: image grids, the confusion heatmap and
per-class bars."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from imageclf.fileio import atomic_path  # noqa: E402


def _save(figure: plt.Figure, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(figure)


def image_grid(
    images: np.ndarray, captions: list[str], path: Path, title: str, columns: int = 8
) -> None:
    """A grid of uint8 images, each with a caption underneath."""
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(columns * 1.45, rows * 1.7), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    figure.suptitle(title)
    _save(figure, path)


def confusion_heatmap(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    """Counts, with row-normalized percentages (the recall of each true class) as colour."""
    totals = matrix.sum(axis=1, keepdims=True)
    percent = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0) * 100
    labels = np.vectorize(lambda n, p: f"{n}\n{p:.0f}%")(matrix, percent)
    size = max(6.0, 0.75 * len(class_names) + 2)
    figure, ax = plt.subplots(figsize=(size, size * 0.85))
    sns.heatmap(
        percent,
        annot=labels,
        fmt="",
        cmap="Blues",
        vmin=0,
        vmax=100,
        square=True,
        xticklabels=class_names,
        yticklabels=class_names,
        annot_kws={"fontsize": 7},
        cbar_kws={"label": "% of true class"},
        ax=ax,
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"Confusion matrix (test, n={int(matrix.sum())})")
    _save(figure, path)


def per_class_bars(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars of precision, recall and F1 per class (`table` indexed by class name)."""
    figure, ax = plt.subplots(figsize=(max(7.0, 0.7 * len(table) + 2), 4))
    table[["precision", "recall", "f1"]].plot.bar(ax=ax, width=0.8, rot=45)
    ax.set_ylim(0, 1)
    ax.set_xlabel("class")
    ax.set_ylabel("score")
    ax.set_title("Per-class precision, recall and F1 (test)")
    # outside the axes: inside, it hides the bars of some class
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(figure, path)
