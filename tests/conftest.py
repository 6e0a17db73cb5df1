"""Shared fixtures: a small, somewhat robust digits model trained once per test session (a few seconds)."""
import pytest
import torch
import torch.nn.functional as F

import robustsparse as rs
from robustsparse.attacks import PGD


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
