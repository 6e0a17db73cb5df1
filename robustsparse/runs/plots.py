"""Plots and the markdown report of a run. Every robust number written names its attack and budget."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import savefig_atomic, write_text_atomic  # noqa: E402


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


def write_report(run_dir: str, title: str, config: dict, result, rows: list[dict], extra: str = "") -> str:
    """``report.md`` in the run folder: setup, the evaluator's table, warnings, and the training curves."""
    d, m, a, t = config["data"], config["model"], config["attack"], config["train"]
    lines = [f"# {title}", "",
             f"- data: `{d['name']}`; model: `{m['name']}` {m['options'] or ''}",
             f"- training: `{t['method']}`, {t['epochs']} epochs, batch {t['batch_size']}, lr {t['lr']} "
             f"({t['schedule']}), training attack: {a['steps']}-step {a['norm']} eps={a['eps']:.4g}",
             f"- evaluated on {result.n} images of the `{config['eval']['split']}` split", "",
             "## Robustness (the one evaluator)", "", result.table(), ""]
    if result.autoattack_components:
        lines += ["AutoAttack cascade, accuracy after each component: " + ", ".join(
            f"{k} {v:.2%}" for k, v in result.autoattack_components.items()), ""]
    if result.warnings:
        lines += ["## Sanity flags", ""] + [f"- {w}" for w in result.warnings] + [""]
    else:
        lines += ["Sanity checks (randomness, softmax outputs, zero gradients, black box beating white box, "
                  "PGD beating AutoAttack): nothing flagged.", ""]
    if rows:
        lines += ["## Training curves", "", "![training curves](curves.png)", ""]
    lines += [extra] if extra else []
    path = os.path.join(run_dir, "report.md")
    write_text_atomic(path, "\n".join(lines))
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
