"""``robustsparse bench``: images/second of one PGD-k adversarial-training step, our engine against two plain loops.

All three loops run in the same process on the same device, from the same initial weights, with the same optimizer (SGD,
momentum 0.9, weight decay 5e-4), batch size, data and attack (L∞ PGD-k, ε = 8/255, α = 2.5ε/k, random start):

* **ours** is the trainer's step (`robustsparse.train.engine`): the data are one tensor on the device; per step a
  seeded permutation slice is gathered there, the ``pgd_at`` objective attacks in eval mode with parameter
  gradients off (only ∂loss/∂x), the loss is taken in train mode, then ``zero_grad(set_to_none)``, backward and
  the optimizer step, with the engine's options (CUDA default: channels_last + bf16 autocast). No host sync.
* **skilled** is the loop a skilled PyTorch user writes (`robustsparse.train.skilled_loop`): data as one tensor on
  the device, a permutation per epoch, PGD through ``torch.autograd.grad`` w.r.t. the input only (no weight
  gradients in the attack), SGD with momentum, a cosine LR schedule, no host sync; fp32, NCHW.
* **plain** is the textbook loop: ``DataLoader(TensorDataset(x, y), shuffle=True, drop_last=True)`` over host
  tensors, ``.to(device)`` per batch, fp32; the attack toggles ``model.eval()``, sets ``requires_grad`` on the
  input, calls ``loss.backward()`` (which also computes every parameter gradient, thrown away by the
  ``zero_grad`` that follows) and reads ``x_adv.grad``; then ``model.train()``, the training step, and
  ``loss.item()`` for the running loss.

Timing: ``warmup`` steps of each loop, then ``repeats`` interleaved blocks (the order alternates) of ``iters`` steps
each, with ``torch.cuda.synchronize()`` at both ends of a block on CUDA; the reported rate is the median block.

FLOPs. Forward MACs per image are counted on a real forward (`robustsparse.sparse.sparsity_report`: conv and
linear layers). Convention: a backward costs two forwards (input gradient + weight gradient), so one PGD-k training
step is (k + 1) forward+backward passes = 3(k + 1) forward-equivalents, and the nominal FLOPs per image are
2 · MACs · 3(k + 1); every loop is credited with that count, so nominal FLOP/s ratios equal images/s ratios. The
*executed* count credits each loop with what it computes: ours and skilled skip the weight-gradient half of the k
attack backwards, 2 · MACs · (2k + 3); the textbook loop computes it, 2 · MACs · 3(k + 1). Share of peak =
executed FLOP/s / the machine's nominal peak (`robustsparse.runs.machine`: cores × clock × FLOP/cycle), for fp32
and, where the CPU/GPU has it, bf16.
"""
from __future__ import annotations

import copy
import itertools
import os
import statistics
import time

import torch
import torch.nn.functional as F

from ..config import RunConfig, parse_model_options
from ..errors import UserError
from ..models import build_model
from ..runs.atomic import write_json_atomic
from ..runs.machine import cpu_name, device_peak
from ..sparse import apply_mask, masks_from_scores, prunable_parameters, sparsity_report
from ..train.engine import Engine
from ..train.loop import StepCounts, run_steps, seeded_batches
from ..train.objectives import build_objective
from ..train.skilled_loop import SkilledLoop
from ..utils.device import resolve_device
from ..utils.progress import progress_bar

BENCH_FORMAT = "robustsparse-bench/1"
EPS = 8 / 255
MOMENTUM, WEIGHT_DECAY, LR = 0.9, 5e-4, 0.01


def parse_input_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--input-shape must be C,H,W (three positive integers, e.g. 3,32,32), got {text!r}")
    return shape


def thread_info() -> dict:
    return {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------
# The plain loop, as a tutorial writes it


def plain_step(model, optimizer, x, y, eps: float, alpha: float, steps: int) -> float:
    """One textbook PGD-k adversarial-training step on a batch already on the device; returns ``loss.item()``."""
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        x_adv = x_adv.detach() + alpha * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    optimizer.step()
    return loss.item()


class PlainLoop:
    def __init__(self, model, x, y, batch: int, steps: int, device: torch.device):
        from torch.utils.data import DataLoader, TensorDataset
        self.model, self.device, self.steps = model, device, steps
        self.alpha = 2.5 * EPS / steps
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=batch, shuffle=True, drop_last=True)
        self.running_loss = 0.0

    def run(self, iters: int) -> None:
        batches = iter(self.loader)
        for _ in range(iters):
            try:
                x, y = next(batches)
            except StopIteration:  # a new epoch
                batches = iter(self.loader)
                x, y = next(batches)
            x, y = x.to(self.device), y.to(self.device)
            self.running_loss += plain_step(self.model, self.optimizer, x, y, EPS, self.alpha, self.steps)


# ----------------------------------------------------------------------------------------------------------
# Ours: the trainer's step


def bench_config(steps: int):
    cfg = RunConfig()
    cfg.train.method = "pgd_at"
    cfg.attack.eps, cfg.attack.steps, cfg.attack.norm, cfg.attack.random_start = EPS, steps, "Linf", True
    return cfg


class OurLoop:
    """The trainer's loop (train/loop.py: seeded batches, LR, ``engine.step``, device-side counts), endless over
    epochs, without augmentation (the plain loop has none either)."""

    def __init__(self, model, x, y, batch: int, steps: int, engine, seed: int = 0):
        self.engine, self.batch, self.seed = engine, batch, seed
        self.model = model
        self.objective = build_objective(engine.prepare_model(model), bench_config(steps))
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.x, self.y = x.to(engine.device), y.to(engine.device)
        self.counts = StepCounts(engine.device)  # stays on the device, as in the trainer
        self._batches = self._endless()

    def _endless(self):
        per_epoch = len(self.y) // self.batch
        for epoch in itertools.count():
            yield from seeded_batches(self.x, self.y, self.seed, epoch, 0, per_epoch, self.batch)

    def run(self, iters: int) -> None:
        self.model.train()
        run_steps(itertools.islice(self._batches, iters), self.engine, self.objective, self.optimizer, self.counts,
                  lambda _: LR)


# ----------------------------------------------------------------------------------------------------------


def time_loops(loops: dict, batch: int, iters: int, warmup: int, repeats: int, device: torch.device,
               progress: bool = False, desc: str = "bench") -> dict:
    """Warm each loop up, then time ``repeats`` rounds of ``iters`` steps per loop, the order rotating every round
    (drift on a shared machine then hits every loop alike); per loop: the median block's images/s and all blocks."""
    seconds: dict[str, list[float]] = {k: [] for k in loops}
    names = list(loops)
    total = len(loops) * (repeats + (warmup > 0))
    with progress_bar(total=total, desc=desc, enabled=progress, unit="block") as bar:
        if warmup:
            for loop in loops.values():
                loop.run(warmup)
                _sync(device)
                bar.update(1)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                _sync(device)
                started = time.perf_counter()
                loops[name].run(iters)
                _sync(device)
                seconds[name].append(time.perf_counter() - started)
                bar.update(1)
    results = {}
    for name, secs in seconds.items():
        rates = [batch * iters / s for s in secs]
        rate = statistics.median(rates)
        results[name] = {"images_per_s": rate, "ms_per_step": 1000 * batch / rate, "block_images_per_s": rates}
    return results


def run_bench(model: str = "cnn", input_shape=(1, 8, 8), batch: int = 64, steps: int = 10, device: str = "auto",
              iters: int = 10, warmup: int = 2, repeats: int = 5, num_classes: int = 10,
              model_options: dict | None = None, amp: str = "auto", channels_last: bool | None = None,
              compile: bool = False, threads: int | None = None, density: float | None = None, seed: int = 0,
              progress: bool = True) -> dict:
    """Time both loops (see the module docstring) and return the JSON-ready result."""
    for name, value, lo in (("batch", batch, 1), ("steps", steps, 1), ("iters", iters, 1), ("warmup", warmup, 0),
                            ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise UserError(f"--{name} must be an integer >= {lo}, got {value!r}")
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    input_shape = tuple(input_shape)
    dev = resolve_device(device)
    engine = Engine.create(dev, amp=amp, channels_last=channels_last, compile=compile)
    torch.manual_seed(seed)
    base = build_model(model, input_shape[0], num_classes, input_shape[1:], **(model_options or {})).to(dev)
    if density is not None:  # both loops then run the masked model (mask hooks included)
        apply_mask(base, masks_from_scores({k: p.abs() for k, p in prunable_parameters(base).items()}, density))
    macs = sparsity_report(base, input_shape).dense_macs
    flops_per_image = 2 * macs * 3 * (steps + 1)
    executed = {"ours": 2 * macs * (2 * steps + 3), "skilled": 2 * macs * (2 * steps + 3), "plain": flops_per_image}
    g = torch.Generator().manual_seed(seed)
    n = batch * iters  # one block = one epoch of the plain loop's DataLoader
    x = torch.rand((n, *input_shape), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    total_steps = warmup + repeats * iters  # the skilled loop's cosine schedule spans the whole bench
    loops = {"ours": OurLoop(copy.deepcopy(base), x, y, batch, steps, engine, seed),
             "skilled": SkilledLoop(copy.deepcopy(base), x, y, batch, steps, EPS, LR, total_steps, dev, seed),
             "plain": PlainLoop(copy.deepcopy(base), x, y, batch, steps, dev)}
    del base
    results = time_loops(loops, batch, iters, warmup, repeats, dev, progress, f"bench {model}")
    peak = device_peak(dev, torch.get_num_threads())
    for name, res in results.items():
        res["flops_per_s"] = res["images_per_s"] * flops_per_image
        res["executed_flops_per_s"] = res["images_per_s"] * executed[name]
        res["share_of_peak"] = {p: res["executed_flops_per_s"] / peak[p] if peak.get(p) else None
                                for p in ("fp32", "bf16")}

    def ratios(a, b):  # ratio of medians, and the median of per-round ratios (the loops ran back to back)
        ra, rb = results[a], results[b]
        return ra["images_per_s"] / rb["images_per_s"], statistics.median(
            u / v for u, v in zip(ra["block_images_per_s"], rb["block_images_per_s"]))

    (vs_plain, vs_plain_paired), (vs_skilled, vs_skilled_paired) = ratios("ours", "plain"), ratios("ours", "skilled")
    return {
        "format": BENCH_FORMAT, "model": model, "model_options": dict(model_options or {}),
        "input_shape": list(input_shape), "num_classes": num_classes, "density": density, "batch": batch,
        "attack_steps": steps,
        "eps": EPS, "iters": iters, "warmup": warmup, "repeats": repeats,
        "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "threads": thread_info(), "engine": engine.describe(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "plain": {"precision": "fp32", "data": "DataLoader over host TensorDataset, num_workers=0"},
        "skilled": {"precision": "fp32", "data": "one tensor on the device, a permutation per epoch",
                    "attack": "torch.autograd.grad w.r.t. the input only", "schedule": "cosine, per step"},
        "forward_macs_per_image": macs, "flops_per_image": flops_per_image, "executed_flops_per_image": executed,
        "flop_convention": "2 * forward MACs * 3 * (k + 1): k attack steps + 1 training step, backward = 2 forwards",
        "executed_flop_convention": "ours, skilled: 2 * MACs * (2k + 3) (attack backwards skip weight gradients); "
                                    "plain: 2 * MACs * 3 * (k + 1)",
        "peak": peak,
        "results": results, "speedup": vs_plain, "speedup_paired_median": vs_plain_paired,
        "speedup_vs_skilled": vs_skilled, "speedup_vs_skilled_paired_median": vs_skilled_paired,
    }


def _share(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def format_table(r: dict) -> str:
    eng = r["engine"]
    ours = f"ours ({eng['amp']}{', channels_last' if eng['channels_last'] else ''}" \
           f"{', compiled' if eng['compile'] else ''})"
    peak = r["peak"]
    lines = [f"robustsparse bench: {r['model']} {'x'.join(map(str, r['input_shape']))}, batch {r['batch']}, one "
             f"PGD-{r['attack_steps']} training step; {r['device']} ({r['device_name']}), torch {r['torch']}, "
             f"{r['threads']['torch_threads']} thread(s)",
             "", f"| loop | images/s (median of {r['repeats']}) | ms/step | GFLOP/s nominal | GFLOP/s executed | "
                 "share of fp32 peak | share of bf16 peak |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("ours", ours), ("skilled", "skilled plain loop (fp32, data on device, input-only grad)"),
                        ("plain", "plain PyTorch loop (fp32, DataLoader)")):
        res = r["results"][name]
        share = res["share_of_peak"]
        lines.append(f"| {label} | {res['images_per_s']:.1f} | {res['ms_per_step']:.1f} | "
                     f"{res['flops_per_s'] / 1e9:.2f} | {res['executed_flops_per_s'] / 1e9:.2f} | "
                     f"{_share(share['fp32'])} | {_share(share['bf16'])} |")
    fmt = lambda v: "-" if v is None else f"{v / 1e9:.0f}"  # noqa: E731
    lines += ["", f"Speed-up, ours / plain: {r['speedup']:.2f}x (ratio of the medians; median of the per-round "
                  f"ratios {r['speedup_paired_median']:.2f}x). Ours / skilled: {r['speedup_vs_skilled']:.2f}x "
                  f"(per-round {r['speedup_vs_skilled_paired_median']:.2f}x).",
              f"FLOPs per image: {r['flops_per_image'] / 1e6:.1f} M nominal ({r['flop_convention']}; forward MACs "
              f"{r['forward_macs_per_image'] / 1e6:.2f} M); executed: {r['executed_flop_convention']}.",
              f"Peak ({peak.get('model')}): fp32 {fmt(peak.get('fp32'))} GFLOP/s, bf16 {fmt(peak.get('bf16'))} "
              f"GFLOP/s; {peak['formula']}."]
    if r.get("load_average"):
        lines.append(f"Load average at the end: {', '.join(f'{v:.2f}' for v in r['load_average'])}.")
    return "\n".join(lines)


def bench_command(args) -> int:
    """The CLI's ``bench`` (training step); ``--inference`` is handled by `robustsparse.export`. Options the
    parser leaves at None (shared with ``--inference``, whose defaults differ) take the training defaults here."""
    def given(value, default):
        return default if value is None else value

    result = run_bench(given(args.model, "cnn"), parse_input_shape(given(args.input_shape, "1,8,8")), args.batch,
                       args.steps, args.device, args.iters, given(args.warmup, 2), given(args.repeats, 5),
                       given(args.num_classes, 10), parse_model_options(args.model_option), args.amp,
                       args.channels_last, args.compile, args.threads, args.density, progress=not args.no_progress)
    print(format_table(result))
    if args.json:
        write_json_atomic(args.json, result, sort_keys=False)
    return 0
