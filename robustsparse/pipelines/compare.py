"""The comparison grid: dense PGD-AT and every at-init method × density, each ticket trained the same way and
evaluated by the one evaluator, in one table and one density–robustness plot.

    <out>/dense/                      dense run (train + eval.json)
    <out>/<method>-d<density>/ticket/ the ticket (robustsparse prune output)
    <out>/<method>-d<density>/run/    its training run and eval.json
    <out>/hydra-d<density>/, lwm-d<density>/, imp/   after-training methods: posttrain folders whose pre-trained
                                      model is <out>/dense (after_training_cell below); imp is one chain for all densities
    <out>/results.json, results.md, density_robustness.png

Each cell is skipped when its eval.json exists and resumed when its run was interrupted, so a killed grid is
continued by running the same command again. The NTK distance columns are ‖Θ_ticket − Θ_dense‖_F / ‖Θ_dense‖_F at
initialisation on a fixed probe set of PGD points of the dense θ₀ (the quantity AWT minimises), twice: with the
batch-norm running statistics of initialisation, (0, 1), under which BN is the identity (the search's default
``prune.bn_stats=init``), and with each network's BN statistics on the first ``prune.bn_samples`` training images,
the normalised network that training's batch-statistics BN sees (``prune.bn_stats=batch``). With
``--dynamics`` every run also records the NTK and outputs on that probe each epoch, and dynamics.png overlays each
ticket's distance to dense over training (analysis/dynamics.py).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys

import torch
import yaml

from ..analysis.dynamics import make_probe, plot_dynamics
from ..analysis.ntk import empirical_ntk, ntk_distance
from ..api import eval_stage, load, load_meta
from ..config import RunConfig, config_from_dict
from ..data import load_split
from ..errors import UserError
from ..eval.evaluator import column_label
from ..models.bn import calibrate_bn
from ..posttrain import AFTER_TRAINING, posttrain  # importing the package registers hydra, lwm and imp
from ..prune import PRUNERS
from ..runs.atomic import write_json_atomic, write_text_atomic, write_yaml_atomic
from ..runs.costs import cost_cells
from ..runs.plots import plot_density_robustness
from ..sparse import load_model_state, sparsity_report
from ..sparse.ticket import has_ticket, load_ticket
from ..train.spec import build_from_spec, model_spec
from ..train.stages import train_stage
from .ticket import prune_to_folder

COST_NOTE = ("Training cost per stage, then the total. Dense: its PGD-AT. At initialisation: prune (0 epochs) + "
             "PGD-AT of the ticket. hydra/lwm: dense pre-training (the dense row's run, reused) + score stage or "
             "magnitude prune + fine-tune. imp: dense pre-training + every round up to that density. Wall seconds on "
             "the machine that ran the cell; an evaluation is not counted. n/a: the NTK distance at initialisation "
             "is not defined for a network pruned after training.")


ROW = "row.json"  # a finished cell's table row, next to its eval.json
SEARCHED = ("ntt", "awt")  # the pruners whose cost is an optimisation, reported against the training it precedes


def _cell_name(method: str, density: float) -> str:
    return f"{method}-d{density:g}"


def ntk_distances_at_init(ticket_state: dict, dense_init, probe, x_bn) -> tuple[float, float]:
    """(distance with BN at its initial statistics, distance with each network's BN statistics on ``x_bn``)."""
    sparse = copy.deepcopy(dense_init)
    load_model_state(sparse, ticket_state)

    def distance(teacher, student) -> float:
        with torch.no_grad():
            return float(ntk_distance(empirical_ntk(student.eval(), probe), empirical_ntk(teacher.eval(), probe)))

    at_init = distance(dense_init, sparse)
    teacher = copy.deepcopy(dense_init)
    calibrate_bn(teacher, None, x_bn)
    calibrate_bn(sparse, None, x_bn)
    return at_init, distance(teacher, sparse)


def _check_methods(methods: list[str], densities: list[float]) -> None:
    unknown = [m for m in methods if m not in PRUNERS and not is_after_training(m)]
    if unknown:
        raise UserError(f"unknown pruning method(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(PRUNERS))} (at initialisation), hydra, lwm, imp (after training)")
    bad = [d for d in densities if not 0 < d <= 1]
    if bad:
        raise UserError(f"densities must lie in (0, 1]; got {bad}")
    if any(is_after_training(m) for m in methods) and max(densities) >= 1:
        raise UserError("hydra, lwm and imp prune: their densities must be below 1")


def _open_grid(cfg: RunConfig, out: str, suite: str) -> None:
    """``grid.yaml`` binds the folder to (config, suite): a rerun continues the same grid, another is refused."""
    os.makedirs(out, exist_ok=True)
    grid_path = os.path.join(out, "grid.yaml")
    grid = {"config": cfg.to_dict(), "suite": suite}
    if os.path.exists(grid_path):
        with open(grid_path) as fh:
            saved = yaml.safe_load(fh)
        # resolve through the current schema: fields added since the grid started take their defaults
        if config_from_dict(saved["config"]).to_dict() != grid["config"] or saved["suite"] != suite:
            raise UserError(f"{out} holds a grid run with another config or suite; use another --out")
    else:
        write_yaml_atomic(grid_path, grid)  # read back by every rerun: never half-written


def _ticket_cell(cfg: RunConfig, method: str, density: float, out: str, suite: str, dense_init, probe, x_bn,
                 progress: bool) -> dict:
    """One at-initialisation cell: prune (or continue a killed search), train the ticket, evaluate; its row."""
    cell = os.path.join(out, _cell_name(method, density))
    ticket_dir, run_dir = os.path.join(cell, "ticket"), os.path.join(cell, "run")
    done = _finished_row(run_dir)
    if done is not None:
        return done
    cell_cfg = copy.deepcopy(cfg)
    cell_cfg.prune.method, cell_cfg.prune.density = method, density
    if not has_ticket(ticket_dir):
        resume = os.path.exists(os.path.join(ticket_dir, "config.yaml"))  # a killed search continues
        if os.path.isdir(ticket_dir) and not resume:
            shutil.rmtree(ticket_dir)
        _say(f"{method} at density {density:g}: pruning")
        prune_to_folder(cell_cfg, ticket_dir, progress=progress, resume=resume)
    state, meta = load_ticket(ticket_dir)
    cell_cfg.train.ticket = ticket_dir
    _say(f"{method} at density {density:g}: adversarial training of the ticket")
    seconds = train_stage(cell_cfg, run_dir, progress)
    dist = ntk_distances_at_init(state, dense_init, probe, x_bn)
    stages = [{"stage": "prune", "epochs": 0, "seconds": meta["prune"]["seconds"]},
              {"stage": "adversarial training", "epochs": cell_cfg.train.epochs, "seconds": seconds}]
    ev = eval_stage(run_dir, suite, progress=progress)
    return _keep_row(run_dir, _row(method, density, ev, run_dir, meta["prune"]["seconds"], seconds, dist, stages))


def _finished_row(run_dir: str) -> dict | None:
    """A finished cell's table row, as written by ``_keep_row``: a rerun (or the pooling of seeds) reads it instead
    of loading the model and the ticket again, so a grid copied without its weights still pools."""
    path = os.path.join(run_dir, ROW)
    if not os.path.exists(path) or not os.path.exists(os.path.join(run_dir, "eval.json")):
        return None
    with open(path) as fh:
        return json.load(fh)


def _keep_row(run_dir: str, row: dict) -> dict:
    write_json_atomic(os.path.join(run_dir, ROW), row, sort_keys=False)
    return row


def _say(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def run_compare(cfg: RunConfig, methods: list[str], densities: list[float], out: str,
                suite: str | None = None, progress: bool = True, dynamics: bool = False) -> list[dict]:
    """Run (or continue) the grid in ``out``; ``dynamics`` records NTK/output dynamics and plots dynamics.png."""
    _check_methods(methods, densities)
    suite = suite or cfg.eval.suite
    if dynamics:
        cfg = copy.deepcopy(cfg)
        cfg.train.probe_every = 1
    _open_grid(cfg, out, suite)
    spec = model_spec(cfg)
    torch.manual_seed(cfg.train.seed)
    dense_init = build_from_spec(spec).eval()
    probe = make_probe(cfg, dense_init)
    x_bn = load_split(cfg, "train")[0][: cfg.prune.bn_samples].to(probe.device)

    dense_dir = os.path.join(out, "dense")
    _say("dense PGD-AT")
    dense_row = _finished_row(dense_dir)
    if dense_row is None:
        seconds = train_stage(dense_cell_config(cfg, methods), dense_dir, progress)
        dense_row = _keep_row(dense_dir, _row("dense", 1.0, eval_stage(dense_dir, suite, progress=progress),
                                              dense_dir, 0.0, seconds, (0.0, 0.0),
                                              [{"stage": "dense training", "epochs": cfg.train.epochs,
                                                "seconds": seconds}]))
    rows = [dense_row]
    for density in densities:
        for method in methods:
            if not is_after_training(method):
                rows.append(_ticket_cell(cfg, method, density, out, suite, dense_init, probe, x_bn, progress))
                continue
            _say(f"{method} at density {density:g}: after training, from the dense cell")
            run_dir, ev, stages = after_training_cell(cfg, method, density, densities, out, dense_dir, suite, progress)
            rows.append({**_row(method, density, ev, run_dir, None, None, (None, None), stages),
                         "family": "after training"})
    _write_results(out, rows, suite)
    if dynamics:
        runs = {f"{r['method']} d={r['density']:g}": os.path.join(out, _cell_name(r["method"], r["density"]), "run")
                for r in rows if r["method"] != "dense" and not is_after_training(r["method"])}
        plot_dynamics(runs, dense_dir, os.path.join(out, "dynamics.png"))
    return rows


def _row(method, density, ev, run_dir, prune_s, train_s, ntk_dists, stages):
    meta = load_meta(run_dir)
    spec = meta["model_spec"]
    report = sparsity_report(load(run_dir), (spec["in_channels"], *spec["input_size"]))
    return {"method": method, "density": density, "accuracy": ev["accuracy"], "attacks": ev["attacks"],
            "n": ev["n"], "points": ev.get("points", {}), "worst_case": ev["worst_case"], "nonzero_params": report.nonzero_params,
            "total_params": report.total_params, "sparse_macs": report.sparse_macs, "prune_seconds": prune_s,
            "train_seconds": train_s, "ntk_distance_at_init": ntk_dists[0],
            "ntk_distance_at_init_batch_bn": ntk_dists[1], "warnings": ev["warnings"],
            "run": run_dir, "cost": {"stages": stages, "epochs": sum(s["epochs"] for s in stages),
                                     "seconds": sum(s["seconds"] for s in stages)}}


NTK_KEYS = ("ntk_distance_at_init", "ntk_distance_at_init_batch_bn")
NTK_HEADS = ("NTK dist @init (adv. probe, BN at init stats)", "NTK dist @init (adv. probe, BN batch stats)")


def _distance_cell(value, std=None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if std is None else f"{value:.4f} ± {std:.4f}"


def _markdown_table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body]


def search_cost_lines(rows: list[dict]) -> str:
    """One line per searched ticket (ntt, awt): its search's wall time as a share of the PGD-AT that followed."""
    lines = [f"- {r['method']} at density {r['density']:g}: search {r['prune_seconds']:.1f} s = "
             f"{r['prune_seconds'] / r['train_seconds']:.1%} of its adversarial training ({r['train_seconds']:.1f} s)"
             for r in rows if r["method"] in SEARCHED and r.get("train_seconds")]
    return "\n\nSearch cost (wall time, same process, same machine):\n" + "\n".join(lines) if lines else ""


def _write_results(out: str, rows: list[dict], suite: str) -> None:
    write_json_atomic(os.path.join(out, "results.json"), rows, sort_keys=False)
    items = list(rows[0]["accuracy"])
    head = ["method", "density"] + [column_label(rows[0], i) for i in items] + \
        ["non-zero params", *NTK_HEADS, "training epochs (total)", "training wall s (total)"]
    lines = _markdown_table(head, [
        [r["method"], f"{r['density']:g}"] + [f"{r['accuracy'][i]:.2%}" for i in items] +
        [f"{r['nonzero_params']:,}", *(_distance_cell(r.get(k)) for k in NTK_KEYS),
         *cost_cells(r["cost"]["stages"])] for r in rows])
    write_text_atomic(os.path.join(out, "results.md"), "# Density–robustness grid\n\n" + "\n".join(lines) + "\n\n" +
                      COST_NOTE + search_cost_lines(rows) + "\n\n![density vs robustness](density_robustness.png)\n")
    plot_density_robustness(rows, os.path.join(out, "density_robustness.png"))


def run_compare_seeds(cfg: RunConfig, methods: list[str], densities: list[float], out: str, seeds: list[int],
                      suite: str | None = None, progress: bool = True, dynamics: bool = False) -> list[dict]:
    """The grid once per seed in ``<out>/seed<s>/`` (``train.seed = prune.seed = s``: θ₀, the pruners' draws and
    training all change), then ``<out>/results.md``: every accuracy and the NTK distance as mean ± sample standard
    deviation over the seeds. Single runs on small test sets differ by more than the methods do; this is the
    table to draw conclusions from. Each seed's grid resumes on its own, so a killed run continues."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must name distinct integers, got {seeds}")
    per_seed = []
    for seed in seeds:
        seed_cfg = copy.deepcopy(cfg)
        seed_cfg.train.seed = seed_cfg.prune.seed = seed
        print(f"[compare] seed {seed} -> {os.path.join(out, f'seed{seed}')}", file=sys.stderr, flush=True)
        per_seed.append(run_compare(seed_cfg, methods, densities, os.path.join(out, f"seed{seed}"), suite, progress,
                                    dynamics))
    rows = seed_statistics(per_seed)
    _write_seed_results(out, rows, seeds)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def seed_statistics(per_seed: list[list[dict]]) -> list[dict]:
    """One row per (method, density): mean and sample std over the seeds' rows (same order in every seed)."""
    rows = []
    for cells in zip(*per_seed):
        first = cells[0]
        acc = {k: _mean_std([c["accuracy"][k] for c in cells]) for k in first["accuracy"]}
        ntk = {k: None if first.get(k) is None else _mean_std([c[k] for c in cells]) for k in NTK_KEYS}
        seconds = [c["cost"]["seconds"] for c in cells]
        rows.append({"method": first["method"], "density": first["density"], "family": first.get("family"),
                     "seeds": len(cells), "accuracy": {k: m for k, (m, _) in acc.items()},
                     "accuracy_std": {k: s for k, (_, s) in acc.items()}, "attacks": first["attacks"],
                     "n": first.get("n"), "points": first.get("points", {}),
                     "per_seed_accuracy": {k: [c["accuracy"][k] for c in cells] for k in first["accuracy"]},
                     "nonzero_params": round(sum(c["nonzero_params"] for c in cells) / len(cells)),
                     **{k: None if ntk[k] is None else ntk[k][0] for k in NTK_KEYS},
                     **{f"{k}_std": None if ntk[k] is None else ntk[k][1] for k in NTK_KEYS},
                     "mean_seconds": sum(seconds) / len(seconds)})
    return rows


def _write_seed_results(out: str, rows: list[dict], seeds: list[int]) -> None:
    write_json_atomic(os.path.join(out, "results.json"), {"seeds": seeds, "rows": rows}, sort_keys=False)
    items = list(rows[0]["accuracy"])
    head = ["method", "density"] + [column_label(rows[0], i) for i in items] + \
        ["non-zero params", *NTK_HEADS, "wall s per seed (mean)"]
    lines = _markdown_table(head, [
        [r["method"], f"{r['density']:g}"] + [f"{r['accuracy'][i]:.2%} ± {r['accuracy_std'][i]:.2%}" for i in items] +
        [f"{r['nonzero_params']:,}", *(_distance_cell(r[k], r[f"{k}_std"]) for k in NTK_KEYS),
         f"{r['mean_seconds']:.0f}"] for r in rows])
    text = (f"# Density–robustness grid over {len(seeds)} seeds ({', '.join(map(str, seeds))})\n\n"
            "Mean ± sample standard deviation over the seeds (train.seed = prune.seed = s: θ₀, the pruners' "
            "draws and training all change). Each seed's own table, costs and search shares: seed<s>/results.md.\n\n"
            + "\n".join(lines) + "\n\n![density vs robustness (means)](density_robustness.png)\n")
    write_text_atomic(os.path.join(out, "results.md"), text)
    plot_density_robustness(rows, os.path.join(out, "density_robustness.png"))


# after-training methods (hydra, lwm, imp) as cells of the grid: a ``posttrain`` pipeline whose pre-trained model
# is the grid's dense cell (reused, never retrained; its cost is still counted in the cell's total):
#     <grid>/hydra-d<density>/, <grid>/lwm-d<density>/   posttrain folders (ticket/, finetune/, ...)
#     <grid>/imp/                                        ONE IMP chain landing on every density of the grid

def is_after_training(method: str) -> bool:
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
    cell_cfg = copy.deepcopy(cfg)
    cell_cfg.train.probe_every = 0  # dynamics are recorded from initialisation: not meaningful here
    folder = os.path.join(out, "imp" if method == "imp" else f"{method}-d{density:g}")
    result = posttrain(cell_cfg, folder, method=method, density=densities if method == "imp" else density,
                       pretrained=dense_dir, suite=suite, progress=progress)
    outcome = next(o for o in result.outcomes if o.density == density)
    return outcome.run_dir, result.evals[outcome.density], outcome.stages
