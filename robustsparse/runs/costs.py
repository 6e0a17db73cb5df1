"""A run's cost, stage by stage: every pipeline (posttrain, compare) reports epochs and wall seconds per stage and
their totals, so a method is compared by the whole cost of getting a sparse robust network."""
from __future__ import annotations


def total_cost(stages: list[dict]) -> dict:
    return {"epochs": sum(s["epochs"] for s in stages), "seconds": sum(s["seconds"] for s in stages)}


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
