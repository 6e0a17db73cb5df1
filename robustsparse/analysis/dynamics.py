"""Dynamics diagnostics (AWT's claim that a ticket "preserves the dynamics of adversarial training").

With ``train.probe_every = N`` a run records, at initialisation and every N epochs, the empirical NTK
Θ(x̃, x̃) ∈ ℝ^{P×P×K×K} and the outputs f(x̃) on a fixed probe set x̃ of P = 16 adversarial points (the first val
images, PGD-attacked against the DENSE network at initialisation, rebuilt from the run's seed, so a ticket run and
its dense run share the probe exactly). ``dynamics_distances`` then gives, per recorded epoch,

    ‖Θ_ticket − Θ_dense‖_F / ‖Θ_dense‖_F   and   ‖f_ticket − f_dense‖_F / ‖f_dense‖_F,

and ``plot_dynamics`` overlays them with the robust training/validation curves of both runs.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..runs.atomic import replace_durably, savefig_atomic

FILE = "dynamics.safetensors"
PROBE_POINTS = 16


def make_probe(cfg, dense_init) -> torch.Tensor:
    """The fixed adversarial probe set of a config (deterministic given data, seed and attack)."""
    from ..attacks.pgd import PGD
    from ..data import load_split
    x, y = load_split(cfg, "val")
    if len(y) == 0:
        x, y = load_split(cfg, "train")
    device = next(dense_init.parameters()).device
    x, y = x[:PROBE_POINTS].to(device), y[:PROBE_POINTS].to(device)
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.train.seed)
    probe = PGD(dense_init, cfg.attack.eps, steps=cfg.attack.steps, alpha=cfg.train_alpha, norm=cfg.attack.norm)(x, y)
    torch.random.set_rng_state(state)  # the probe must not shift the training run's random stream
    return probe


class DynamicsRecorder:
    def __init__(self, run_dir: str, probe: torch.Tensor):
        self.path = os.path.join(run_dir, FILE)
        self.probe = probe
        self.tensors = load_file(self.path) if os.path.exists(self.path) else {"probe": probe.cpu()}

    @torch.no_grad()
    def record(self, model, epoch: int) -> None:
        """Store Θ and f on the probe after ``epoch`` epochs (0 = initialisation)."""
        from .ntk import empirical_ntk
        was_training = model.training
        model.eval()
        self.tensors[f"ntk.{epoch}"] = empirical_ntk(model, self.probe).cpu()
        self.tensors[f"out.{epoch}"] = model(self.probe).cpu()
        model.train(was_training)
        tmp = self.path + ".tmp"
        save_file(self.tensors, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        replace_durably(tmp, self.path)


def dynamics_distances(run_dir: str, dense_dir: str) -> list[dict]:
    """Relative NTK and output distances of a run to the dense run, at every epoch both recorded."""
    a, b = (_load(d) for d in (run_dir, dense_dir))
    if not torch.equal(a["probe"], b["probe"]):
        raise UserError(f"{run_dir} and {dense_dir} used different probe sets (different data, seed or attack)")
    epochs = sorted(int(k.split(".")[1]) for k in a if k.startswith("ntk.") and k in b)
    rows = []
    for e in epochs:
        rows.append({"epoch": e,
                     "ntk_distance": float((a[f"ntk.{e}"] - b[f"ntk.{e}"]).norm() / b[f"ntk.{e}"].norm()),
                     "output_distance": float((a[f"out.{e}"] - b[f"out.{e}"]).norm() / b[f"out.{e}"].norm())})
    return rows


def _load(run_dir: str) -> dict:
    path = os.path.join(run_dir, FILE)
    if not os.path.exists(path):
        raise UserError(f"{run_dir} has no dynamics record; train it with train.probe_every=1")
    return load_file(path)


def plot_dynamics(runs: dict[str, str], dense_dir: str, path: str) -> str:
    """One figure: NTK distance, output distance and val robust accuracy per epoch for each run vs dense."""
    from ..runs.logger import read_metrics
    from ..runs.plots import pyplot
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for label, run_dir in runs.items():
        rows = dynamics_distances(run_dir, dense_dir)
        axes[0].plot([r["epoch"] for r in rows], [r["ntk_distance"] for r in rows], marker=".", label=label)
        axes[1].plot([r["epoch"] for r in rows], [r["output_distance"] for r in rows], marker=".", label=label)
    for label, run_dir in {"dense": dense_dir, **runs}.items():
        m = [r for r in read_metrics(run_dir) if "val_robust_acc" in r]
        axes[2].plot([r["epoch"] + 1 for r in m], [r["val_robust_acc"] for r in m], marker=".", label=label)
    titles = ["‖Θ − Θ_dense‖/‖Θ_dense‖ on the adversarial probe", "‖f − f_dense‖/‖f_dense‖ on the probe",
              "val robust accuracy (training's PGD-k)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path
