"""The end-of-run PNG: loss, accuracy and learning-rate curves from metrics.jsonl."""
from __future__ import annotations

import os
from pathlib import Path

from .logs import read_metrics


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} has no records to plot")
    epochs = [r["epoch"] + 1 for r in records]

    def series(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) is not None else float("nan") for r in records]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(epochs, series("train_loss"), "o-", label="train loss")
    ax.plot(epochs, series("val_loss"), "s-", label="val loss")
    ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.set_title("loss"), ax.legend(), ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot(epochs, series("val_top1"), "o-", label="val top-1")
    ax.plot(epochs, series("val_top5"), "s-", label="val top-5")
    if any(r.get("val_top1_ema") is not None for r in records):
        ax.plot(epochs, series("val_top1_ema"), "^-", label="val top-1 (EMA)")
    ax.set_xlabel("epoch"), ax.set_ylabel("accuracy (%)"), ax.set_title("accuracy"), ax.legend(), ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(epochs, series("lr"), "o-", color="tab:green")
    ax.set_xlabel("epoch"), ax.set_ylabel("learning rate (end of epoch)"), ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3)), ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
