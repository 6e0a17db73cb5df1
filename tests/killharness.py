"""Kill-anywhere harness: run a CLI command once uninterrupted, then again with real SIGKILLs at random (seeded)
points, resuming after each until it finishes, and compare the results with a case's own comparison.

Every command runs in its own process, forked from a ``multiprocessing`` forkserver that has imported torch and
robustsparse once, so a run starts in milliseconds instead of the ~3 s an interpreter needs to import torch. The
forkserver never runs a torch op itself, so forking it is safe; each child sets one thread. Kills are of two kinds:

* ``step``: the trainer's own fault injection (``ROBUSTSPARSE_KILL_AT_STEP``, SIGKILL at the start of a global
  step), at a step drawn in the first half of what is left after the point the resumed run will start from;
* ``timed``: ``SIGKILL`` from outside once the process has used a random fraction of the uninterrupted run's CPU
  time (CPU, not wall time, so a busy machine does not move the point), so it can land anywhere: loading data,
  inside an attack, half-way through writing a checkpoint. A run can use less CPU than the reference did (which
  paid one-time costs such as first reads); if one finishes before any kill landed, the case starts over in a
  fresh folder with kills twice as early (at most ``MAX_RESTARTS`` times), so short cases still get killed.

A case is one ``Case`` entry: how to start, how to continue from whatever a killed run left in its folder, how to
compare the final outputs, and which kills to try. ``COUNTS`` collects what survived; tests/conftest.py prints it
at the end of the test run.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

COUNTS = {"kills": 0, "cases": 0, "compared": 0, "seconds": 0.0, "cpu": 0.0, "names": []}

# Imported once in the forkserver so that no run pays for them; a module missing here only costs CPU time.
_PRELOAD = ["torch", "robustsparse", "robustsparse.cli.main", "robustsparse.train.trainer", "robustsparse.prune.oneshot",
            "robustsparse.pipelines.ticket", "robustsparse.prune.awt", "robustsparse.eval.evaluator",
            "robustsparse.runs.plots", "robustsparse.data.digits", "robustsparse.posttrain", "robustsparse.ofa",
            "robustsparse.cli.posttrain", "robustsparse.cli.bench", "robustsparse.cli.export", "robustsparse.cli.sweep",
            "robustsparse.export", "torch._dynamo", "sklearn.datasets", "sympy", "scipy.io", "torchattacks",
            "torch.utils.tensorboard", "matplotlib.pyplot"]
_context = None
MAX_RESTARTS = 3  # fresh starts, with kills twice as early each time, when a case finishes before any kill lands


def context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def _child(argv: list[str], env: dict, patches: dict, stdout: str, stderr: str) -> None:
    """Runs in the forked process: one robustsparse command, exit status as the process's."""
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    import importlib
    import threading

    import torch
    import tqdm
    torch.set_num_threads(1)
    tqdm.tqdm.set_lock(threading.RLock())  # tqdm's default lock is a multiprocessing semaphore a SIGKILL would leak
    for dotted, value in patches.items():  # test-only budget changes, the same for the reference and the chain
        module, name = dotted.rsplit(".", 1)
        setattr(importlib.import_module(module), name, value)
    from robustsparse.cli import main
    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    usage = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF)
    # A timed SIGKILL can land here, after the command: write the CPU time under a temporary name and rename it,
    # so the harness sees the whole number or no file, never a half-written one (issue 14: it read '' once).
    cpu_file = stdout[:-4] + ".cpu"
    with open(cpu_file + ".tmp", "w") as fh:
        fh.write(f"{usage.ru_utime + usage.ru_stime}")
    os.replace(cpu_file + ".tmp", cpu_file)
    os._exit(code)


@dataclass
class Attempt:
    exitcode: int
    seconds: float
    stdout: str
    stderr: str
    cpu: float | None = None  # CPU seconds used (at the kill, for a killed process)


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a live process has used so far, from /proc; None where that is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _wait_for_cpu(proc, cpu_budget: float) -> None:
    """Return once ``proc`` has used ``cpu_budget`` CPU seconds or has ended. Measured in CPU time, not wall time,
    so where the kill lands in the work does not depend on how busy the machine is."""
    started = time.perf_counter()
    while proc.is_alive():
        used = _cpu_seconds(proc.pid)
        if used is None:  # no /proc: fall back to wall time
            proc.join(max(0.0, cpu_budget - (time.perf_counter() - started)))
            return
        if used >= cpu_budget:
            return
        proc.join(min(0.02, max(0.002, (cpu_budget - used) / 4)))


def _reported_cpu(path: str, measured: float | None) -> float | None:
    """The CPU time the child wrote for itself, else what /proc showed at the kill (``measured``). The child writes
    it atomically; an unreadable file is still read as unknown rather than failing the harness."""
    try:
        with open(path) as fh:
            return float(fh.read())
    except (OSError, ValueError):
        return measured


def run(argv: list[str], logdir: str, tag: str, env: dict | None = None, patches: dict | None = None,
        kill_after_cpu: float | None = None) -> Attempt:
    """Run one command; with ``kill_after_cpu``, SIGKILL it once it has used that many CPU seconds."""
    out, err = os.path.join(logdir, f"{tag}.out"), os.path.join(logdir, f"{tag}.err")
    for path in (out, err):  # created here, not only by the child: a kill can land before the child opens them
        open(path, "w").close()
    proc = context().Process(target=_child, args=(list(map(str, argv)), env or {}, patches or {}, out, err))
    started = time.perf_counter()
    proc.start()
    cpu = None
    if kill_after_cpu is not None:
        _wait_for_cpu(proc, kill_after_cpu)
        if proc.is_alive():
            cpu = _cpu_seconds(proc.pid)
            proc.kill()  # SIGKILL: no handler, no cleanup, no flush
    proc.join()
    seconds = time.perf_counter() - started
    cpu = _reported_cpu(out[:-4] + ".cpu", cpu)
    with open(out) as fo, open(err) as fe:
        return Attempt(proc.exitcode, seconds, fo.read(), fe.read(), cpu)


@dataclass
class Case:
    """One command under test. ``start(folder)`` and ``resume(folder)`` give argv lists (``resume`` looks at what
    a killed run left in ``folder`` and says how to continue; for a command without resume it is ``start``);
    ``compare(ref_folder, killed_folder, ref_attempt, final_attempt)`` asserts equality and returns how many
    things it compared. ``kills`` is the plan: "step" (needs ``total_steps`` and ``progress(folder)``, the global
    step a resumed run starts from) or "timed"."""
    name: str
    start: Callable[[str], list]
    resume: Callable[[str], list]
    compare: Callable[[str, str, Attempt, Attempt], int]
    kills: list[str] = field(default_factory=lambda: ["timed", "timed"])
    total_steps: int = 0
    progress: Callable[[str], int] | None = None
    env: dict = field(default_factory=dict)
    patches: dict = field(default_factory=dict)
    timed_fraction: tuple[float, float] = (0.03, 0.35)  # of the uninterrupted run's CPU time
    describe: Callable[[str], str] | None = None  # what a killed run left behind, for the report


def run_case(case: Case, workdir: str, seed: int = 0) -> dict:
    """Reference run, then the kill chain, then the comparison; returns a summary and updates ``COUNTS``."""
    began = time.perf_counter()
    rng = random.Random(f"{case.name}/{seed}")
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    ref, killed = os.path.join(workdir, "ref"), os.path.join(workdir, "killed")
    reference = run(case.start(ref), logs, "ref", env=case.env, patches=case.patches)
    assert reference.exitcode == 0, f"{case.name}: the uninterrupted run failed:\n{reference.stderr[-3000:]}"
    history, kills, attempt_no = [], 0, 0
    cpu = reference.cpu or 0.0
    finished = None
    kinds, scale, restarts = list(case.kills), 1.0, 0
    while kinds:
        kind = kinds[0]
        argv = case.start(killed) if attempt_no == 0 else case.resume(killed)
        env, kill_after = dict(case.env), None
        if kind == "step":
            begin = case.progress(killed) if attempt_no else 0
            if begin >= case.total_steps - 1:
                kinds.pop(0)
                continue
            at = rng.randrange(begin + 1, max(begin + 2, (begin + case.total_steps) // 2 + 1))  # leave room for more
            env["ROBUSTSPARSE_KILL_AT_STEP"] = str(at)
            what = f"step {at}"
        else:
            kill_after = rng.uniform(*case.timed_fraction) * reference.cpu * scale
            what = f"{kill_after:.2f} s CPU"
        attempt = run(argv, logs, f"try{len(history)}", env=env, patches=case.patches, kill_after_cpu=kill_after)
        attempt_no += 1
        cpu += attempt.cpu or 0.0
        history.append((what, attempt.exitcode))
        if attempt.exitcode == -9:
            kills += 1
            kinds.pop(0)
            if case.describe is not None:
                history[-1] = (f"{what} [{case.describe(killed)}]", -9)
            continue
        assert attempt.exitcode == 0, f"{case.name}: attempt {argv} ended with {attempt.exitcode}:\n" \
                                      f"{attempt.stderr[-3000:]}"
        if kind == "timed" and kills == 0 and restarts < MAX_RESTARTS:
            # A short case ran faster than its reference (whose CPU time includes one-time costs such as first
            # reads) and finished before any kill landed: start it over in a fresh folder with earlier kills.
            shutil.rmtree(killed, ignore_errors=True)
            attempt_no, scale, restarts = 0, scale / 2, restarts + 1
            continue
        finished = attempt  # it finished before the kill landed
        break
    if finished is None:
        finished = run(case.resume(killed) if attempt_no else case.start(killed), logs, "final", env=case.env,
                       patches=case.patches)
        assert finished.exitcode == 0, f"{case.name}: the final resume failed:\n{finished.stderr[-3000:]}"
        cpu += finished.cpu or 0.0
    compared = case.compare(ref, killed, reference, finished)
    assert compared > 0, f"{case.name}: the comparison compared nothing"
    seconds = time.perf_counter() - began
    COUNTS["kills"] += kills
    COUNTS["cases"] += 1
    COUNTS["compared"] += compared
    COUNTS["seconds"] += seconds
    COUNTS["cpu"] += cpu
    COUNTS["names"].append(f"{case.name}: {kills} kills ({', '.join(w for w, c in history if c == -9) or '-'}), "
                           f"{cpu:.1f} s CPU")
    return {"kills": kills, "history": history, "compared": compared, "seconds": seconds, "cpu": cpu,
            "reference": (reference.seconds, reference.cpu)}


# ---------------------------------------------------------------- comparisons shared by cases


def tensor_bytes(t) -> bytes:
    import torch
    return t.detach().contiguous().reshape(-1).cpu().view(torch.uint8).numpy().tobytes()


def same_tensors(a: dict, b: dict, what: str) -> int:
    """Bit-for-bit equality of two {name: tensor} dicts; returns the number of tensors compared."""
    assert a.keys() == b.keys(), f"{what}: different tensor names: {sorted(set(a) ^ set(b))[:5]}"
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, f"{what}: {key} differs in shape/dtype"
        assert tensor_bytes(a[key]) == tensor_bytes(b[key]), f"{what}: tensor {key} differs"
    return len(a)


def without(data, *keys):
    """``data`` with the named keys, and every key ending in "seconds", dropped at every depth (wall-clock times
    differ between runs)."""
    if isinstance(data, dict):
        return {k: without(v, *keys) for k, v in data.items()
                if k not in keys and not (isinstance(k, str) and k.endswith("seconds"))}
    if isinstance(data, list):
        return [without(v, *keys) for v in data]
    return data


def read_json(path: str):
    with open(path) as fh:
        return json.load(fh)
