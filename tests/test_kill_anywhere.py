"""Kill-anywhere: every long command, SIGKILLed at random points and resumed, ends exactly where an uninterrupted
run ends (weights, masks, optimizer state, metrics, evaluation flags). The harness is tests/killharness.py; a new
command is one entry in CASES. Counts are printed at the end of the test run (tests/conftest.py).

Sizes are tiny (digits, cnn width 8, a few dozen steps) so the whole table runs in well under a minute on one
CPU thread. The AutoAttack case patches the components' budgets down in the child processes (reference and
killed chain alike): the cascade, the per-chunk state and the seeding are what is under test, not the budget.
"""
from __future__ import annotations

import glob
import os

import pytest

import killharness as kh
from robustsparse.runs.checkpoint import FORMAT, load_checkpoint
from robustsparse.runs.logger import read_metrics

TINY = ["digits_pgdat", "model.options={width: 8}", "attack.steps=2", "train.val_attack_steps=2",
        "train.batch_size=64", "train.lr=0.2"]  # 2 epochs: val robust ~60% (PGD-2), a model worth attacking
FAST = TINY[:-2] + ["train.batch_size=128", "train.lr=0.1"]
STEPS_PER_EPOCH = 9  # digits: 1257 training images // 128


def _folder(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def _has_run(out: str, marker: str = "config.yaml") -> bool:
    return os.path.exists(os.path.join(out, marker))


def _last_global_step(out: str) -> int:
    try:
        return int(kh.read_json(os.path.join(out, "checkpoints", "last.json"))["global_step"])
    except (OSError, ValueError, KeyError):
        return 0


def _checkpoint_handles(root: str) -> dict[str, str]:
    """{path relative to root: handle} for every robustsparse checkpoint handle under ``root``."""
    found = {}
    for path in glob.glob(os.path.join(root, "**", "*.json"), recursive=True):
        try:
            meta = kh.read_json(path)
        except ValueError:
            continue
        if isinstance(meta, dict) and meta.get("format") == FORMAT:
            found[os.path.relpath(path, root)] = path
    return found


def _relative(meta: dict, root: str) -> dict:
    """Paths inside the run folder (e.g. a pipeline's train.ticket) written relative to it."""
    import json
    return json.loads(json.dumps(meta).replace(os.path.abspath(root), "<run>").replace(root, "<run>"))


def compare_checkpoints(ref: str, killed: str) -> int:
    """Every checkpoint of the reference exists in the killed run with the same tensors (bit for bit) and the same
    metadata apart from wall-clock times; the killed run has no extra checkpoint."""
    a, b = _checkpoint_handles(ref), _checkpoint_handles(killed)
    assert a and a.keys() == b.keys(), f"checkpoints differ: {sorted(set(a) ^ set(b))}"
    n = 0
    for rel in a:
        (ta, ma), (tb, mb) = load_checkpoint(a[rel]), load_checkpoint(b[rel])
        n += kh.same_tensors(ta, tb, rel)
        drop = ("seconds", "sha256", "weights", "meta_sha256", "epoch_sums")  # names carry the hash; sums: times
        assert _relative(kh.without(ma, *drop), ref) == _relative(kh.without(mb, *drop), killed), \
            f"{rel}: metadata differs"
    return n


def compare_metrics(ref: str, killed: str) -> int:
    n = 0
    for sub in sorted({os.path.dirname(p) for p in glob.glob(os.path.join(ref, "**", "metrics.jsonl"),
                                                            recursive=True)}):
        rel = os.path.relpath(sub, ref)
        rows_a = kh.without(read_metrics(sub), "seconds")
        rows_b = kh.without(read_metrics(os.path.join(killed, rel)), "seconds")
        assert rows_a == rows_b, f"{rel}/metrics.jsonl differs"
        n += len(rows_a)
    return n


def compare_run(ref, killed, ref_attempt, final_attempt) -> int:
    n = compare_checkpoints(ref, killed) + compare_metrics(ref, killed)
    assert kh.read_json(os.path.join(killed, "run.json"))["status"] == "finished"
    return n


def compare_ticket(ref, killed, ref_attempt, final_attempt) -> int:
    n = compare_checkpoints(ref, killed)
    for name in ("prune.json", "mask_report.md"):
        with open(os.path.join(ref, name)) as fa, open(os.path.join(killed, name)) as fb:
            text_a, text_b = fa.read(), fb.read()
        if name.endswith(".json"):
            import json
            text_a, text_b = kh.without(json.loads(text_a), "seconds"), kh.without(json.loads(text_b), "seconds")
        assert text_a == text_b, f"{name} differs"
        n += 1
    assert not os.path.exists(os.path.join(killed, "search-state")), "the search state outlived the finished ticket"
    return n


def compare_eval(ref, killed, ref_attempt, final_attempt) -> int:
    import json
    a, b = json.loads(ref_attempt.stdout), json.loads(final_attempt.stdout)
    assert kh.without(a, "seconds") == kh.without(b, "seconds"), "evaluation results differ"
    state_a, state_b = kh.read_json(os.path.join(ref, "state.json")), kh.read_json(os.path.join(killed, "state.json"))
    assert state_a["flags"] == state_b["flags"] and state_b["partial"] == {}
    return sum(len(v) for v in state_a["flags"].values())


def describe_eval_state(out: str) -> str:
    try:
        state = kh.read_json(os.path.join(out, "state.json"))
    except (OSError, ValueError):
        return "no state yet"
    partial = [f"{k} {v['done']}/{v['tag'][1]} points" for k, v in state["partial"].items()]
    return f"finished {len(state['flags'])}" + (f", in progress: {', '.join(partial)}" if partial else "")


def train_case(name: str, extra: list[str], epochs: int = 2, every: int = 3) -> kh.Case:
    args = FAST + extra + [f"train.epochs={epochs}", f"train.checkpoint_every_steps={every}"]
    start = lambda out: ["train", *args, "--out", out, "--no-progress"]  # noqa: E731
    return kh.Case(
        name, start=start,
        resume=lambda out: ["train", "--resume", "--out", out, "--no-progress"] if _has_run(out) else start(out),
        compare=compare_run, kills=["timed", "step", "timed", "step"], total_steps=epochs * STEPS_PER_EPOCH,
        progress=_last_global_step)


def prune_case(name: str, method: str, extra: list[str]) -> kh.Case:
    start = lambda out: ["prune", *FAST, *extra, "--method", method, "--density", "0.1", "--out", out]  # noqa: E731
    return kh.Case(name, start=start,
                   resume=lambda out: ["prune", "--resume", "--out", out] if _has_run(out) else start(out),
                   compare=compare_ticket, kills=["timed", "timed", "timed"],
                   timed_fraction=(0.1, 0.9))  # a rerun without a search state starts over: kill anywhere in it


def eval_case(ctx) -> kh.Case:
    def start(out):
        return ["eval", ctx["model_run"], "--suite", "clean,pgd-5x3,autoattack", "--eps", "0.1", "--n", "12",
                "--batch-size", "3", "--seed", "1", "--state", os.path.join(_folder(out), "state.json"), "--json",
                "--no-progress"]
    budget = {"apgd-ce": 10, "apgd-t": 10, "fab-t": 10, "square": 300}
    return kh.Case("eval --state (PGD restarts + AutoAttack cascade)", start=start, resume=start,
                   compare=compare_eval, kills=["timed", "timed", "timed"], describe=describe_eval_state,
                   env={"ROBUSTSPARSE_EVAL_SAVE_EVERY_S": "0"},
                   patches={"robustsparse.attacks.autoattack.STANDARD_BUDGET": budget})


def posttrain_case(name: str, method: str, extra: list[str]) -> kh.Case:
    start = lambda out: ["posttrain", *FAST, "train.epochs=1", "train.checkpoint_every_steps=4", *extra,  # noqa
                         "--method", method, "--density", "0.1", "--suite", "none", "--out", out, "--no-progress"]
    return kh.Case(name, start=start, resume=start, compare=lambda r, k, *_: compare_checkpoints(r, k)
                   + compare_metrics(r, k), kills=["timed", "timed", "timed"])


# One entry per command under test. A new resumable command: one line here.
CASES = {
    "train-pgd_at": lambda ctx: train_case("train pgd_at", []),
    "eval-state": eval_case,
    "prune-magnitude": lambda ctx: prune_case("prune magnitude", "magnitude", []),
    "prune-synflow": lambda ctx: prune_case("prune synflow", "synflow", ["prune.synflow_rounds=20"]),
    "prune-awt": lambda ctx: prune_case("prune awt (resumable search)", "awt",
                                        ["prune.search_iters=12", "prune.checkpoint_every=3",
                                         "prune.mask_update_every=4", "prune.search_batch=16"]),
    "prune-awt-faithful": lambda ctx: prune_case("prune awt, faithful preset (mask updated 5 times)", "awt",
                                                 ["prune.preset=faithful", "prune.search_iters=12",
                                                  "prune.checkpoint_every=3", "prune.mask_update_every=2",
                                                  "prune.search_batch=16"]),
    "posttrain-hydra": lambda ctx: posttrain_case("posttrain hydra", "hydra",
                                                  ["prune.hydra_epochs=1", "prune.finetune_epochs=1"]),
    "train-smart": lambda ctx: train_case("train smart", ["train.method=smart"], epochs=2, every=4),
}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A small trained model for the evaluation case (in-process, ~2 s)."""
    from robustsparse.config import load_config
    from robustsparse.train import train
    run = tmp_path_factory.mktemp("kill_eval_model") / "run"
    train(load_config(TINY[0], TINY[1:] + ["train.epochs=2"]), str(run), progress=False)
    return {"model_run": str(run)}


@pytest.mark.parametrize("key", list(CASES))
def test_killed_and_resumed_equals_uninterrupted(key, ctx, tmp_path):
    case = CASES[key](ctx)
    summary = kh.run_case(case, str(tmp_path))
    print(case.name, summary)
    assert summary["kills"] >= 1, f"{case.name}: no kill landed ({summary['history']}); the case is too short"


def test_eval_state_records_the_points_done_and_a_resume_skips_them(ctx, tmp_path, monkeypatch):
    """Deterministic companion of the timed kills: stop an evaluation inside an attack (after two chunks), check
    what the state file says is done, resume, and check that only the remaining points are attacked and that the
    result equals an uninterrupted evaluation, flag for flag."""
    import json

    import robustsparse as rs
    from robustsparse.attacks.pgd import PGD

    monkeypatch.setenv("ROBUSTSPARSE_EVAL_SAVE_EVERY_S", "0")
    model = rs.load(ctx["model_run"])
    x, y = rs.load_dataset("digits", split="test")
    x, y = x[:24], y[:24]
    kwargs = dict(suite="clean,pgd-3x2,fgsm", eps=0.1, batch_size=4, seed=3, progress=False, run_checks=False)
    full = rs.evaluate(model, x, y, **kwargs)
    state = str(tmp_path / "state.json")
    real = PGD.perturb
    attacked: list[int] = []

    class Killed(Exception):
        pass

    def dies_in_third_chunk(self, xb, yb):
        if len(attacked) == 2:
            raise Killed
        attacked.append(len(xb))
        return real(self, xb, yb)
    monkeypatch.setattr(PGD, "perturb", dies_in_third_chunk)
    with pytest.raises(Killed):
        rs.evaluate(model, x, y, state_path=state, **kwargs)
    saved = json.load(open(state))
    n_attacked = int(sum(saved["flags"]["clean"]))
    assert n_attacked > 8 and "pgd-3x2" not in saved["flags"]
    assert saved["partial"]["pgd-3x2"]["done"] == 8 and saved["partial"]["pgd-3x2"]["tag"][1] == n_attacked

    def counts(self, xb, yb):
        attacked.append(len(xb))
        return real(self, xb, yb)
    attacked.clear()
    monkeypatch.setattr(PGD, "perturb", counts)
    resumed = rs.evaluate(model, x, y, state_path=state, **kwargs)
    assert sum(attacked) == n_attacked - 8  # the 8 finished points were not attacked again
    assert resumed.accuracy == full.accuracy and resumed.worst_case == full.worst_case
    final = json.load(open(state))
    assert final["partial"] == {} and set(final["flags"]) == {"clean", "pgd-3x2", "fgsm"}
