"""The loss curve a training run keeps beside its metrics (loss.png)."""

from __future__ import annotations

import os
from pathlib import Path


def plot_losses(history: dict, path: Path) -> None:
    """Train and validation loss against step, written to a temporary file and renamed over the old one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history["train"]:
        steps, losses = zip(*history["train"], strict=True)
        ax.plot(steps, losses, label="train", linewidth=0.8, alpha=0.8)
    if history["val"]:
        steps, losses = zip(*history["val"], strict=True)
        ax.plot(steps, losses, "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
