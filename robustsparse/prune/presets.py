"""Named settings of the NTT/AWT search (``prune.preset``): ``short`` (the default) and ``faithful``.

A preset gives defaults to the keys in ``PRESET_KEYS``. A key the user sets explicitly (YAML or ``KEY=VALUE``)
wins; a key left at ``None`` takes the preset's value for ``prune.method``. That happens when the search runs,
not when the config is loaded, so a grid that changes ``prune.method`` per cell (``compare``) resolves each cell
for its own method.

* ``short``: what was measured on digits to stay under ~10% of the PGD-AT that follows (docs/architecture.md,
  "The search"). 20 Adam steps on 2+2 points at lr 5e-3, λ_ker 0.1. The mask update period (100) is longer than the
  search, so the mask never moves: AWT keeps SynFlow's global mask, NTT the layer-wise magnitude mask. A variant,
  not the method of the papers.
* ``faithful``: the algorithm as method-notes §4(b).2 (NTT, Liu & Zenke's code) and §4(b).3 (AWT) specify it.
  The mask starts as the layer-wise top-d |θ₀|. The loss is NTT's full-NTK + output + L2 loss on 32+32 points
  (batch 64), with Adam 5e-4, λ_ker 1e-3, λ_L2 1e-5 (as in ``short``) and output weight 1. Every 100 iterations
  the mask becomes the layer-wise top-d |θ_s|. There are 1100 iterations, so the mask is recomputed 10 times
  (iterations 100, ..., 1000), and the last mask is matched for another 100. AWT matches at PGD points of the
  dense θ₀ (``prune.points``, ``prune.attack_target`` unchanged); NTT at clean points.

[INFERRED] choices of ``faithful`` (each one a key, so it can be changed):
* ``search_iters=1100``. NTT ran 20 epochs of batch 64 (~17,000 iterations on Fashion-MNIST). AWT's length was not
  retrieved. 1100 is the shortest search with 10 mask updates.
* ``allocation=rescope``: the update re-ranks each layer (LayerwiseMagnitude(θ_s, d)). With ``scope=layer`` this
  keeps the same counts per layer as ``fixed``.
* The points are drawn with replacement each iteration (NTT: shuffled epochs), and θ₀ is the model's own
  initialisation (NTT: Glorot-normal weights). Both are deviations, listed in docs/reference-differences.md.
"""
from __future__ import annotations

from ..config import SEARCH_PRESETS

# Keys a preset sets. Their PruneConfig default is None, meaning "the preset's".
PRESET_KEYS = ("scope", "init_method", "search_iters", "search_batch", "search_lr", "ntk_weight", "allocation")
# Keys that both presets leave at their PruneConfig default. Recorded so a report can name the whole search.
SHARED_KEYS = ("output_weight", "l2_weight", "mask_update_every", "ntk_mode", "mode", "points", "attack_target",
               "ticket_weights", "bn_stats", "rescale")
SEARCHED = ("ntt", "awt")

_SHORT = {"search_iters": 20, "search_batch": 4, "search_lr": 5e-3, "ntk_weight": 0.1, "allocation": "fixed"}
_FAITHFUL = {"scope": "layer", "init_method": "magnitude", "search_iters": 1100, "search_batch": 64,
             "search_lr": 5e-4, "ntk_weight": 1e-3, "allocation": "rescope"}
PRESETS = {
    "short": {"ntt": {**_SHORT, "scope": "layer", "init_method": "magnitude"},
              # AWT starts from SynFlow's global mask: at density 0.05 its per-layer budget was the best of the
              # scorers' on digits (docs/results/digits.md)
              "awt": {**_SHORT, "scope": "global", "init_method": "synflow"}},
    "faithful": {"ntt": dict(_FAITHFUL), "awt": dict(_FAITHFUL)},
}
assert tuple(PRESETS) == SEARCH_PRESETS, "config.SEARCH_PRESETS names the presets defined here"
assert all(set(v) == set(PRESET_KEYS) for by_method in PRESETS.values() for v in by_method.values())


def preset_value(cfg, key: str):
    """``prune.<key>`` as the search uses it: the explicit value, else the preset's for ``prune.method``
    (``None`` for a method without a search: the caller's default applies)."""
    p = cfg.prune
    value = getattr(p, key)
    if value is not None or p.method not in SEARCHED:
        return value
    return PRESETS[p.preset][p.method][key]


def search_settings(cfg) -> dict:
    """Every setting of the NTT/AWT search, resolved (``PRESET_KEYS`` through the preset, then ``SHARED_KEYS``)."""
    return {**{k: preset_value(cfg, k) for k in PRESET_KEYS}, **{k: getattr(cfg.prune, k) for k in SHARED_KEYS}}


def preset_record(cfg) -> dict:
    """What a ticket's prune.json records: the preset, every resolved setting, and which keys the user set
    explicitly over the preset (with the preset's value they replaced)."""
    p = cfg.prune
    own = PRESETS[p.preset][p.method]
    overridden = {k: {"value": getattr(p, k), "preset": own[k]} for k in PRESET_KEYS if getattr(p, k) is not None}
    return {"preset": p.preset, "settings": search_settings(cfg), "overridden": overridden}


def mask_update_iterations(search_iters: int, every: int) -> list[int]:
    """Iterations (1-based: after that many Adam steps) at which the mask is recomputed: every ``every`` steps,
    except after the last step (an update there would choose a mask that no step ever matched)."""
    return list(range(every, search_iters, every))
