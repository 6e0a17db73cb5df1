"""Shared fixtures: a small, somewhat robust digits model trained once per test session (a few seconds)."""
import os

# OpenMP threads that spin while waiting make torch 10-35x slower whenever another process (a subprocess test,
# another job) shares the 2 cores; passive waiting costs nothing when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One thread per process: the suite starts subprocesses (kill harness, DDP ranks) on 2 cores, and tests that compare
# a subprocess's result with an in-process one bit for bit need the same thread count (float reduction order) on
# both sides. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import robustsparse as rs  # noqa: E402
from robustsparse.attacks import PGD  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after: comparisons with a one-thread subprocess or a stated
    measured margin see the same kernels every time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def pytest_terminal_summary(terminalreporter):
    """The kill-anywhere harness's counts (tests/killharness.py), after pytest's own summary."""
    import sys
    harness = sys.modules.get("killharness")
    if harness is None or not harness.COUNTS["cases"]:
        return
    c = harness.COUNTS
    terminalreporter.write_sep("-", "kill-anywhere harness")
    terminalreporter.write_line(f"kill-anywhere: {c['kills']} SIGKILLs survived; {c['cases']} cases compared equal to "
                                f"their uninterrupted runs ({c['compared']} tensors, metric rows and flags checked) "
                                f"in {c['seconds']:.1f} s wall, {c['cpu']:.1f} s CPU in the runs")
    for name in c["names"]:
        terminalreporter.write_line(f"  {name}")
