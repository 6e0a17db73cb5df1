"""Shared fixtures: a small, somewhat robust digits model trained once per test session (a few seconds)."""
import os

# OpenMP threads that spin while waiting make torch 10-35x slower whenever another process (a subprocess test,
# another job) shares the 2 cores; passive waiting costs nothing when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import robustsparse as rs  # noqa: E402
from robustsparse.attacks import PGD  # noqa: E402


@pytest.fixture(scope="session")
def digits_test():
    return rs.load_dataset("digits", split="test")


@pytest.fixture(scope="session")
def robust_digits_model():
    """cnn (width 16) after 6 epochs of PGD-3 AT at eps 0.1 on digits: clean ~90%+, robust well above 0."""
    torch.manual_seed(0)
    x, y = rs.load_dataset("digits", split="train")
    model = rs.build_model("cnn", 1, 10, (8, 8), width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    attack = PGD(model, 0.1, steps=3, alpha=0.05)
    for epoch in range(6):
        perm = torch.randperm(len(y))
        for i in range(0, len(y) - 63, 64):
            idx = perm[i:i + 64]
            x_adv = attack(x[idx], y[idx])
            model.train()
            loss = F.cross_entropy(model(x_adv), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
