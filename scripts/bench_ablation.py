"""What each change buys in one PGD-AT step, measured alone: the textbook loop changed one thing at a time, then our
engine with one option at a time, all timed in one run with `robustsparse bench`'s harness (same init, data and
attack; interleaved blocks, the order rotating; median block).

    python scripts/bench_ablation.py [--model cnn --model-option width=32 --input-shape 1,28,28 --batch 128
                                      --steps 10 --iters 2 --repeats 3 --json PATH]

    textbook           DataLoader on the host, loss.backward() in the attack (parameter gradients computed), .item()
    textbook+input grad   the attack takes torch.autograd.grad(loss, x_adv): no parameter gradients
    textbook+on device    ... and the data are one tensor on the device, batches gathered by index
    textbook+no sync      ... and the running loss stays on the device (no .item() per step)
    skilled            robustsparse.train.skilled_loop (what a skilled user writes; fp32)
    ours fp32          the trainer's step (robustsparse.train.engine), fp32, NCHW, eager: the reference below
    ours +channels_last / +compile / +bf16 / batch x2 / batch /2     one option changed alone
    ours bf16+channels_last+compile   everything on together

Then the validation attack: images/s of a clean forward + PGD-K on every point (fp32, eval mode, as the trainer
validates, before the evaluator's skipping of misclassified points), and what one validation pass over
--val-size points costs against one training epoch over --train-points.
Model: any registered name (``--model smallcnn`` once it exists); ``--input-shape`` picks the image size.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F

import robustsparse as rs
from robustsparse.config import parse_model_options
from robustsparse.pipelines.bench import (EPS, LR, MOMENTUM, WEIGHT_DECAY, OurLoop, PlainLoop, parse_input_shape,
                                          thread_info, time_loops)
from robustsparse.runs.machine import cpu_name
from robustsparse.train.engine import Engine
from robustsparse.train.skilled_loop import SkilledLoop


class Variant:
    """The textbook loop with some of its three costs removed (see the module docstring)."""

    def __init__(self, model, x, y, batch, steps, device, input_grad, on_device, sync):
        self.model, self.batch, self.steps, self.device = model, batch, steps, device
        self.input_grad, self.on_device, self.sync = input_grad, on_device, sync
        self.alpha = 2.5 * EPS / steps
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.plain = PlainLoop(model, x, y, batch, steps, device)  # its DataLoader
        self.x, self.y = x.to(device), y.to(device)
        self.loss_sum = torch.zeros((), device=device)
        self.running_loss = 0.0

    def batches(self, iters):
        if self.on_device:
            perm = torch.randperm(len(self.y), device=self.device)
            for i in range(iters):
                idx = perm[(i * self.batch) % len(self.y):][:self.batch]
                yield self.x[idx], self.y[idx]
        else:
            it = iter(self.plain.loader)
            for _ in range(iters):
                x, y = next(it)
                yield x.to(self.device), y.to(self.device)

    def run(self, iters):
        for x, y in self.batches(iters):
            self.model.eval()
            x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                loss = F.cross_entropy(self.model(x_adv), y)
                if self.input_grad:
                    (grad,) = torch.autograd.grad(loss, x_adv)
                else:
                    loss.backward()
                    grad = x_adv.grad
                x_adv = x_adv.detach() + self.alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
            self.model.train()
            self.opt.zero_grad()
            loss = F.cross_entropy(self.model(x_adv), y)
            loss.backward()
            self.opt.step()
            if self.sync:
                self.running_loss += loss.item()
            else:
                self.loss_sum += loss.detach()


def build_loops(base, x, y, batch, steps, device):
    """name -> (loop, images per step); every loop starts from a copy of ``base``."""
    loops = {}
    for name, flags in (("textbook", (False, False, True)), ("textbook+input grad", (True, False, True)),
                        ("textbook+on device", (True, True, True)), ("textbook+no sync", (True, True, False))):
        loops[name] = (Variant(copy.deepcopy(base), x, y, batch, steps, device, *flags), batch)
    loops["skilled"] = (SkilledLoop(copy.deepcopy(base), x, y, batch, steps, EPS, LR, 1000, device), batch)
    engines = {"ours fp32": ({}, batch), "ours +channels_last": ({"channels_last": True}, batch),
               "ours +compile": ({"compile": True}, batch), "ours +bf16": ({"amp": "bf16"}, batch),
               f"ours batch {2 * batch}": ({}, 2 * batch), f"ours batch {batch // 2}": ({}, max(1, batch // 2)),
               "ours bf16+channels_last": ({"amp": "bf16", "channels_last": True}, batch),
               "ours bf16+channels_last+compile": ({"amp": "bf16", "channels_last": True, "compile": True}, batch)}
    for name, (options, b) in engines.items():
        engine = Engine.create(device, **{"amp": "fp32", "channels_last": False, **options})
        loops[name] = (OurLoop(copy.deepcopy(base), x, y, b, steps, engine), b)
    return loops


def validation_cost(base, shape, steps, val_points, device):
    """images/s of the trainer's validation at its worst: a clean forward, then PGD-k (ε = 8/255, fp32, eval mode)
    on every point. The evaluator attacks only clean-correct points, so a trained model's validation costs about
    its clean accuracy times this; timing an untrained model through rs.evaluate would attack ~10% of the points
    and flatter the attack. Median of 3 runs."""
    from robustsparse.attacks.pgd import PGD
    model = copy.deepcopy(base).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand((val_points, *shape), generator=g).to(device), torch.randint(0, 10, (val_points,), generator=g)
    y = y.to(device)
    attack = PGD(model, EPS, steps=steps)
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(0, val_points, 256):  # the evaluator's default batch
            with torch.no_grad():
                model(x[i:i + 256])
            attack(x[i:i + 256], y[i:i + 256])
        rates.append(val_points / (time.perf_counter() - start))
    return sorted(rates)[1]


def paired(res, a, b):
    """Median over rounds of a's block rate / b's in the same round: the loops of a round run back to back, so
    load that drifts over minutes cancels (the ratio of medians does not cancel it)."""
    import statistics
    return statistics.median(u / v for u, v in zip(res[a]["block_images_per_s"], res[b]["block_images_per_s"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--model-option", action="append", default=None, help="KEY=VALUE (default width=32 for cnn)")
    p.add_argument("--input-shape", default="1,28,28")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per loop (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--val-steps", type=int, default=10, help="the validation attack's PGD steps")
    p.add_argument("--val-points", type=int, default=512, help="points timed for the validation attack")
    p.add_argument("--train-points", type=int, default=55000, help="an epoch, for the validation share")
    p.add_argument("--val-size", type=int, default=5000, help="validation points per epoch, for its share")
    p.add_argument("--skip", action="append", default=[], metavar="TEXT",
                   help="leave out the variants whose name contains TEXT (e.g. compile: minutes of compilation "
                        "on a busy CPU)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    shape = parse_input_shape(a.input_shape)
    options = parse_model_options(a.model_option if a.model_option is not None else
                                  (["width=32"] if a.model == "cnn" else []))
    device = torch.device("cpu")
    torch.manual_seed(0)
    base = rs.build_model(a.model, shape[0], 10, shape[1:], **options)
    g = torch.Generator().manual_seed(0)
    n = 2 * a.batch * a.iters  # the batch x2 loop needs iters full batches per epoch
    x, y = torch.rand((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g)
    loops = {k: v for k, v in build_loops(base, x, y, a.batch, a.steps, device).items()
             if not any(text in k for text in a.skip)}
    if "ours fp32" not in loops:  # checked before minutes of timing, not after
        raise SystemExit("--skip left out 'ours fp32', the reference every ratio is taken against")
    res = time_loops({k: v[0] for k, v in loops.items()}, a.batch, a.iters, a.warmup, a.repeats, device,
                     progress=True, desc="ablation")
    for name, (_, b) in loops.items():  # time_loops counts a.batch images per step; rescale the other batch sizes
        r = res[name]
        r["batch"] = b
        r["block_images_per_s"] = [v * b / a.batch for v in r["block_images_per_s"]]
        r["images_per_s"] *= b / a.batch
    val_rate = validation_cost(base, shape, a.val_steps, a.val_points, device)
    report = {"model": a.model, "model_options": options, "input_shape": list(shape), "batch": a.batch,
              "attack_steps": a.steps, "iters": a.iters, "repeats": a.repeats, "cpu": cpu_name(),
              "threads": thread_info(), "torch": torch.__version__, "load_average": list(os.getloadavg()),
              "results": res, "validation_images_per_s": val_rate}
    ours = res["ours fp32"]["images_per_s"]
    ref = res["textbook"]["images_per_s"] if "textbook" in res else float("nan")  # --skip textbook: no column
    print(f"{a.model} {options} {a.input_shape}, batch {a.batch}, PGD-{a.steps}, {torch.get_num_threads()} "
          f"thread(s), {cpu_name()}, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| variant | images/s | vs textbook | vs ours fp32 | vs ours fp32, per-round median |\n"
          "|---|---:|---:|---:|---:|")
    for name, r in res.items():
        r["paired_vs_ours_fp32"] = paired(res, name, "ours fp32")
        print(f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / ref:.2f}x | "
              f"{r['images_per_s'] / ours:.2f}x | {r['paired_vs_ours_fp32']:.2f}x |")
    epoch_s, val_s = a.train_points / ours, a.val_size / val_rate
    print(f"\nvalidation (clean + PGD-{a.val_steps} on every point, fp32): {val_rate:.1f} images/s; "
          f"{a.val_size} points = "
          f"{val_s:.0f} s against {epoch_s:.0f} s for an epoch of {a.train_points} (ours fp32): "
          f"{val_s / epoch_s:.1%} of an epoch")
    report.update(validation_seconds=val_s, epoch_seconds_ours_fp32=epoch_s)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
