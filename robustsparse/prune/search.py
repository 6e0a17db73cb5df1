"""The NTK-matching ticket search shared by NTT (clean points) and AWT (adversarial points), method-notes §4(b).

For mini-batches split into halves (x₁, x₂) of the search points x̃ (clean for NTT; PGD points of the dense
network at initialisation for AWT), minimise over the student

    L = γ_ker · ‖Θ_{m⊙θ_s}(x₁, x₂) − Θ_{θ₀}(x₁, x₂)‖²_F / numel(Θ)    (empirical NTK distance)
      + γ_out · ‖f(x̃; m⊙θ_s) − f(x̃; θ₀)‖² / numel(f)                (output distance)
      + (γ₂ / d) · ‖m⊙θ_s‖²                                           (weights only)

Two readings of "a sub-network at initialisation" (``prune.mode``):
* ``weights`` (R1, NTT-faithful, default): Adam on θ_s; the loss sees m⊙θ_s; every ``mask_update_every``
  iterations m ← top-d magnitude of θ_s (pruned entries keep their stale values, as in NTT, so they can revive).
  The ticket is (m, m⊙θ_s).
* ``mask_only`` (R2, strict lottery ticket): θ stays θ₀; real scores s (initialised to |θ₀|) select m = TopK(s)
  each step, with a straight-through gradient to s (edge-popup/HYDRA). The ticket is (m, m⊙θ₀).

``prune.ntk_mode``: ``full`` matches Θ ∈ ℝ^{n₁×n₂×K×K}; ``trace`` matches Σ_k Θ_kk; ``projected`` matches
Θ_v(x, x') = (vᵀJ(x))·(vᵀJ(x'))ᵀ with a fresh v ~ N(0, I_K) each step, shared by teacher and student. Θ_v is an
unbiased estimate of the trace NTK, and E_v (vᵀDv)² = 2‖sym D‖²_F + tr(D)² for D = Θ_s − Θ_t at each pair, so
minimising it matches the full kernel's symmetric part at K times less cost [INFERRED: our efficiency choice,
not in NTT/AWT].

All forward passes (attack, outputs, NTK) run in eval mode. ``prune.bn_stats`` [INFERRED; our option] says which
batch-norm statistics that mode uses: ``init`` (the running statistics at initialisation, (0, 1), so BN is the
identity and the kernel is that of the un-normalised network) or ``batch`` (the statistics of the first
``prune.bn_samples`` training images, recomputed for the student before every step from its current weights and
held constant inside the step: the network that training's batch-statistics BN actually sees). ``init`` is the
default by measurement: on digits (seed 0, density 0.1) a ``batch`` search halves the batch-statistics distance
(0.94 to 0.59) but its ticket sat near chance for 10 epochs of PGD-AT and ended at 49.7% PGD-20 (``init``: 87.5%;
with ``prune.rescale=filter`` the ``batch`` tickets reach 78-82% on seeds 0-3).

``prune.rescale`` [INFERRED; our option, rescale.py]: ``none`` (default), ``filter`` (each conv filter feeding a
BN gets back its norm in m⊙θ₀) or ``dense`` (rows rescaled towards the dense kernel under batch-statistics BN).
Both leave the mask alone and were measured worse on digits (docs/results/digits.md).

``prune.allocation`` [INFERRED; our option]: ``fixed`` keeps each layer's kept count at the initial mask's (the
top-d |θ₀| in ``prune.scope``) and lets the updates choose WHICH weights within each layer; ``rescope`` re-ranks
in ``prune.scope`` at every update. Adam moves every weight by about the same absolute amount whatever its
scale, so a global re-ranking drifts towards uniform layer densities, which starve the small first layers.
``prune.init_method`` names the at-init scorer whose mask starts the search (short preset: NTT magnitude, AWT
SynFlow; faithful: magnitude). ``prune.ticket_weights``: ``searched`` (NTT: the ticket starts from m⊙θ_s) or
``init`` (m⊙θ₀).

``prune.preset`` (presets.py) gives the defaults of the scope, the starting scorer, the length, batch, step size,
λ_ker and allocation: ``short`` (default; 20 steps, the mask never moves) or ``faithful`` (method-notes §4(b).2-3:
1100 steps of batch 64, the mask recomputed from |θ_s| 10 times). The ticket's prune.json records the preset, the
resolved settings, every mask update (iteration, fraction of kept weights that changed) and the cost
(search_cost.py: seconds and image passes against one PGD-AT epoch's).

Resumable: every ``prune.checkpoint_every`` iterations the state (weights or scores, Adam, mask, log) is saved
to ``state_dir``; each iteration is seeded from (seed, iteration), so a resumed search equals an uninterrupted one.
"""
from __future__ import annotations

import copy
import os
import signal
import time
from types import SimpleNamespace

import torch
from torch.func import functional_call, grad, vmap

from ..attacks.pgd import PGD
from ..models.bn import calibrate_bn
from ..analysis.ntk import empirical_ntk
from ..utils.heap import retained_heap
from ..utils.progress import progress_bar
from ..runs.checkpoint import load_checkpoint, save_checkpoint
from ..sparse import Mask, apply_mask, prunable_parameters
from ..sparse.mask import _top
from .presets import preset_record, search_settings
from .registry import Ticket, call_pruner, init_method_of, scope_of
from .rescale import rescale_ticket
from .search_cost import search_cost

KILL_AT_ITER_ENV = "ROBUSTSPARSE_KILL_AT_STEP"  # the trainer's fault injection, read as a search iteration here
STATE_LABEL = "search"


def _select(scores: dict, cfg, scope: str) -> Mask:
    from ..sparse.structured import select_mask  # honours prune.structure (unstructured, channel, N:M)
    return select_mask(scores, cfg.prune, scope)


def _select_fixed(scores: dict, counts: dict) -> Mask:
    """Each layer keeps its own top ``counts[name]`` scores (exact, deterministic ties)."""
    return Mask._trusted({n: _top(s.detach().flatten(), counts[n]).reshape(s.shape).float()
                          for n, s in scores.items()})


def _initial_mask(model, cfg, x, y, scope, theta0, names, progress) -> Mask:
    """NTT starts from the top-d |θ₀|; ``prune.init_method`` may name another at-init scorer (same scope)."""
    method = init_method_of(cfg)
    if method == "magnitude":
        return _select({n: theta0[n].abs() for n in names}, cfg, scope)
    init_cfg = copy.deepcopy(cfg)
    init_cfg.prune.method, init_cfg.prune.scope = method, scope
    return call_pruner(method, model, init_cfg, x, y, progress=progress).mask


def _iter_seed(seed: int, it: int) -> int:
    return (seed * 1_000_003 + it * 7919 + 17) % (2 ** 63)


def projected_ntk(model, params: dict, x1, x2, v, masks: dict) -> torch.Tensor:
    """Θ_v[i, j] = ∇_θ(vᵀf(x1_i)) diag(m) ∇_θ(vᵀf(x2_j)), differentiable w.r.t. ``params`` (one row per sample);
    pruned coordinates are dropped (the sparse network's kernel, as in ``empirical_ntk``)."""
    def scalar(p, xi):
        return (functional_call(model, p, (xi[None],))[0] * v).sum()
    per_sample = vmap(grad(scalar), in_dims=(None, 0))
    j1, j2 = per_sample(params, x1), per_sample(params, x2)
    rows = {k: (j1[k] * masks[k], j2[k]) if k in masks else (j1[k], j2[k]) for k in j1}
    return sum(a.flatten(1) @ b.flatten(1).T for a, b in rows.values())


def _ntk(model, params, x1, x2, mode, v, differentiable, masks):
    if mode == "projected":
        return projected_ntk(model, params, x1, x2, v, masks)
    return empirical_ntk(model, x1, x2, params=params, mode=mode, differentiable=differentiable, masks=masks)


class _SearchState:
    """Everything the search holds: teacher (dense θ₀, frozen), student, the mask, what the optimizer trains
    (the student's weights, or scores with ``prune.mode=mask_only``), the attack."""

    def __init__(self, model, cfg, x, y, state_dir, progress: bool):
        p, a = cfg.prune, cfg.attack
        self.cfg, self.p, self.scope = cfg, p, scope_of(cfg)
        self.s = SimpleNamespace(**search_settings(cfg))  # prune.preset resolved: what this search runs with
        self.mask_updates: list[dict] = []  # one record per mask recomputation: iteration, weights that changed
        self.teacher = copy.deepcopy(model).eval()
        for q in self.teacher.parameters():
            q.requires_grad_(False)
        self.student = copy.deepcopy(model).eval()
        self.x_bn = x[: p.bn_samples] if p.bn_stats == "batch" else None
        if self.x_bn is not None:
            calibrate_bn(self.teacher, None, self.x_bn)
        self.names = list(prunable_parameters(self.student))
        self.theta0 = {n: q.detach().clone() for n, q in self.student.named_parameters()}
        self.resuming = state_dir is not None and os.path.exists(os.path.join(state_dir, f"{STATE_LABEL}.json"))
        # resume: the mask is the saved one
        self.mask = None if self.resuming else _initial_mask(model, cfg, x, y, self.scope, self.theta0, self.names,
                                                             progress)
        self.mask_only = p.mode == "mask_only"
        if self.mask_only:
            for q in self.student.parameters():
                q.requires_grad_(False)
            self.scores = {n: self.theta0[n].abs().clone().requires_grad_(True) for n in self.names}
            self.trained = self.scores
        else:
            self.trained = dict(self.student.named_parameters())
        self.optimizer = torch.optim.Adam(self.trained.values(), lr=self.s.search_lr)
        self.attack_model = copy.deepcopy(model).eval() if p.attack_target == "student" else self.teacher
        self.attack = PGD(self.attack_model, a.eps, steps=a.steps, alpha=cfg.train_alpha, norm=a.norm)
        self.teacher_params = dict(self.teacher.named_parameters())
        with torch.no_grad():
            self.f_t_dim = self.teacher(x[:1]).shape[1]

    def start_counts(self) -> None:
        self.counts = {n: int(m.sum()) for n, m in self.mask.items()}  # every update keeps them (allocation=fixed)
        self.fixed = self.s.allocation == "fixed" and getattr(self.p, "structure", "unstructured") == "unstructured"

    def reselect(self, scores):
        return _select_fixed(scores, self.counts) if self.fixed else _select(scores, self.cfg, self.scope)

    def effective_params(self) -> dict:
        if self.mask_only:
            out = dict(self.theta0)
            for n in self.names:  # straight-through: forward uses the 0/1 mask, backward reaches the scores
                m = self.mask[n]
                out[n] = self.theta0[n] * (m + self.scores[n] - self.scores[n].detach())
            return out
        params = dict(self.student.named_parameters())
        return {n: (q * self.mask[n] if n in self.mask else q) for n, q in params.items()}

    def search_points(self, xb, yb, params, points: str):
        """The matched points: clean, adversarial (PGD on the dense θ₀ or the student), or half of each."""
        if points == "clean":
            return xb
        if self.p.attack_target == "student":
            self.attack_model.load_state_dict({**{k: v.detach() for k, v in self.student.state_dict().items()},
                                               **{k: v.detach() for k, v in params.items()}})
        adv = self.attack(xb, yb)
        return adv if points == "adversarial" else torch.cat([xb[: len(xb) // 2], adv[len(xb) // 2:]])

    def matching_loss(self, pts, params, gen):
        """(loss, output term, NTK term): the module docstring's objective on the points ``pts``."""
        p, ntk_weight = self.p, self.s.ntk_weight
        half = len(pts) // 2
        x1, x2 = pts[:half], pts[half:]
        v = torch.randn(self.f_t_dim, generator=gen).to(pts.device) if p.ntk_mode == "projected" else None
        with torch.no_grad():
            f_t = self.teacher(pts)
        ntk_t = None
        if ntk_weight > 0:
            ntk_t = _ntk(self.teacher, self.teacher_params, x1, x2, p.ntk_mode, v, False, {}).detach()
        f_s = functional_call(self.student, params, (pts,))
        out_loss = (f_s - f_t).pow(2).mean()
        loss = p.output_weight * out_loss
        ntk_loss = torch.zeros(())
        if ntk_t is not None:
            ntk_s = _ntk(self.student, params, x1, x2, p.ntk_mode, v, True, dict(self.mask.items()))
            ntk_loss = (ntk_s - ntk_t).pow(2).mean()
            loss = loss + ntk_weight * ntk_loss
        if p.l2_weight > 0:
            loss = loss + p.l2_weight / p.density * sum(params[n].pow(2).sum() for n in self.names)
        return loss, out_loss, ntk_loss

    def update_mask(self, it: int) -> None:
        """mask_only: re-select every step. weights: every ``mask_update_every`` steps (not after the last one),
        m ← top-d |θ_s| (presets.mask_update_iterations); the fraction of kept weights that changed is logged."""
        if self.mask_only:
            self.mask = self.reselect({n: s.detach() for n, s in self.scores.items()})
        elif (it + 1) % self.s.mask_update_every == 0 and it + 1 < self.s.search_iters:
            old = self.mask
            self.mask = self.reselect({n: q.detach().abs() for n, q in self.student.named_parameters()
                                       if n in self.mask})
            changed = sum(int((self.mask[n] > old[n]).sum()) for n in self.names)
            self.mask_updates.append({"iter": it + 1, "changed": changed / max(1, self.mask.kept()),
                                      "density": self.mask.density()})

    def final_ticket(self, model, points: str, log: list, started: float, n_train: int) -> Ticket:
        p, mask = self.p, self.mask
        if self.mask_only or p.ticket_weights == "init":
            final = {k: v.clone() for k, v in self.theta0.items()}
        else:
            final = {k: v.detach().clone() for k, v in self.student.named_parameters()}
        final = rescale_ticket(p.rescale, final, self.theta0, mask, model)
        ticket_model = copy.deepcopy(model)  # the BN buffers stay θ₀'s: training replaces them with its own batches
        ticket_model.load_state_dict({**ticket_model.state_dict(), **final})
        apply_mask(ticket_model, mask)
        state = {k: v.detach().clone() for k, v in ticket_model.state_dict().items()}
        seconds = time.perf_counter() - started
        record = preset_record(self.cfg)
        record["settings"]["points"] = points  # ntt matches at clean points whatever prune.points says
        info = {"points": points, "mode": p.mode, "iters": self.s.search_iters, "allocation": self.s.allocation,
                "init_method": init_method_of(self.cfg), "ticket_weights": p.ticket_weights, "bn_stats": p.bn_stats,
                "rescale": p.rescale, "search_seconds": seconds, **record,
                "cost": search_cost(vars(self.s), self.cfg.attack.steps, self.f_t_dim, points, n_train, seconds),
                "mask_updates": self.mask_updates, "log": log}
        return Ticket(mask=mask, state=state, info=info)


def ntk_search(model, cfg, x, y, points: str, state_dir: str | None = None, progress: bool = True) -> Ticket:
    """Run the search on ``model`` (dense, at θ₀; not modified). ``points``: clean | adversarial | both.
    ``state_dir``: where to keep the resumable state (None: not resumable)."""
    p = cfg.prune
    set_up = time.perf_counter()  # the clock includes the starting mask (AWT short: SynFlow's 100 rounds)
    st = _SearchState(model, cfg, x, y, state_dir, progress)
    iters = st.s.search_iters
    start, log, spent = 0, [], 0.0
    if st.resuming:
        start, log, spent, st.mask, st.mask_updates = _load_state(state_dir, st.trained, st.optimizer, st.names)
    st.start_counts()
    kill_at = int(os.environ.get(KILL_AT_ITER_ENV, "-1"))
    started = time.perf_counter() - spent if st.resuming else set_up
    # retained_heap: every iteration rebuilds Jacobians of hundreds of MB; without it their pages fault in afresh
    with retained_heap(), progress_bar(total=iters, initial=start, desc=f"{cfg.prune.method} search", unit="it",
                                       enabled=progress) as bar:
        for it in range(start, iters):
            if it == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            seed = _iter_seed(p.seed, it)
            torch.manual_seed(seed)  # the attack's random start
            gen = torch.Generator().manual_seed(seed)
            idx = torch.randint(len(y), (st.s.search_batch,), generator=gen).to(y.device)
            params = st.effective_params()
            if st.x_bn is not None:
                calibrate_bn(st.student, params, st.x_bn)  # constants inside the step (as eval mode treats them)
            pts = st.search_points(x[idx], y[idx], params, points)
            loss, out_loss, ntk_loss = st.matching_loss(pts, params, gen)
            st.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            st.optimizer.step()
            st.update_mask(it)
            if it % 10 == 0 or it + 1 == iters:
                log.append({"iter": it, "loss": loss.item(), "output": out_loss.item(), "ntk": ntk_loss.item(),
                            "seconds": time.perf_counter() - started})
            bar.update(1)
            if state_dir is not None and p.checkpoint_every and (it + 1) % p.checkpoint_every == 0 \
                    and it + 1 < iters:
                _save_state(state_dir, it + 1, {"log": log, "mask_updates": st.mask_updates},
                            time.perf_counter() - started, st.trained, st.optimizer, st.mask)
    return st.final_ticket(model, points, log, started, len(y))


def _save_state(folder, it, logs: dict, seconds, trained: dict, optimizer, mask: Mask) -> None:
    tensors = {f"trained.{n}": q.detach() for n, q in trained.items()}
    tensors.update({f"mask.{n}": m for n, m in mask.items()})
    names = list(trained)
    for i, st in optimizer.state_dict()["state"].items():
        for key, val in st.items():
            tensors[f"optim.{names[i]}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    save_checkpoint(folder, STATE_LABEL, tensors, {"iteration": it, **logs, "seconds": seconds})


def _load_state(folder, trained: dict, optimizer, mask_names: list[str]):
    tensors, meta = load_checkpoint(os.path.join(folder, f"{STATE_LABEL}.json"))
    with torch.no_grad():
        for n, q in trained.items():
            q.copy_(tensors[f"trained.{n}"])
    names = list(trained)
    sd = optimizer.state_dict()
    sd["state"] = {}
    for i, n in enumerate(names):
        keys = [k.split(".")[-1] for k in tensors if k.startswith(f"optim.{n}.")]
        if keys:
            sd["state"][i] = {k: tensors[f"optim.{n}.{k}"].clone() for k in keys}
    optimizer.load_state_dict(sd)
    device = next(iter(trained.values())).device
    new_mask = Mask._trusted({n: tensors[f"mask.{n}"].to(device) for n in mask_names})
    return meta["iteration"], meta["log"], meta["seconds"], new_mask, meta.get("mask_updates", [])
