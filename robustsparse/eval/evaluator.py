"""The one evaluator: every accuracy the library reports comes from here, named with its attack and budget.

Suite items (comma-separated on the CLI):
    clean                 accuracy on unperturbed inputs
    fgsm                  FGSM, α = ε
    pgd-K / pgd-KxR       PGD with K steps and R random restarts (α = ε/4), in the evaluator's norm
    autoattack            the standard AutoAttack cascade at full budget (see attacks/autoattack.py)
    apgd-ce, apgd-t, fab-t, square   one AutoAttack component alone, at full budget

A point counts as robust under an attack only if it is classified correctly both clean and attacked, so every
robust accuracy is ≤ the clean accuracy by construction; attacks spend their budget only on clean-correct points
(and AutoAttack only on points still robust). ``worst_case`` is the pointwise worst case over every attack run.
Everything here runs in fp32 with autocast off, whatever precision the caller trains in (`attacks.base.full_precision`).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..attacks.autoattack import COMPONENTS, describe_component, run_component
from ..attacks.base import attack_mode, full_precision
from ..attacks.fgsm import FGSM
from ..attacks.pgd import PGD
from ..errors import UserError
from ..utils.progress import progress_bar
from . import checks
from .state import EvalState, model_digest

_PGD = re.compile(r"^pgd-(\d+)(?:x(\d+))?$")


@dataclass
class EvalResult:
    n: int
    eps: float
    norm: str
    accuracy: dict[str, float]
    attacks: dict[str, str]
    worst_case: float | None
    autoattack_components: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """Markdown table: one row per attack, with its full budget, then the pointwise worst case."""
        rows = ["| attack (budget) | accuracy |", "|---|---|"]
        for item, acc in self.accuracy.items():
            rows.append(f"| {self.attacks[item]} | {acc:.2%} |")
        if self.worst_case is not None:
            rows.append(f"| worst case over all attacks above (pointwise) | {self.worst_case:.2%} |")
        return "\n".join(rows)


def parse_suite(suite) -> list[str]:
    items = [s.strip().lower() for s in (suite.split(",") if isinstance(suite, str) else suite) if s.strip()]
    if not items:
        raise UserError("the evaluation suite is empty; use e.g. clean,pgd-20,autoattack")
    known = "clean, fgsm, pgd-K, pgd-KxR, autoattack, " + ", ".join(COMPONENTS)
    for item in items:
        if item in ("clean", "fgsm", "autoattack") or item in COMPONENTS:
            continue
        m = _PGD.match(item)
        if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
            raise UserError(f"unknown attack {item!r} in the evaluation suite; known: {known}")
    if len(set(items)) != len(items):
        raise UserError(f"the evaluation suite names an attack twice: {', '.join(items)}")
    return items


def parse_eps(value) -> float:
    """A perturbation budget from a number or text: ``0.1``, ``"0.031"``, ``"8/255"`` (a fraction, as papers
    write ε) -> a finite float > 0. The CLI's ``--eps`` of every command parses through here."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        eps = float(value)
    else:
        text = str(value).strip().replace(" ", "")
        num, slash, den = text.partition("/")
        try:
            eps = float(num) / float(den) if slash else float(text)
        except (ValueError, ZeroDivisionError):
            raise UserError(f"eps must be a number or a fraction such as 8/255, got {value!r}") from None
    if not (math.isfinite(eps) and eps > 0):
        raise UserError(f"eps must be a finite number > 0 (e.g. 8/255 or 0.1), got {value!r}")
    return eps


def describe_item(item: str, eps: float, norm: str, num_classes: int) -> str:
    if item == "clean":
        return "clean (no attack)"
    if item == "fgsm":
        return f"FGSM L∞ eps={eps:.4g} alpha={eps:.4g}"
    if item == "autoattack":
        norm_txt = "L∞" if norm == "Linf" else "L2"
        return (f"AutoAttack standard {norm_txt} eps={eps:.4g} (APGD-CE 100, APGD-T 100×{min(9, num_classes - 1)}, "
                f"FAB-T 100×{min(9, num_classes - 1)}, Square 5000)")
    if item in COMPONENTS:
        return describe_component(item, eps, norm, num_classes)
    steps, restarts = _pgd_budget(item)
    return PGD(nn.Identity(), eps, steps=steps, norm=norm, restarts=restarts).describe()


def _pgd_budget(item: str) -> tuple[int, int]:
    m = _PGD.match(item)
    return int(m.group(1)), int(m.group(2) or 1)


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _correct(model, x, y, batch_size):
    with attack_mode(model):
        return torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                          for i in range(0, len(y), batch_size)])


def _attack_flags(attack, model, x, y, clean_ok, batch_size, chunks):
    """Flags after ``attack`` on the clean-correct points; ``chunks`` runs the resumable chunk loop (state.py)."""
    def attack_chunk(chunk):
        xb, yb = x[chunk], y[chunk]
        x_adv = attack(xb, yb)
        _check_budget(x_adv, xb, attack.eps, attack.norm)
        return _correct(model, x_adv, yb, batch_size)
    return chunks(clean_ok, attack_chunk)


def _chunk_runner(state, state_path, key, batch_size, seed, bar):
    return lambda robust, attack_chunk: state.run_chunks(key, robust, batch_size, attack_chunk, state_path,
                                                         seed=seed, progress=bar.update)


def _check_budget(x_adv, x, eps, norm):
    """Attacks of ours must respect the threat model exactly; a violation is a bug, never a number to report."""
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "Linf" else delta.norm(dim=1)
    if bool((size > eps * (1 + 1e-5) + 1e-6).any()) or bool((x_adv < 0).any() or (x_adv > 1).any()):
        raise RuntimeError("an attack returned a point outside the threat model; this is a bug in robustsparse")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, suite="clean,pgd-20,autoattack",
             eps: float = 8 / 255, norm: str = "Linf", num_classes: int | None = None, batch_size: int = 256,
             seed: int = 0, state_path: str | None = None, progress: bool = True,
             run_checks: bool = True) -> EvalResult:
    """Run a named attack suite on ``model`` over (x, y) and return per-attack and worst-case accuracy.

    ``x`` must be float images in [0, 1]; the model is attacked in eval mode with parameter gradients off, exactly
    as given (for a conditional model, pass the module already configured for its λ/mask/BN path), in fp32:
    autocast is off inside, even if the caller holds a bf16/fp16 autocast context.
    """
    with full_precision(_model_device(model)):
        return _evaluate(model, x, y, suite, eps, norm, num_classes, batch_size, seed, state_path, progress,
                         run_checks)


def _evaluate(model, x, y, suite, eps, norm, num_classes, batch_size, seed, state_path, progress, run_checks):
    items = parse_suite(suite)
    if norm not in ("Linf", "L2"):
        raise UserError(f"norm must be Linf or L2, got {norm!r}")
    if not eps > 0:
        raise UserError(f"eps must be > 0, got {eps}")
    if len(x) == 0 or len(x) != len(y):
        raise UserError(f"evaluation needs as many labels as images and at least one image (got {len(x)}, {len(y)})")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise UserError("evaluation images must lie in [0, 1]; normalisation belongs inside the model")
    if "fgsm" in items and norm != "Linf":
        raise UserError("fgsm is an L∞ attack; drop it from the suite for norm L2")
    device = _model_device(model)
    x, y = x.to(device), y.to(device)
    num_classes = int(num_classes or int(y.max()) + 1)
    signature = {"suite": items, "eps": eps, "norm": norm, "n": len(y), "seed": seed,
                 "labels_sum": int(y.sum()), "x_sum": round(float(x.double().sum()), 4),
                 "model": model_digest(model) if state_path else None}  # hashing the weights only when it matters
    state = EvalState.open(state_path, signature)
    torch.manual_seed(seed)
    warnings: list[str] = []
    if run_checks:
        probe = slice(0, min(len(y), batch_size))
        warnings += checks.check_randomness(model, x[probe]) + checks.check_softmax_output(model, x[probe])
        warnings += checks.check_zero_gradients(model, x[probe], y[probe]) + checks.check_few_classes(num_classes)

    clean_ok = _correct(model, x, y, batch_size)
    flags: dict[str, torch.Tensor] = {}
    aa_components: dict[str, float] = {}
    for item in items:
        start = time.perf_counter()
        if item in state.flags:
            flags[item] = torch.tensor(state.flags[item], device=device)
        elif item == "clean":
            flags[item] = clean_ok
        elif item == "autoattack":
            flags[item] = _autoattack(model, x, y, clean_ok, eps, norm, num_classes, batch_size, seed, state,
                                      state_path, progress, aa_components, warnings)
        else:
            desc = describe_item(item, eps, norm, num_classes)
            with progress_bar(total=int(clean_ok.sum()), desc=desc, enabled=progress) as bar:
                chunks = _chunk_runner(state, state_path, item, batch_size, seed, bar)
                if item in COMPONENTS:
                    flags[item] = run_component(item, model, x, y, clean_ok, eps, norm, num_classes, batch_size,
                                                seed, chunks=chunks)
                else:
                    if item == "fgsm":
                        attack = FGSM(model, eps)
                    else:
                        steps, restarts = _pgd_budget(item)
                        attack = PGD(model, eps, steps=steps, norm=norm, restarts=restarts)
                    flags[item] = _attack_flags(attack, model, x, y, clean_ok, batch_size, chunks)
        if item not in state.flags:
            state.flags[item] = flags[item].tolist()
            state.seconds[item] = time.perf_counter() - start
            state.save(state_path)

    accuracy = {item: flags[item].float().mean().item() for item in items}
    adversarial = [flags[i] for i in items if i != "clean"]
    worst = None
    if adversarial:
        worst = torch.stack(adversarial).all(0).logical_and(clean_ok).float().mean().item()
    if "autoattack" in items:
        warnings += checks.check_pgd_beats_autoattack(
            {describe_item(i, eps, norm, num_classes): accuracy[i] for i in items if _PGD.match(i)},
            accuracy["autoattack"])
    for item in items:
        if accuracy[item] > accuracy.get("clean", accuracy[item]) + 1e-12:  # cannot happen by construction
            raise RuntimeError(f"robust accuracy under {item} exceeds clean accuracy; this is a bug")
    return EvalResult(n=len(y), eps=eps, norm=norm, accuracy=accuracy,
                      attacks={i: describe_item(i, eps, norm, num_classes) for i in items}, worst_case=worst,
                      autoattack_components=aa_components, warnings=warnings, seconds=dict(state.seconds))


def _autoattack(model, x, y, clean_ok, eps, norm, num_classes, batch_size, seed, state, state_path, progress,
                aa_components, warnings):
    robust = clean_ok.clone()
    before_square = None
    for name in COMPONENTS:
        key = f"autoattack/{name}"
        if name == "square":
            before_square = robust.float().mean().item()
        if key in state.flags:
            robust = torch.tensor(state.flags[key], device=robust.device)
        else:
            start = time.perf_counter()
            desc = describe_component(name, eps, norm, num_classes)
            with progress_bar(total=int(robust.sum()), desc=desc, enabled=progress) as bar:
                robust = run_component(name, model, x, y, robust, eps, norm, num_classes, batch_size, seed,
                                       chunks=_chunk_runner(state, state_path, key, batch_size, seed, bar))
            state.flags[key] = robust.tolist()
            state.seconds[key] = time.perf_counter() - start
            state.save(state_path)
        aa_components[name] = robust.float().mean().item()
    warnings += checks.check_black_box_beats_white_box(before_square, aa_components["square"], len(y))
    return robust

