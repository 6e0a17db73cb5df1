"""``robustsparse study``: the benchmark study of one config in one resumable command and one report (issue 17;
docs/results/fashion_mnist.md is its Fashion-MNIST run). Where the demo tells the story once, the study measures
every claim over seeds:

    <out>/atinit/              compare --seeds: dense PGD-AT and every at-init method × density (clean + PGD)
    <out>/atinit/seed<s>/<cell>/run/autoattack.json
                               the full suite (config's eval.suite: AutoAttack on eval.autoattack_n points) for
                               dense, AWT and the best other at-init method of each density, every seed
    <out>/posttrain/seed<s>/   HYDRA and LWM from that seed's dense run, at the first density
    <out>/ofa/seed<s>/         standard training, SMART (random masks and AWT tickets), OAT, FLOAT, trained once;
                               sweep/ over λ (clean + PGD), and AutoAttack added there at λ = 0 and 1
    <out>/study.md             every table, assembled from what exists (a stage not yet run is named as missing)

Every stage is skipped when done and resumed when killed (each run, search and evaluation has its own state), so
re-running the same command continues the study. ``stages`` picks a subset; the order above is the dependency
order (autoattack and posttrain need atinit's dense runs). The best baseline of a density is chosen on the mean
over seeds of the grid's worst-case (PGD) accuracy, never on a test-set AutoAttack number.
"""
from __future__ import annotations

import copy
import json
import os
import sys

from ..api import eval_stage
from ..config import RunConfig
from ..errors import UserError
from ..eval.evaluator import is_autoattack_item, parse_suite
from ..runs.atomic import write_json_atomic
from ..train.stages import train_stage
from .compare import _cell_name, after_training_cell, run_compare_seeds
from .demo import METHODS, best_baseline
from .study_report import worst_item, write_study_report

STAGES = ("atinit", "autoattack", "posttrain", "ofa")
AFTER_TRAINING_METHODS = ("hydra", "lwm")
# the once-for-all table: name -> overrides of the study's config (standard training is SMART's λ=0 reference)
OFA_RUNS = {"standard": {"train.method": "standard"}, "smart": {"train.method": "smart"},
            "smart-awt": {"train.method": "smart", "ofa.mask_source": "awt"},
            # complementary gives the adversarial ticket the large-|θ₀| half and, on a BN-free net, a dead clean
            # expert; independent gives both experts the same mask (docs/results/fashion_mnist.md): the draft
            "smart-awt-alt": {"train.method": "smart", "ofa.mask_source": "awt", "ofa.overlap": "alternating"},
            "oat": {"train.method": "oat"}, "float": {"train.method": "float"}}


def grid_suite(cfg: RunConfig) -> str:
    """The suite of the grid and the λ sweep: the config's eval.suite without AutoAttack (clean + PGD-20 for
    fmnist_pgdat), run on every point; AutoAttack runs only in the stages that name it."""
    items = [i for i in parse_suite(cfg.eval.suite) if not is_autoattack_item(i)]
    if not items:
        raise UserError(f"study: eval.suite {cfg.eval.suite!r} leaves nothing for the grid once AutoAttack is removed")
    return ",".join(items)


def _say(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


def _seeded(cfg: RunConfig, seed: int, overrides: dict | None = None) -> RunConfig:
    """``cfg`` at ``seed`` (train.seed = prune.seed = seed, as compare --seeds) with dotted ``overrides``."""
    out = copy.deepcopy(cfg)
    out.train.seed = out.prune.seed = seed
    for key, value in (overrides or {}).items():
        section, field = key.split(".")
        setattr(getattr(out, section), field, value)
    return out


def _dense_dir(out: str, seed: int) -> str:
    return os.path.join(out, "atinit", f"seed{seed}", "dense")


def _ticket_run(out: str, seed: int, method: str, density: float) -> str:
    return os.path.join(out, "atinit", f"seed{seed}", _cell_name(method, density), "run")


def _seed_rows(out: str) -> list[dict]:
    path = os.path.join(out, "atinit", "results.json")
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: run the study's atinit stage first")
    with open(path) as fh:
        return json.load(fh)["rows"]


def autoattack_targets(rows: list[dict], densities: list[float]) -> list[tuple[str, float]]:
    """(method, density) of every model the full suite runs on: dense, then AWT and the best other at-init method
    of each density, judged on the seed-mean worst-case accuracy of the grid."""
    targets = [("dense", 1.0)]
    for density in densities:
        at_density = [r for r in rows if r["density"] == density]
        if any(r["method"] == "awt" for r in at_density):
            targets.append(("awt", density))
        best = best_baseline(at_density, score=lambda r: r["accuracy"][worst_item(r)])
        if best is not None:
            targets.append((best["method"], density))
    return targets


def _autoattack_stage(cfg: RunConfig, out: str, seeds: list[int], densities: list[float], progress: bool) -> None:
    targets = autoattack_targets(_seed_rows(out), densities)
    _say(f"autoattack: {cfg.eval.suite} for " + ", ".join(f"{m} d={d:g}" for m, d in targets))
    for seed in seeds:  # seed by seed, so a short session finishes whole seeds
        for method, density in targets:
            run = _dense_dir(out, seed) if method == "dense" else _ticket_run(out, seed, method, density)
            eval_stage(run, cfg.eval.suite, name="autoattack", progress=progress)


def _posttrain_stage(cfg: RunConfig, out: str, seeds: list[int], density: float, epochs: int | None,
                     progress: bool) -> None:
    budget = {} if epochs is None else {"prune.hydra_epochs": epochs, "prune.finetune_epochs": epochs}
    for seed in seeds:
        folder = os.path.join(out, "posttrain", f"seed{seed}")
        for method in AFTER_TRAINING_METHODS:
            _say(f"posttrain: {method} at density {density:g}, seed {seed}, from {_dense_dir(out, seed)}")
            run_dir, ev, stages = after_training_cell(_seeded(cfg, seed, budget), method, density, [density], folder,
                                                      _dense_dir(out, seed), grid_suite(cfg), progress)
            write_json_atomic(os.path.join(folder, f"{_cell_name(method, density)}.json"),
                              {"method": method, "density": density, "seed": seed, "run": run_dir,
                               "accuracy": ev["accuracy"], "attacks": ev["attacks"], "points": ev.get("points"),
                               "cost": {"stages": stages, "seconds": sum(s["seconds"] for s in stages)}})


def _ofa_stage(cfg: RunConfig, out: str, seeds: list[int], lams: str, progress: bool) -> None:
    from .sweep import sweep
    for seed in seeds:
        folder = os.path.join(out, "ofa", f"seed{seed}")
        runs = []
        for name, overrides in OFA_RUNS.items():
            _say(f"ofa: {name}, seed {seed}")
            run = os.path.join(folder, name)
            train_stage(_seeded(cfg, seed, overrides), run, progress)
            runs.append(run)
        runs.append(_dense_dir(out, seed))
        _say(f"ofa: sweep over λ {lams}, seed {seed}")
        sweep(runs, lams, suite=grid_suite(cfg), out=os.path.join(folder, "sweep"), progress=progress)
        _say(f"ofa: {cfg.eval.suite} at λ = 0 and 1, seed {seed}")
        sweep(runs, "0,1", suite=cfg.eval.suite, out=os.path.join(folder, "sweep"), progress=progress)  # adds AutoAttack


def run_study(cfg: RunConfig, out: str, seeds: list[int], methods=METHODS, densities=(0.1, 0.05),
              stages=STAGES, lams: str = "0:1:0.1", progress: bool = True, config_name: str = "",
              posttrain_epochs: int | None = None) -> str:
    """Run (or continue) the study of ``cfg`` in ``out``; returns the path of study.md. ``posttrain_epochs``
    sets HYDRA's score epochs and HYDRA/LWM's fine-tune epochs (default: the config's). The config itself is the
    same for every stage (the grid binds its folder to it), so the budget of the after-training stage is a study
    option, not a config override."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not seeds or not densities:
        raise UserError(f"study: stages must be among {', '.join(STAGES)} (got {', '.join(unknown) or 'none'}), "
                        "with at least one seed and one density")
    methods, densities, seeds = list(methods), list(densities), list(seeds)
    if "atinit" in stages:
        _say(f"atinit: dense + {', '.join(methods)} at densities {', '.join(f'{d:g}' for d in densities)}, "
             f"seeds {', '.join(map(str, seeds))}")
        run_compare_seeds(cfg, methods, densities, os.path.join(out, "atinit"), seeds, suite=grid_suite(cfg),
                          progress=progress)
    if "autoattack" in stages:
        _autoattack_stage(cfg, out, seeds, densities, progress)
    if "posttrain" in stages:
        _posttrain_stage(cfg, out, seeds, densities[0], posttrain_epochs, progress)
    if "ofa" in stages:
        _ofa_stage(cfg, out, seeds, lams, progress)
    return write_study_report(cfg, out, seeds, densities, config_name)
