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

The protocol (``autoattack_n``): every item runs on all the points given, except that AutoAttack and its
components alone may run on the first ``autoattack_n`` of them, the fixed subset of Croce et al. (the first 1,000
test points) next to clean and PGD-20 on all 10,000. Every result records the points of each item
(``EvalResult.points``), every table names them, and ``worst_case`` is then taken over the subset, the only
points on which every attack ran (``worst_case_points``).
Everything here runs in fp32 with autocast off, whatever precision the caller trains in (`attacks.base.full_precision`).

How the model is run on CPU, never what is attacked (docs/benchmarks.md, "Evaluator"):
* micro-batches (``micro_batch``; None = auto): inside each chunk of ``batch_size`` points the model runs as many
  images at a time as keep its largest activation map under ACTIVATION_BUDGET_BYTES (72 for the Fashion-MNIST
  SmallCNN): an attack step ~2× faster at the fmnist chunk of 500. The chunks and their seeded draws are unchanged
  and each image's arithmetic is the same. ``ROBUSTSPARSE_EVAL_MICRO_BATCH=0`` turns it off;
* NHWC weights (``channels_last``; None = auto, for models with convolutions, `attacks.base.channels_last_weights`):
  oneDNN's NHWC forward is ~1.5-1.7× its NCHW forward on thin layers (Square, the clean checks); the same fp32
  products summed in another order, so a flag can differ from an NCHW evaluation only at a margin point (none of
  200 did, per component). ``ROBUSTSPARSE_EVAL_CHANNELS_LAST=0`` (or ``channels_last=False``) evaluates in NCHW.
Both are recorded in the result (``layout``, ``micro_batch``); the layout also in the resumable state, and a state
written before layouts were recorded resumes in NCHW, the layout it was written in.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..attacks.autoattack import COMPONENTS, describe_component, run_component
from ..attacks.base import MicroBatched, activation_bytes_per_image, attack_mode, channels_last_weights, full_precision
from ..attacks.fgsm import FGSM
from ..attacks.pgd import PGD
from ..errors import UserError
from ..utils.progress import progress_bar
from . import checks
from .state import EvalState, model_digest

_PGD = re.compile(r"^pgd-(\d+)(?:x(\d+))?$")
CHANNELS_LAST_ENV = "ROBUSTSPARSE_EVAL_CHANNELS_LAST"  # 0: NCHW, 1: NHWC, whatever auto would choose
MICRO_BATCH_ENV = "ROBUSTSPARSE_EVAL_MICRO_BATCH"  # images per forward inside an attack; 0: the whole chunk
# On CPU, a forward's largest activation map is kept under this many bytes: 64 Fashion-MNIST SmallCNN images
# (86.5 KB each in conv1's output) ran 2× faster per image than 500 (the fmnist configs' eval.batch_size) on a
# Zen 5 with 32 MB of L3 (docs/benchmarks.md, "Evaluator").
ACTIVATION_BUDGET_BYTES = 6 * 2**20
AUTOATTACK_ITEMS = ("autoattack", *COMPONENTS)  # the items ``autoattack_n`` restricts


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
    points: dict[str, int] = field(default_factory=dict)  # item -> the number of points it ran on (the first ones)
    worst_case_points: int | None = None  # the points ``worst_case`` is taken over (those every attack ran on)
    clean_on_subset: float | None = None  # clean accuracy on the AutoAttack subset, when it is one
    layout: str = "nchw"  # the weights' memory layout the attacks ran in: nchw | channels_last
    micro_batch: int | None = None  # images per forward inside the attacks (None: each chunk whole)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """Markdown table: one row per attack, with its full budget and its points, then the pointwise worst case."""
        rows = ["| attack (budget) | points | accuracy |", "|---|---:|---:|"]
        for item, acc in self.accuracy.items():
            rows.append(f"| {self.attacks[item]} | {points_text(self.points.get(item, self.n), self.n)} | {acc:.2%} |")
        if self.clean_on_subset is not None:
            k = self.worst_case_points
            rows.append(f"| clean (no attack), on the AutoAttack points | {points_text(k, self.n)} | "
                        f"{self.clean_on_subset:.2%} |")
        if self.worst_case is not None:
            rows.append(f"| worst case over all attacks above (pointwise) | "
                        f"{points_text(self.worst_case_points or self.n, self.n)} | {self.worst_case:.2%} |")
        return "\n".join(rows)


def points_text(points: int, n: int) -> str:
    """``10,000`` for all the points, ``first 1,000`` for a prefix of them."""
    return f"{points:,}" if points >= n else f"first {points:,}"


def column_label(result: dict, item: str) -> str:
    """A table column's header for ``item`` of a result dict (``EvalResult.to_dict``, an eval.json, a sweep point):
    attack, budget and the points it ran on. Results written before points were recorded name no points."""
    desc = result["attacks"][item]
    points = result.get("points", {}).get(item)
    if points is None:
        return desc
    n = result.get("n", points)
    return f"{desc}, {points:,} points" if points >= n else f"{desc}, first {points:,} of {n:,} points"


def subset_size(autoattack_n, n: int) -> int | None:
    """``autoattack_n`` checked against the ``n`` points evaluated: None (all of them) or 1 ≤ k < n (k = n is
    normalised to None, so that the state and the result are those of an evaluation without a subset)."""
    if autoattack_n is None:
        return None
    if isinstance(autoattack_n, bool) or not isinstance(autoattack_n, int) or not 1 <= autoattack_n <= n:
        raise UserError(f"autoattack_n (eval.autoattack_n, --autoattack-n) must be an integer from 1 to the {n:,} "
                        f"points evaluated, got {autoattack_n!r}; use null (--autoattack-n all) for the same points "
                        "as the other attacks")
    return None if autoattack_n == n else int(autoattack_n)


def is_autoattack_item(item: str) -> bool:
    """True for the suite items that run on the AutoAttack subset (``autoattack_n``): AutoAttack and its parts."""
    return item == "autoattack" or item in COMPONENTS


def point_count(value, default, flag: str) -> int | None:
    """A number of points from a caller: None takes ``default`` (the run's config), ``"all"`` means every point
    (None), else an integer ≥ 1."""
    if value is None:
        return default
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise UserError(f"{flag} must be a positive integer or all, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag} must be >= 1 (or all), got {value!r}")
    return value


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
             run_checks: bool = True, autoattack_n: int | None = None,
             channels_last: bool | None = None, micro_batch: int | None = None) -> EvalResult:
    """Run a named attack suite on ``model`` over (x, y) and return per-attack and worst-case accuracy.

    ``x`` must be float images in [0, 1]; the model is attacked in eval mode with parameter gradients off, exactly
    as given (for a conditional model, pass the module already configured for its λ/mask/BN path), in fp32:
    autocast is off inside, even if the caller holds a bf16/fp16 autocast context. ``autoattack_n`` runs
    AutoAttack (and its components alone) on the first ``autoattack_n`` points only, the others on all.
    ``channels_last`` (None: auto, see the module docstring) runs every attack with the weights in NHWC memory;
    ``micro_batch`` (None: auto) runs the model that many images at a time inside each chunk of ``batch_size``:
    the same per-image computation (the chunks, and so every random draw, stay those of ``batch_size``).
    """
    device = _model_device(model)
    nhwc = _use_channels_last(channels_last, model, device, state_path)
    with full_precision(device), channels_last_weights(model, nhwc):
        micro = _micro_batch(micro_batch, model, x, device, batch_size)
        attacked = MicroBatched(model, micro) if micro else model
        result = _evaluate(model, attacked, x, y, suite, eps, norm, num_classes, batch_size, seed, state_path,
                           progress, run_checks, autoattack_n, "channels_last" if nhwc else None)
    result.layout, result.micro_batch = ("channels_last" if nhwc else "nchw"), micro
    return result


def _micro_batch(requested, model, x, device, batch_size) -> int | None:
    """The caller's choice, else the environment's, else auto: on CPU, as many images as keep the largest
    activation map under ACTIVATION_BUDGET_BYTES (at least 8); None when that is the whole chunk anyway."""
    if requested is None and os.environ.get(MICRO_BATCH_ENV, "").strip().isdigit():
        requested = int(os.environ[MICRO_BATCH_ENV])
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
            raise UserError(f"micro_batch must be an integer >= 0 (0: no splitting), got {requested!r}")
        return requested if 0 < requested < batch_size else None
    if device.type != "cpu" or len(x) == 0:
        return None
    size = max(8, ACTIVATION_BUDGET_BYTES // activation_bytes_per_image(model, x[0].to(device)))
    return size if size < batch_size else None


def _use_channels_last(requested, model, device, state_path) -> bool:
    """The caller's choice, else the environment's, else auto: on CPU when the model has 4-D weights, unless an
    evaluation state written before layouts were recorded is being resumed (it was written in NCHW)."""
    if requested is None and os.environ.get(CHANNELS_LAST_ENV, "").strip() in ("0", "1"):
        requested = os.environ[CHANNELS_LAST_ENV].strip() == "1"
    if requested is not None:
        return bool(requested)
    if device.type != "cpu" or not any(p.dim() == 4 for p in model.parameters()):
        return False
    stored = EvalState.stored_signature(state_path)
    return stored is None or "layout" in stored


def _evaluate(model, attacked, x, y, suite, eps, norm, num_classes, batch_size, seed, state_path, progress,
              run_checks, autoattack_n, layout):
    """``model`` is what is evaluated (its digest keys the state, the checks probe it); ``attacked`` is the same
    function as the attacks run it (micro-batched or not)."""
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
    subset = subset_size(autoattack_n, len(y))
    device = _model_device(model)
    x, y = x.to(device), y.to(device)
    num_classes = int(num_classes or int(y.max()) + 1)
    signature = {"suite": items, "eps": eps, "norm": norm, "n": len(y), "seed": seed,
                 "labels_sum": int(y.sum()), "x_sum": round(float(x.double().sum()), 4),
                 "model": model_digest(model) if state_path else None}  # hashing the weights only when it matters
    if subset is not None:  # only then: a state written before the subset existed stays valid for all points
        signature["autoattack_n"] = subset
    if layout is not None:  # likewise: NCHW states written before layouts were recorded stay valid
        signature["layout"] = layout
    state = EvalState.open(state_path, signature)
    torch.manual_seed(seed)
    warnings: list[str] = []
    if run_checks:
        probe = slice(0, min(len(y), batch_size))
        warnings += checks.check_randomness(model, x[probe]) + checks.check_softmax_output(model, x[probe])
        warnings += checks.check_zero_gradients(model, x[probe], y[probe]) + checks.check_few_classes(num_classes)

    clean_ok = _correct(attacked, x, y, batch_size)
    flags: dict[str, torch.Tensor] = {}
    aa_components: dict[str, float] = {}
    for item in items:
        start = time.perf_counter()
        k = subset if subset is not None and item in AUTOATTACK_ITEMS else len(y)
        if item in state.flags:
            flags[item] = torch.tensor(state.flags[item], device=device)
        elif item == "clean":
            flags[item] = clean_ok
        elif item == "autoattack":
            flags[item] = _autoattack(attacked, x[:k], y[:k], clean_ok[:k], eps, norm, num_classes, batch_size, seed,
                                      state, state_path, progress, aa_components, warnings)
        else:
            flags[item] = _run_item(item, attacked, x[:k], y[:k], clean_ok[:k], eps, norm, num_classes, batch_size,
                                    seed, state, state_path, progress)
        if item not in state.flags:
            state.flags[item] = flags[item].tolist()
            state.seconds[item] = time.perf_counter() - start
            state.save(state_path)
    return _result(items, flags, clean_ok, eps, norm, num_classes, aa_components, warnings, state.seconds)


def _run_item(item, model, x, y, clean_ok, eps, norm, num_classes, batch_size, seed, state, state_path, progress):
    """Flags of one attack other than the AutoAttack cascade, on the clean-correct points of (x, y)."""
    desc = describe_item(item, eps, norm, num_classes)
    with progress_bar(total=int(clean_ok.sum()), desc=desc, enabled=progress) as bar:
        chunks = _chunk_runner(state, state_path, item, batch_size, seed, bar)
        if item in COMPONENTS:
            return run_component(item, model, x, y, clean_ok, eps, norm, num_classes, batch_size, seed,
                                 chunks=chunks)
        if item == "fgsm":
            attack = FGSM(model, eps)
        else:
            steps, restarts = _pgd_budget(item)
            attack = PGD(model, eps, steps=steps, norm=norm, restarts=restarts)
        return _attack_flags(attack, model, x, y, clean_ok, batch_size, chunks)


def _result(items, flags, clean_ok, eps, norm, num_classes, aa_components, warnings, seconds) -> EvalResult:
    """Accuracies, points and the pointwise worst case from per-point flags. Each item's flags cover the first
    ``len(flags[item])`` points, so the worst case and the PGD-vs-AutoAttack check use the points all attacks share."""
    n = len(clean_ok)
    points = {item: len(flags[item]) for item in items}
    for item in items:  # robust implies clean-correct, pointwise; cannot fail by construction
        if bool((flags[item] & ~clean_ok[:points[item]]).any()):
            raise RuntimeError(f"a point robust under {item} is misclassified clean; this is a bug")
    accuracy = {item: flags[item].float().mean().item() for item in items}
    adversarial = [i for i in items if i != "clean"]
    shared = min((points[i] for i in adversarial), default=n)
    worst = None
    if adversarial:
        worst = torch.stack([flags[i][:shared] for i in adversarial]).all(0).float().mean().item()
    if "autoattack" in items:
        k = points["autoattack"]
        warnings += checks.check_pgd_beats_autoattack(
            {describe_item(i, eps, norm, num_classes): flags[i][:k].float().mean().item()
             for i in items if _PGD.match(i)}, accuracy["autoattack"])
    return EvalResult(n=n, eps=eps, norm=norm, accuracy=accuracy,
                      attacks={i: describe_item(i, eps, norm, num_classes) for i in items}, worst_case=worst,
                      autoattack_components=aa_components, warnings=warnings, seconds=dict(seconds), points=points,
                      worst_case_points=shared if adversarial else None,
                      clean_on_subset=clean_ok[:shared].float().mean().item() if shared < n else None)


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

