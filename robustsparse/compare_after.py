"""The after-training methods (hydra, lwm, imp) as cells of the comparison grid, and the grid's cost columns.

An after-training cell is a ``posttrain`` pipeline whose pre-trained model is the grid's dense cell (reused, never
retrained; its cost is still counted in the cell's total):

    <grid>/hydra-d<density>/, <grid>/lwm-d<density>/   posttrain folders (ticket/, finetune/, ...)
    <grid>/imp/                                        ONE IMP chain landing on every density of the grid
"""
from __future__ import annotations

import copy
import os

from .config import RunConfig


def is_after_training(method: str) -> bool:
    from .prune.after import AFTER_TRAINING
    import robustsparse.posttrain  # noqa: F401  (registers the pipelines)
    return method in AFTER_TRAINING


def dense_cell_config(cfg: RunConfig, methods: list[str]) -> RunConfig:
    """The dense cell keeps the checkpoint IMP rewinds to (``prune.imp_rewind_epoch`` > 0)."""
    k = cfg.prune.imp_rewind_epoch
    if "imp" not in methods or not k or k in cfg.train.keep_epochs:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.train.keep_epochs = sorted([*cfg.train.keep_epochs, k])
    return cfg


def after_training_cell(cfg: RunConfig, method: str, density: float, densities: list[float], out: str,
                        dense_dir: str, suite: str, progress: bool) -> tuple[str, dict, list[dict]]:
    """Run (or read back) one cell; return (final run folder, its evaluation, its cost stages)."""
    from .posttrain import posttrain
    cell_cfg = copy.deepcopy(cfg)
    cell_cfg.train.probe_every = 0  # dynamics are recorded from initialisation: not meaningful here
    folder = os.path.join(out, "imp" if method == "imp" else f"{method}-d{density:g}")
    result = posttrain(cell_cfg, folder, method=method, density=densities if method == "imp" else density,
                       pretrained=dense_dir, suite=suite, progress=progress)
    outcome = next(o for o in result.outcomes if o.density == density)
    return outcome.run_dir, result.evals[outcome.density], outcome.stages


def _seconds(s: float) -> str:
    return f"{s:.1f}" if s < 10 else f"{s:.0f}"


def group_rounds(stages: list[dict]) -> list[dict]:
    """IMP's rounds as one stage ("IMP rounds 1-11", epochs "11×10" when all rounds train alike)."""
    rounds = [s for s in stages if s["stage"].startswith("IMP round")]
    if len(rounds) < 2:
        return stages
    same = len({s["epochs"] for s in rounds}) == 1
    merged = {"stage": f"IMP rounds 1-{len(rounds)}", "seconds": sum(s["seconds"] for s in rounds),
              "epochs": sum(s["epochs"] for s in rounds),
              "epochs_text": f"{len(rounds)}×{rounds[0]['epochs']}" if same else None}
    return [s for s in stages if s not in rounds] + [merged]


def cost_cells(stages: list[dict]) -> tuple[str, str]:
    """('30+10+10 = 50', '84+41+39 = 164'): epochs and wall seconds per stage and in total."""
    stages = group_rounds(stages)
    shown = [s for s in stages if s["epochs"]]
    total_e, total_s = sum(s["epochs"] for s in shown), sum(s["seconds"] for s in stages)
    e_txt = "+".join(s.get("epochs_text") or str(s["epochs"]) for s in shown)
    e_txt += f" = {total_e}" if len(shown) > 1 or shown and shown[0].get("epochs_text") else ""
    s_txt = "+".join(_seconds(s["seconds"]) for s in stages) + (f" = {total_s:.0f}" if len(stages) > 1 else "")
    return e_txt or "0", s_txt
