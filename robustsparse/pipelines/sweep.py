"""The λ sweep: evaluate once-for-all runs at every λ (and plain runs once) with the one evaluator, then plot the
clean-vs-robust trade-off and tabulate accuracy and cost per inference path.

    <out>/sweep.json     every point: run, method, λ, mix, accuracy per suite item, the attack/budget strings,
                         warnings, and the path's cost (cost.py); plus the evaluation settings
    <out>/sweep.md       the accuracy table (column headers name attack and budget) and the cost table,
                         rewritten (with tradeoff.png) after every new point, so an unfinished sweep shows its progress
    <out>/tradeoff.png   clean accuracy (x) vs robust accuracy (y), one panel per attack; a line per
                         once-for-all run through its λ points, one marker per plain (dense PGD-AT/TRADES) run
    <out>/state/         the evaluator's resumable state per point and attack (AutoAttack resumes mid-cascade)

Resumable: a point's attack already in sweep.json is skipped, so re-running the command (with more λs or more
attacks, e.g. AutoAttack only at λ ∈ {0, 1}) adds to the same file. Settings that change the numbers (ε, norm,
split, n, autoattack_n, seed) are fixed per ``out`` folder; a different one is refused. ``out`` defaults to
``<first run>/sweep``. The protocol (``n``, ``autoattack_n``: AutoAttack on the first autoattack_n points, the other
attacks on all n) defaults to the first run's ``eval.n`` and ``eval.autoattack_n``, as ``robustsparse eval`` does.
"""
from __future__ import annotations

import json
import os
import textwrap

import torch

from ..api import load, load_meta
from ..config import config_from_dict
from ..data import load_split
from ..errors import UserError
from ..eval.evaluator import column_label, evaluate, parse_suite, point_count, subset_size
from ..ofa.base import check_lambda
from ..ofa.cost import cost_table, path_cost
from ..runs.atomic import savefig_atomic, write_json_atomic, write_text_atomic
from ..train.spec import build_from_spec

FORMAT = "robustsparse-sweep/1"


def parse_lams(text: str) -> list[float]:
    """"0,0.1,...,1" style lists; also a range ``a:b:step`` (inclusive)."""
    text = text.strip()
    try:
        if text.count(":") == 2:
            a, b, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((b - a) / step))
            values = [round(a + i * step, 10) for i in range(count + 1)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--lams must be comma-separated numbers in [0, 1] (or a:b:step), got {text!r}") from None
    if not values:
        raise UserError("--lams is empty")
    return sorted(set(check_lambda(v) for v in values))


def _run_info(run: str, which: str) -> dict:
    if not os.path.exists(run):
        raise UserError(f"{run} does not exist (expected a run folder or checkpoint)")
    meta = load_meta(run, which)
    cfg = config_from_dict(meta["config"])
    ofa = meta["model_spec"].get("ofa")
    return {"path": os.path.abspath(run), "meta": meta, "cfg": cfg, "conditional": ofa is not None,
            "method": ofa["method"] if ofa else cfg.train.method}


def _labels(runs: list[str]) -> list[str]:
    labels = []
    for run in runs:
        base = os.path.basename(os.path.normpath(run)) or run
        label, i = base, 2
        while label in labels:
            label, i = f"{base}-{i}", i + 1
        labels.append(label)
    return labels


def _save(path: str, data: dict) -> None:
    write_json_atomic(path, data, sort_keys=False)


def _check_request(runs, lams, suite: str, n, autoattack_n, mix) -> tuple[list[float], list[str]]:
    if isinstance(runs, str) or not runs:
        raise UserError("sweep needs a list of one or more run folders")
    lams = parse_lams(lams) if isinstance(lams, str) else sorted(set(check_lambda(v) for v in lams))
    items = parse_suite(suite)
    point_count(n, None, "n")  # the form only here; the first run's config fills in None later
    point_count(autoattack_n, None, "autoattack_n")
    if mix is not None and mix not in ("switch", "weight", "logit"):
        raise UserError(f"mix must be switch, weight or logit, got {mix!r}")
    return lams, items


def _common_threat(infos: list[dict], eps: float | None) -> float:
    """The one ε every run is evaluated at: ``eps`` or, if all runs agree, theirs; the runs must share data."""
    first = infos[0]["cfg"]
    for info in infos[1:]:
        c = info["cfg"]
        if (c.data.name, c.data.options) != (first.data.name, first.data.options):
            raise UserError(f"{info['path']} was trained on {c.data.name}, {infos[0]['path']} on {first.data.name}; "
                            "a trade-off plot compares runs on the same data")
    run_eps = {i["cfg"].eval.eps if i["cfg"].eval.eps is not None else i["cfg"].attack.eps for i in infos}
    if eps is None and len(run_eps) > 1:
        raise UserError(f"the runs were trained at different eps ({sorted(run_eps)}); pass eps= (--eps) to compare "
                        "them under one threat model")
    return float(eps if eps is not None else run_eps.pop())


def _open_sweep(path: str, settings: dict) -> dict:
    """sweep.json as far as it got (a rerun continues it), refused if written with other settings."""
    data = {"settings": settings, "points": []}
    if os.path.exists(path):
        with open(path) as fh:
            data = json.load(fh)
        if data.get("settings") != settings:
            raise UserError(f"{path} was written with other settings ({data.get('settings')}); use another --out "
                            f"for {settings}")
    return data


def _evaluate_run_at(info: dict, label: str, lam, run_mix, ctx: dict) -> bool:
    """Fill in (or finish) the sweep point of one run at one λ: its cost and every suite item not yet done,
    sweep.json rewritten after each item (an interrupted sweep loses at most one). True when anything was
    evaluated."""
    data, points, out, path = ctx["data"], ctx["points"], ctx["out"], ctx["path"]
    spec = info["meta"]["model_spec"]
    key = (info["path"], lam, run_mix)
    point = points.get(key)
    if point is None:
        point = {"path": info["path"], "label": label, "method": info["method"], "lam": lam, "mix": run_mix,
                 "accuracy": {}, "attacks": {}, "warnings": []}
        points[key] = point
        data["points"].append(point)
    point["label"] = label
    todo = [i for i in ctx["items"] if i not in point["accuracy"]]
    if not todo and "cost" in point:
        return False
    model = load(info["path"], which=ctx["which"], device=ctx["device"], lam=lam,
                 mix=run_mix if info["method"] == "smart" else None)
    point["cost"] = path_cost(model, (spec["in_channels"], *spec["input_size"]), ctx["conditional"]).to_dict()
    x, y = ctx["xy"]
    for item in todo:
        lam_txt = "plain" if lam is None else f"lam{lam:g}"
        state = os.path.join(out, "state", f"{label}-{lam_txt}-{run_mix or 'na'}-{item}.json")
        res = evaluate(model, x, y, suite=item, eps=ctx["eps"], norm=ctx["norm"], num_classes=spec["num_classes"],
                       batch_size=ctx["batch_size"] or info["cfg"].eval.batch_size, seed=ctx["seed"],
                       state_path=state, progress=ctx["progress"], autoattack_n=ctx["autoattack_n"])
        point["accuracy"][item] = res.accuracy[item]
        point["attacks"][item] = res.attacks[item]
        point["n"] = res.n
        point.setdefault("points", {})[item] = res.points[item]
        point["warnings"] = sorted(set(point["warnings"]) | set(res.warnings))
        _save(path, data)
    _save(path, data)
    return True


def sweep(runs: list[str], lams: list[float] | str = "0:1:0.1", suite: str = "clean,pgd-20", out: str | None = None,
          mix: str | None = None, eps: float | None = None, n: int | str | None = None, which: str = "best",
          split: str | None = None, batch_size: int | None = None, seed: int = 0, progress: bool = True,
          autoattack_n: int | str | None = None) -> dict:
    """Evaluate every run (each once-for-all run at every λ in ``lams``) and write sweep.json/md and tradeoff.png
    in ``out``; returns the sweep.json content. ``mix`` overrides SMART runs' ``ofa.mix``. ``n`` and
    ``autoattack_n`` default to the first run's ``eval.n``/``eval.autoattack_n``; ``"all"``: every point."""
    lams, items = _check_request(runs, lams, suite, n, autoattack_n, mix)
    infos = [_run_info(r, which) for r in runs]
    eps = _common_threat(infos, eps)
    first = infos[0]["cfg"]
    norm = first.attack.norm
    split = split or first.eval.split
    n = point_count(n, first.eval.n, "n")
    out = out or os.path.join(runs[0], "sweep")
    x, y = load_split(first, split)
    if n is not None:
        x, y = x[:n], y[:n]
    autoattack_n = subset_size(point_count(autoattack_n, first.eval.autoattack_n, "autoattack_n"), len(y))
    settings = {"format": FORMAT, "data": first.data.name, "split": split, "n": n, "eps": eps, "norm": norm,
                "seed": seed, "which": which}
    if autoattack_n is not None:  # only then: a sweep folder written before the protocol existed stays valid
        settings["autoattack_n"] = autoattack_n
    path = os.path.join(out, "sweep.json")
    data = _open_sweep(path, settings)
    os.makedirs(os.path.join(out, "state"), exist_ok=True)
    ctx = {"data": data, "points": {(p["path"], p["lam"], p["mix"]): p for p in data["points"]}, "out": out,
           "path": path, "items": items, "which": which, "device": "cuda" if torch.cuda.is_available() else "cpu",
           "xy": (x, y), "eps": eps, "norm": norm, "batch_size": batch_size, "seed": seed, "progress": progress,
           "autoattack_n": autoattack_n}
    for info, label in zip(infos, _labels(runs)):
        spec = info["meta"]["model_spec"]
        ctx["conditional"] = build_from_spec(spec) if info["conditional"] else None
        run_mix = (mix or spec["ofa"]["options"]["mix"]) if info["method"] == "smart" else None
        for lam in (lams if info["conditional"] else [None]):
            if _evaluate_run_at(info, label, lam, run_mix, ctx):
                write_outputs(out, data)  # a long sweep's table and plot are current after every point
    write_outputs(out, data)
    return data


def _item_order(points: list[dict]) -> list[str]:
    order = []
    for p in points:
        for item in p["accuracy"]:
            if item not in order:
                order.append(item)
    return sorted(order, key=lambda i: (i != "clean", i == "autoattack", i))


def write_outputs(out: str, data: dict) -> None:
    points = data["points"]
    items = _item_order(points)
    descriptions, heads = {}, {}
    for p in points:
        descriptions.update(p["attacks"])
        heads.update({i: column_label(p, i) for i in p["attacks"] if i not in heads})
    s = data["settings"]
    n_txt = "all" if s["n"] is None else f"the first {s['n']:,}"
    aa_txt = "" if s.get("autoattack_n") is None else f" (AutoAttack on the first {s['autoattack_n']:,} of them)"
    lines = ["# λ sweep: clean vs robust trade-off", "",
             f"Data: `{s['data']}`, {n_txt} images of the `{s['split']}` split{aa_txt}; threat model {s['norm']} "
             f"eps={s['eps']:.4g}; checkpoint `{s['which']}`. Each once-for-all run is evaluated as the plain module "
             "`rs.load(run, lam=λ)` returns, attacked through that same λ path.", "",
             "| run | method | λ | mix | " + " | ".join(heads.get(i, i) for i in items) + " |",
             "|---|---|---:|---|" + "---:|" * len(items)]
    for p in sorted(points, key=lambda p: (p["label"], p["mix"] or "", -1 if p["lam"] is None else p["lam"])):
        lam = "–" if p["lam"] is None else f"{p['lam']:g}"
        accs = " | ".join(f"{p['accuracy'][i]:.2%}" if i in p["accuracy"] else "" for i in items)
        lines.append(f"| {p['label']} | {p['method']} | {lam} | {p['mix'] or '–'} | {accs} |")
    warned = [(p, w) for p in points for w in p["warnings"]]
    if warned:
        lines += ["", "Evaluator flags:"] + [f"- {p['label']} λ={p['lam']}: {w}" for p, w in warned]
    cost_rows = [p for p in points if "cost" in p]
    if cost_rows:
        lines += ["", "## Cost per inference path (robustsparse/ofa/cost.py)", "",
                  cost_table(sorted(cost_rows, key=lambda p: (p["label"], p["mix"] or "",
                                                              -1 if p["lam"] is None else p["lam"])))]
    png = plot_tradeoff(points, items, descriptions, os.path.join(out, "tradeoff.png"))
    if png:
        lines += ["", "![trade-off](tradeoff.png)"]
    write_text_atomic(os.path.join(out, "sweep.md"), "\n".join(lines) + "\n")


def plot_tradeoff(points: list[dict], items: list[str], descriptions: dict, path: str) -> str | None:
    """Top row: clean (x) vs robust (y) accuracy per attack, a line per once-for-all run through its λ points and a
    star per plain run. Bottom row: the same accuracies against λ (robust solid, clean dashed; plain runs as
    horizontal lines), which stays readable when clean accuracy saturates (as on digits)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    robust = [i for i in items if i != "clean"]
    if "clean" not in items or not robust:
        return None
    fig, axes = plt.subplots(2, len(robust), figsize=(5.8 * len(robust), 8.4), squeeze=False)
    series = list(dict.fromkeys((p["label"], p["mix"]) for p in points))  # a SMART run may be swept per mix
    colors = {key: plt.cm.tab10(i % 10) for i, key in enumerate(series)}
    for col, item in enumerate(robust):
        top, bottom = axes[0][col], axes[1][col]
        for key in series:
            pts = sorted((p for p in points if (p["label"], p["mix"]) == key and item in p["accuracy"]
                          and "clean" in p["accuracy"]), key=lambda p: -1 if p["lam"] is None else p["lam"])
            if not pts:
                continue
            xs = [p["accuracy"]["clean"] for p in pts]
            ys = [p["accuracy"][item] for p in pts]
            method = pts[0]["method"]
            name = key[0] if key[0] == method else f"{key[0]} ({method})"
            name += f", {key[1]} mix" if key[1] else ""
            color = colors[key]
            if pts[0]["lam"] is None:
                top.scatter(xs, ys, marker="*", s=140, color=color, label=name, zorder=3)
                bottom.axhline(ys[0], color=color, linewidth=1, label=f"{name} robust")
                bottom.axhline(xs[0], color=color, linewidth=1, linestyle="--")
                continue
            style = ":" if len(pts) <= 2 else "-"  # two λ points (e.g. AutoAttack at the ends): no curve implied
            top.plot(xs, ys, marker="o", color=color, label=name, linestyle=style)
            for p, xv, yv in zip(pts, xs, ys):
                top.annotate(f"{p['lam']:g}", (xv, yv), textcoords="offset points", xytext=(3, 3), fontsize=6,
                             color=color)
            lams = [p["lam"] for p in pts]
            bottom.plot(lams, ys, marker="o", color=color, label=f"{name} robust", linestyle=style)
            bottom.plot(lams, xs, marker=".", color=color, linestyle="--")
        top.set_xlabel("clean accuracy")
        top.set_ylabel("robust accuracy")
        top.set_title("\n".join(textwrap.wrap(descriptions.get(item, item), 60)), fontsize=7)
        top.legend(fontsize=6, loc="lower left")
        bottom.set_xlabel("λ (0 = accurate, 1 = robust)")
        bottom.set_ylabel("accuracy (solid: robust, dashed: clean)")
        bottom.legend(fontsize=6, loc="lower right")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    fig.suptitle("trade-off over λ (point labels: λ)", fontsize=8)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path
