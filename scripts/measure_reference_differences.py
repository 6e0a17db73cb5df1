"""Cheap measurements of the differences from the reference codes (issue 19; docs/reference-differences.md).

    .venv/bin/python scripts/measure_reference_differences.py [/usr/share/datasets/fashion-mnist]
"""
import copy
import functools
import gzip
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import robustsparse as rs
from robustsparse.attacks.trades import TradesKL
from robustsparse.config import load_config
from robustsparse.prune import grasp, synflow
from robustsparse.sparse import prunable_parameters
from robustsparse.sparse.structured import structured_masks
from robustsparse.train.objectives import build_objective


def fashion(root, n):
    with gzip.open(os.path.join(root, "t10k-images-idx3-ubyte.gz")) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    with gzip.open(os.path.join(root, "t10k-labels-idx1-ubyte.gz")) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return torch.tensor(x, dtype=torch.float32) / 255, torch.tensor(y, dtype=torch.int64)


def trained_cnn(x, y, steps=60):
    torch.manual_seed(0)
    model = rs.build_model("cnn", 1, 10, (28, 28), width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(steps):
        idx = torch.randint(0, len(y), (64,))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def main(root):
    torch.set_num_threads(1)
    x, y = fashion(root, 1024)
    xb, yb = x[:256], y[:256]
    print(f"Fashion-MNIST test[:256]: {float(((xb == 0) | (xb == 1)).float().mean()):.1%} of pixels exactly 0 or 1")
    model = trained_cnn(x, y)
    for eps in (0.1, 8 / 255):
        runs = {}
        for clamp in (False, True):
            torch.manual_seed(11)
            runs[clamp] = TradesKL(model, eps, steps=10, clamp_start=clamp)(xb, yb)
        d = (runs[True] - runs[False]).abs()
        print(f"item 1, eps={eps:.4g}: x_adv differs (>1e-6) on {float((d > 1e-6).float().mean()):.1%} of pixels, "
              f"max {float(d.max()):.4f} (= {float(d.max()) / eps:.2f} eps)")

    cfgs = {f: load_config(None, ["train.method=trades", "attack.eps=0.1", "attack.steps=10",
                                  f"train.trades_forwards={f}"]) for f in (3, 2)}
    stats = {}
    for f, cfg in cfgs.items():
        m = copy.deepcopy(model).train()
        torch.manual_seed(5)
        build_objective(m, cfg)(xb[:128], yb[:128])
        stats[f] = {k: v for k, v in m.state_dict().items() if "running" in k}
    print("item 2: BN running-stat max |3 − 2 forwards| after one step:",
          f"{max(float((stats[3][k] - stats[2][k]).abs().max()) for k in stats[3]):.4f}")

    g = torch.Generator().manual_seed(3)
    masks = {n: (torch.rand(p.shape, generator=g) > 0.5).float() for n, p in prunable_parameters(model).items()}
    new = grasp.score(model, [(xb[:64], yb[:64])], masks=masks)
    old_model = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in old_model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    old = grasp.score(old_model, [(xb[:64], yb[:64])])
    rel = max(float(((old[n] - new[n]).abs() * masks[n]).max() / new[n].abs().max()) for n in masks)
    print(f"item 4: GraSP with a 50% random mask, kept-entry |old − new| up to {rel:.1%} of the largest |score|")

    digits = rs.build_model("cnn", 1, 10, (8, 8))  # the digits config's model
    torch.manual_seed(0)
    digits = rs.build_model("cnn", 1, 10, (8, 8))
    final = {}
    for count in ("reference", "round"):
        select = functools.partial(structured_masks, min_layer_density=0.01, count=count)
        final[count] = synflow.synflow_iterative(digits, 0.1, rounds=100, input_shape=(1, 8, 8),
                                                 masks_from_scores=select)
    diff = sum(int((final["reference"][n] != final["round"][n]).sum()) for n in final["round"])
    kept = {c: sum(int(m.sum()) for m in v.values()) for c, v in final.items()}
    print(f"item 5: SynFlow digits cnn d=0.1, 100 rounds: kept {kept}, {diff} entries differ")
    sizes = [p.numel() for p in prunable_parameters(digits).values()]
    per_layer = [(n - int(0.9 * n), round(0.1 * n)) for n in sizes]
    print(f"item 5: HYDRA per-layer counts at k=0.1 on the digits cnn (reference, round): {per_layer}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
