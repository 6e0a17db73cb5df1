"""Where our PGD-AT step gains on the textbook loop: the textbook loop, changed one thing at a time, timed with
`robustsparse bench`'s harness (same init, data and attack; interleaved blocks; median).

    python scripts/bench_ablation.py [--model cnn --model-option width=64 --input-shape 1,8,8 --batch 64 --steps 10]

    1 textbook     DataLoader on the host, loss.backward() in the attack (parameter gradients computed), .item()
    2 +input grad  the attack takes torch.autograd.grad(loss, x_adv): no parameter gradients
    3 +on device   ... and the data are one tensor on the device, batches gathered by index (no DataLoader)
    4 +no sync     ... and the running loss stays on the device (no .item() per step)
    5 ours         the trainer's step (robustsparse.train.engine), for reference
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F

import robustsparse as rs
from robustsparse.pipelines.bench import EPS, LR, MOMENTUM, WEIGHT_DECAY, OurLoop, PlainLoop, parse_input_shape, time_loops
from robustsparse.train.engine import Engine


class Variant:
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--model-option", action="append", default=[])
    p.add_argument("--input-shape", default="1,8,8")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    shape = parse_input_shape(a.input_shape)
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in a.model_option)}
    device = torch.device("cpu")
    torch.manual_seed(0)
    base = rs.build_model(a.model, shape[0], 10, shape[1:], **options)
    g = torch.Generator().manual_seed(0)
    n = a.batch * a.iters
    x, y = torch.rand((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g)
    flags = {"1 textbook": (False, False, True), "2 +input grad": (True, False, True),
             "3 +on device": (True, True, True), "4 +no sync": (True, True, False)}
    loops = {name: Variant(copy.deepcopy(base), x, y, a.batch, a.steps, device, *f) for name, f in flags.items()}
    loops["5 ours"] = OurLoop(copy.deepcopy(base), x, y, a.batch, a.steps, Engine.create(device))
    res = time_loops(loops, a.batch, a.iters, 2, a.repeats, device, progress=True, desc="ablation")
    ref = res["1 textbook"]["images_per_s"]
    print(f"{a.model} {a.input_shape}, batch {a.batch}, PGD-{a.steps}, {torch.get_num_threads()} thread(s)")
    print("| variant | images/s | vs textbook |\n|---|---:|---:|")
    for name, r in res.items():
        print(f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / ref:.2f}x |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
