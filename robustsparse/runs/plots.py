"""Plots of runs and grids (training curves, density vs robustness). Every robust number names its attack and budget."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import savefig_atomic  # noqa: E402


def plot_curves(rows: list[dict], path: str) -> str:
    """Training curves: loss, and train/val clean/robust accuracy per epoch."""
    epochs = [r["epoch"] + 1 for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker=".", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    val_attack = next((r["val_attack"] for r in rows if "val_attack" in r), "PGD")
    series = [("train_clean_acc", "train clean"), ("train_adv_acc", "train adversarial (training attack)"),
              ("val_clean_acc", "val clean"), ("val_robust_acc", f"val robust: {val_attack}")]
    for key, label in series:
        pts = [(r["epoch"] + 1, r[key]) for r in rows if key in r]
        if pts:
            ax_acc.plot(*zip(*pts), marker=".", label=label)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_density_robustness(rows: list[dict], path: str) -> str:
    """Robust accuracy (the strongest attack in the suite; clean accuracy when it has none) against density, one
    line per method, dense as a rule."""
    items = [i for i in rows[0]["accuracy"] if i != "clean"]
    if items:
        key = "autoattack" if "autoattack" in items else items[-1]
    else:  # a suite without attacks (--suite clean): plot what there is, and say so
        key = "clean"
    label = rows[0]["attacks"].get(key, "clean (no attack)")
    points = rows[0].get("points", {}).get(key)  # the points the attack ran on, as every table names them
    if points is not None:
        label += f", {points:,} points"
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        cells = [r for r in rows if r["method"] == method]
        pts = sorted((r["density"], r["accuracy"][key]) for r in cells)
        after = cells[0].get("family") == "after training"  # pruned after dense training: dotted, squares
        ax.plot(*zip(*pts), marker="s" if after else "o", linestyle=":" if after else "-",
                label=f"{method} (after training)" if after else method)
    for r in rows:
        if r["method"] == "dense":
            ax.axhline(r["accuracy"][key], color="black", linestyle="--", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("density (kept fraction of conv/linear weights)")
    ax.set_ylabel("robust accuracy" if items else "clean accuracy (no attack in the suite)")
    ax.set_title(label, fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path
