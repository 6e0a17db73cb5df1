"""study.md: the tables of ``robustsparse study`` and a verdict for each seed claim, from whatever the study has
finished so far (a missing piece is named as missing, never filled in).

The claims (issue 17), each judged on means over seeds with the spread shown:
- AWT at the first density within 1 point of dense under AutoAttack;
- AWT at the last density above every other at-init method (grid PGD; AutoAttack against the best other method
  where both ran);
- SMART λ=0 within 0.5 point of standard training's clean accuracy;
- SMART λ=1 within 1 point of dense PGD-AT under AutoAttack;
- SMART's frontier at or above OAT's and FLOAT's: every (clean, PGD) point of theirs is matched or beaten on both
  axes by some SMART point (weak dominance over the swept λ).
"""
from __future__ import annotations

import json
import os
import statistics

from ..config import RunConfig
from ..runs.atomic import write_text_atomic
from .compare import _cell_name, _mean_std
from .demo import protocol_line

AA = "autoattack"
ROUNDING = 1e-9  # a gap of exactly 1 point is within 1 point, whatever float subtraction makes of it


def _read(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def worst_item(row: dict) -> str:
    """The attack item of a row with the lowest accuracy (the grid's worst case: PGD in practice)."""
    return min(row["accuracy"], key=lambda k: row["accuracy"][k])


def _cell(values: list[float]) -> str:
    if not values:
        return "missing"
    mean, std = _mean_std(values)
    per_seed = ", ".join(f"{v:.2%}" for v in values)
    return f"{mean:.2%} ± {std:.2%} ({per_seed})"


def _verdict(ok: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured yet"}[ok]


def _atinit_autoattack(out: str, seeds: list[int], densities: list[float]) -> dict:
    """(method, density) -> {item: [per-seed accuracy]}, for every model the autoattack stage finished."""
    found = {}
    base = os.path.join(out, "atinit")
    cells = [("dense", 1.0, "dense")] + [(m, d, os.path.join(_cell_name(m, d), "run"))
                                         for d in densities for m in _grid_methods(out)]
    for method, density, rel in cells:
        results = [_read(os.path.join(base, f"seed{s}", rel, f"{AA}.json")) for s in seeds]
        if all(r is not None for r in results):
            found[(method, density)] = {"results": results,
                                        **{i: [r["accuracy"][i] for r in results] for i in results[0]["accuracy"]}}
    return found


def _grid_methods(out: str) -> list[str]:
    data = _read(os.path.join(out, "atinit", "results.json"))
    return [] if data is None else list(dict.fromkeys(r["method"] for r in data["rows"] if r["method"] != "dense"))


def _autoattack_lines(found: dict) -> list[str]:
    if not found:
        return ["AutoAttack stage: not run yet."]
    first = next(iter(found.values()))["results"][0]
    from ..eval.evaluator import column_label
    items = list(first["accuracy"])
    lines = ["| model | density | " + " | ".join(column_label(first, i) for i in items) + " |",
             "|---|---:|" + "---:|" * len(items)]
    for (method, density), cols in found.items():
        lines.append(f"| {method} | {density:g} | " + " | ".join(_cell(cols[i]) for i in items) + " |")
    return lines + ["", "Mean ± sample std over the seeds (each seed's value in brackets)."]


def _awt_presets(out: str, seeds: list[int], densities: list[float]) -> dict[float, str]:
    """density -> the search preset (prune.json "preset") the AWT tickets of the study used, where recorded."""
    presets = {}
    for d in densities:
        found = {(_read(os.path.join(out, "atinit", f"seed{s}", _cell_name("awt", d), "ticket", "prune.json"))
                  or {}).get("preset") for s in seeds} - {None}
        if found:
            presets[d] = "/".join(sorted(found))
    return presets


def _awt_label(presets: dict[float, str], density: float) -> str:
    """'AWT' plus its preset; a claim judged on anything but `faithful` says so, since the claim is the method's."""
    preset = presets.get(density)
    if preset is None:
        return "AWT"
    caveat = "" if preset == "faithful" else ", a variant: the claim is the method's, `prune.preset=faithful`"
    return f"AWT (`{preset}` preset{caveat})"


def _atinit_claims(found: dict, rows: list[dict] | None, densities: list[float],
                   presets: dict[float, str] | None = None) -> list[str]:
    first, last = densities[0], densities[-1]
    presets = presets or {}
    dense, awt = found.get(("dense", 1.0)), found.get(("awt", first))
    ok1 = None
    if dense and awt:
        gap = statistics.fmean(dense[AA]) - statistics.fmean(awt[AA])
        ok1 = gap <= 0.01 + ROUNDING
        detail1 = f"dense {statistics.fmean(dense[AA]):.2%}, AWT {statistics.fmean(awt[AA]):.2%}, gap {gap:+.2%}"
    lines = [f"- {_awt_label(presets, first)} at density {first:g} within 1 point of dense under AutoAttack: "
             f"{_verdict(ok1)}"
             + (f" ({detail1})" if ok1 is not None else "")]
    ok2, detail2 = None, ""
    at_last = [r for r in rows or [] if r["density"] == last and r["method"] != "dense"]
    awt_row = next((r for r in at_last if r["method"] == "awt"), None)
    if awt_row and len(at_last) > 1:
        item = worst_item(awt_row)
        best = max((r for r in at_last if r["method"] != "awt"), key=lambda r: r["accuracy"][item])
        ok2 = awt_row["accuracy"][item] > best["accuracy"][item]
        detail2 = (f"{item}: AWT {awt_row['accuracy'][item]:.2%} ± {awt_row['accuracy_std'][item]:.2%}, best other "
                   f"{best['method']} {best['accuracy'][item]:.2%} ± {best['accuracy_std'][item]:.2%}")
        other_aa = found.get((best["method"], last))
        if found.get(("awt", last)) and other_aa:
            a, b = statistics.fmean(found[("awt", last)][AA]), statistics.fmean(other_aa[AA])
            ok2 = ok2 and a > b
            detail2 += f"; AutoAttack: AWT {a:.2%}, {best['method']} {b:.2%}"
    lines.append(f"- {_awt_label(presets, last)} at density {last:g} above every other at-init method: {_verdict(ok2)}"
                 + (f" ({detail2})" if detail2 else ""))
    return lines


def _sweeps(out: str, seeds: list[int]) -> dict[int, dict]:
    """Each seed's finished λ sweep, by seed (a seed whose sweep has not run yet is absent)."""
    found = {s: _read(os.path.join(out, "ofa", f"seed{s}", "sweep", "sweep.json")) for s in seeds}
    return {s: d for s, d in found.items() if d is not None}


def _point(sweep: dict, label: str, lam) -> dict | None:
    return next((p for p in sweep["points"] if p["label"] == label and p["lam"] == lam), None)


def _seed_values(sweeps: list[dict], label: str, lam, item: str) -> list[float] | None:
    points = [_point(s, label, lam) for s in sweeps]
    if any(p is None or item not in p["accuracy"] for p in points):
        return None
    return [p["accuracy"][item] for p in points]


def _dominated(point: tuple[float, float], frontier: list[tuple[float, float]]) -> bool:
    return any(c >= point[0] and r >= point[1] for c, r in frontier)


def _ofa_claims(found: dict[int, dict], seeds: list[int]) -> list[str]:
    """The SMART claims on the seeds whose sweep exists; a seed still missing is named in every verdict."""
    if not found:
        return ["- SMART claims: the once-for-all stage has not run yet (not measured)."]
    absent = [str(s) for s in seeds if s not in found]
    on = f" [seeds {', '.join(map(str, found))}" + (f"; {', '.join(absent)} not run yet]" if absent else "]")
    sweeps = list(found.values())
    lines = []
    smart0, std_clean = _seed_values(sweeps, "smart", 0.0, "clean"), _seed_values(sweeps, "standard", None, "clean")
    ok = None if not (smart0 and std_clean) else \
        statistics.fmean(std_clean) - statistics.fmean(smart0) <= 0.005 + ROUNDING
    lines.append(f"- SMART λ=0 within 0.5 point of standard training's clean accuracy: {_verdict(ok)}"
                 + (f" (SMART {_cell(smart0)}, standard {_cell(std_clean)}){on}" if ok is not None else ""))
    smart1, dense = _seed_values(sweeps, "smart", 1.0, AA), _seed_values(sweeps, "dense", None, AA)
    ok = None if not (smart1 and dense) else statistics.fmean(dense) - statistics.fmean(smart1) <= 0.01 + ROUNDING
    lines.append(f"- SMART λ=1 within 1 point of dense PGD-AT under AutoAttack: {_verdict(ok)}"
                 + (f" (SMART {_cell(smart1)}, dense {_cell(dense)}){on}" if ok is not None else ""))
    robust = next((i for i in sweeps[0]["points"][0]["accuracy"] if i.startswith("pgd")), None)
    for other in ("oat", "float"):
        beaten = []
        for seed, sweep in found.items():
            mine = [(p["accuracy"]["clean"], p["accuracy"][robust]) for p in sweep["points"] if p["label"] == "smart"
                    and robust in p["accuracy"]]
            theirs = [(p["lam"], p["accuracy"]["clean"], p["accuracy"][robust]) for p in sweep["points"]
                      if p["label"] == other and robust in p["accuracy"]]
            beaten += [f"seed {seed} λ={lam:g}" for lam, c, r in theirs if not _dominated((c, r), mine)]
        lines.append(f"- SMART's frontier at or above {other.upper()}'s (clean, {robust}; each of its points "
                     f"matched or beaten on both by a measured SMART point): {_verdict(not beaten)}"
                     + (f"; not dominated: {', '.join(beaten)}" if beaten else "") + on)
    return lines


def _posttrain_lines(out: str, seeds: list[int], density: float) -> list[str]:
    """HYDRA and LWM over the seeds that have finished; a seed still running is named, not silently averaged."""
    lines = ["| method | density | seeds | clean | PGD-20 | total training wall s (mean) |",
             "|---|---:|---|---:|---:|---:|"]
    for method in ("hydra", "lwm"):
        found = {s: _read(os.path.join(out, "posttrain", f"seed{s}", f"{_cell_name(method, density)}.json"))
                 for s in seeds}
        rows = [r for r in found.values() if r is not None]
        if not rows:
            lines.append(f"| {method} | {density:g} | none yet | missing | missing | |")
            continue
        absent = [str(s) for s, r in found.items() if r is None]
        seed_note = ", ".join(str(s) for s, r in found.items() if r is not None) + \
            (f" ({', '.join(absent)} missing)" if absent else "")
        item = next(i for i in rows[0]["accuracy"] if i.startswith("pgd"))
        lines.append(f"| {method} | {density:g} | {seed_note} | {_cell([r['accuracy']['clean'] for r in rows])} | "
                     f"{_cell([r['accuracy'][item] for r in rows])} | "
                     f"{statistics.fmean(r['cost']['seconds'] for r in rows):.0f} |")
    return lines


def _embedded(path: str, missing: str, out: str) -> list[str]:
    """A stage's own markdown (without its title line), its image links made relative to study.md."""
    if not os.path.exists(path):
        return [missing]
    with open(path) as fh:
        body = fh.read()
    if body.startswith("# "):
        body = body.split("\n", 1)[1]
    folder = os.path.relpath(os.path.dirname(path), out)
    for image in ("density_robustness.png", "tradeoff.png"):
        body = body.replace(f"]({image})", f"]({folder}/{image})")
    return [body.strip()]


def write_study_report(cfg: RunConfig, out: str, seeds: list[int], densities: list[float], config_name: str) -> str:
    rows_data = _read(os.path.join(out, "atinit", "results.json"))
    rows = None if rows_data is None else rows_data["rows"]
    found = _atinit_autoattack(out, seeds, densities)
    sweeps = _sweeps(out, seeds)
    lines = [f"# robustsparse study: `{config_name or cfg.data.name}`, seeds {', '.join(map(str, seeds))}", "",
             protocol_line(cfg), "",
             "## Seed claims", "", *_atinit_claims(found, rows, densities, _awt_presets(out, seeds, densities)),
             *_ofa_claims(sweeps, seeds), "",
             "## At initialisation (clean + PGD, every test point)", "",
             *_embedded(os.path.join(out, "atinit", "results.md"), "At-init stage: not run yet.", out), "",
             "## AutoAttack: dense, AWT and the best other at-init method", "", *_autoattack_lines(found), "",
             f"## After training (from each seed's dense run), density {densities[0]:g}", "",
             *_posttrain_lines(out, seeds, densities[0]), "", "## Once-for-all: λ sweep", ""]
    for seed in seeds:
        lines += [f"### Seed {seed}", "", *_embedded(os.path.join(out, "ofa", f"seed{seed}", "sweep", "sweep.md"),
                                                     "Once-for-all stage: not run yet.", out), ""]
    path = os.path.join(out, "study.md")
    write_text_atomic(path, "\n".join(lines))
    return path
