"""Plots of runs and grids (training curves, density vs robustness). Every robust number names its attack and budget."""
from __future__ import annotations

import sys

from .atomic import savefig_atomic

_warned = False


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display on servers or in CI), or None where matplotlib
    is not installed (a bare GPU node that reaches no package registry): the plot is skipped with one warning, and
    no number depends on it."""
    global _warned
    try:
        import matplotlib
    except ImportError:
        if not _warned:
            print("warning: matplotlib is not installed: plots are skipped (pip install matplotlib)", file=sys.stderr)
            _warned = True
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict], path: str) -> str | None:
    """Training curves: loss, and train/val clean/robust accuracy per epoch."""
    plt = pyplot()
    if plt is None:
        return None
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


def plot_density_robustness(rows: list[dict], path: str) -> str | None:
    """Robust accuracy (the strongest attack in the suite; clean accuracy when it has none) against density, one
    line per method, dense as a rule."""
    plt = pyplot()
    if plt is None:
        return None
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
