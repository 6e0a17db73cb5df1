"""The bad-input corpus: every case goes through the CLI (in-process ``cli.main``) and must give exactly one
``robustsparse: error:`` line naming the problem, exit status 2, no traceback, and leave every folder involved
byte-for-byte as it was (a new --out is not even created). Cases are generated here (one table), from small
valid files that are then damaged, so each one says exactly what is wrong with it.

Property-based fuzzing of the config parser and of the data readers is at the end.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import scipy.io
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robustsparse.config import RunConfig, load_config
from robustsparse.data import load_dataset
from robustsparse.errors import UserError
from robustsparse.runs.checkpoint import load_checkpoint, read_meta, save_checkpoint
from test_cli import assert_user_error, run_cli, tree_digest

FAST = ["model.options={width: 8}", "attack.steps=1", "train.val_attack_steps=1", "train.batch_size=256",
        "train.epochs=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny finished run, a ticket for its architecture and one for another (read-only: cases copy them)."""
    from robustsparse.pipelines.ticket import prune_to_folder
    from robustsparse.train import train
    root = tmp_path_factory.mktemp("bad_inputs")
    cfg = load_config("digits_pgdat", FAST)
    train(cfg, str(root / "run"), progress=False)
    prune_to_folder(load_config("digits_pgdat", FAST + ["prune.method=magnitude", "prune.density=0.2"]),
                    str(root / "ticket"), progress=False)
    prune_to_folder(load_config("digits_pgdat", FAST[1:] + ["model.options={width: 16}", "prune.method=magnitude"]),
                    str(root / "ticket16"), progress=False)
    return root


# ---------------------------------------------------------------- helpers that build damaged inputs


def _copy(base, name, tmp) -> str:
    dst = tmp / name
    shutil.copytree(base / name, dst)
    return str(dst)


def _reseal(handle: str, meta_edit: Callable | None = None, tensor_edit: Callable | None = None) -> None:
    """Rewrite a checkpoint consistently (fresh hashes) after editing it: a well-formed file that is wrong."""
    tensors, meta = load_checkpoint(handle)
    for key in ("format", "label", "library_version", "weights", "sha256", "meta_sha256"):
        meta.pop(key, None)
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    save_checkpoint(os.path.dirname(handle), os.path.basename(handle)[:-5], tensors, meta)


def _weights(handle: str) -> str:
    return os.path.join(os.path.dirname(handle), read_meta(handle)["weights"])


def _first_mask_key(tensors) -> str:
    return next(k for k in sorted(tensors) if k.endswith("weight_mask"))


def _cifar_tree(tmp, damage: Callable[[str], None] | None = None, python_batch: bytes | None = None) -> str:
    """A fake CIFAR-10 (3 images per batch), binary; ``damage`` edits data_batch_1.bin, ``python_batch`` makes it a
    python-version tree whose data_batch_1 holds those bytes."""
    rng = np.random.default_rng(0)
    if python_batch is not None:
        folder = tmp / "cifar" / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [1, 2, 3]}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        (folder / "data_batch_1").write_bytes(python_batch)
        return str(tmp / "cifar")
    folder = tmp / "cifar" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = np.concatenate([np.array([[1], [2], [3]], np.uint8),
                                  rng.integers(0, 256, (3, 3072), dtype=np.uint8)], axis=1)
        (folder / name).write_bytes(records.tobytes())
    if damage:
        damage(str(folder / "data_batch_1.bin"))
    return str(tmp / "cifar")


def _idx(dims: tuple, data: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    return header + data.astype(np.uint8).tobytes()


def _mnist_tree(tmp, images: bytes | None = None, labels: bytes | None = None) -> str:
    folder = tmp / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good_images = _idx((4, 28, 28), rng.integers(0, 256, (4, 28, 28)))
    good_labels = _idx((4,), np.array([0, 1, 2, 3]))
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(images if images is not None else good_images)
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(labels if labels is not None else good_labels)
    return str(folder)


def _svhn_tree(tmp, variables: dict | None = None, raw: bytes | None = None) -> str:
    folder = tmp / "svhn"
    folder.mkdir()
    for split in ("train", "test"):
        path = folder / f"{split}_32x32.mat"
        if raw is not None:
            path.write_bytes(raw)
        else:
            scipy.io.savemat(str(path), variables)
    return str(folder)


def _flip_byte(path: str, offset: int = -10) -> None:
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path: str, keep: float = 0.5) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(int(os.path.getsize(path) * keep))


# ---------------------------------------------------------------- the corpus


@dataclass
class Bad:
    """``argv(base, tmp)`` returns the command line and the folders that must not change; ``words`` must all be in
    the one error line. A ``new`` entry names an --out that must not come into existence."""
    argv: Callable
    words: tuple
    new: bool = True
    marker: list = field(default_factory=list)


def train_with(*overrides, config="digits_pgdat"):
    return lambda base, tmp: (["train", config, *FAST, *overrides, "--out", tmp / "new", "--no-progress"], [])


def yaml_file(text: str):
    def make(base, tmp):
        path = tmp / "cfg.yaml"
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return ["train", str(path), "--out", tmp / "new", "--no-progress"], []
    return make


def data_case(dataset: str, make_root: Callable):
    return lambda base, tmp: (["train", "digits_pgdat", *FAST, f"data.name={dataset}",
                               f"data.root={make_root(tmp)}", "--out", tmp / "new", "--no-progress"], [])


def with_ticket(edit: Callable[[str], None], which="ticket", extra=()):
    def make(base, tmp):
        ticket = _copy(base, which, tmp)
        edit(os.path.join(ticket, "ticket.json"))
        return ["train", "digits_pgdat", *FAST, *extra, "--ticket", ticket, "--out", tmp / "new",
                "--no-progress"], [ticket]
    return make


def eval_damaged(edit: Callable[[str], None], label="best", extra=()):
    def make(base, tmp):
        run = _copy(base, "run", tmp)
        edit(os.path.join(run, "checkpoints", f"{label}.json"))
        return ["eval", run, "--which", label, "--suite", "clean", "--n", "5", "--no-progress", *extra], [run]
    return make


def resume_damaged(edit: Callable[[str], None]):
    def make(base, tmp):
        run = _copy(base, "run", tmp)
        for label in ("best", "last"):
            edit(os.path.join(run, "checkpoints", f"{label}.json"))
        return ["train", "--resume", "--out", run, "--no-progress"], [run]
    return make


def eval_state(content: Callable):
    def make(base, tmp):
        run = _copy(base, "run", tmp)
        folder = tmp / "state"
        folder.mkdir()
        content(str(folder / "s.json"), run)
        return ["eval", run, "--suite", "clean,fgsm", "--n", "6", "--state", folder / "s.json",
                "--no-progress"], [run, str(folder)]
    return make


def _other_eval_state(path, run):
    from robustsparse.cli import main
    main(["eval", run, "--suite", "clean,fgsm", "--n", "6", "--eps", "0.05", "--state", path, "--no-progress"])


def _set_mask(value=None, shape=None):
    def edit(tensors):
        import torch
        key = _first_mask_key(tensors)
        if shape is not None:
            tensors[key] = torch.ones(shape)
        else:
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] = value
    return edit


def _hostile_pickle(tmp) -> bytes:
    class Hostile:
        def __reduce__(self):
            return os.system, (f"touch {tmp / 'pwned'}",)
    return pickle.dumps({"data": Hostile(), "labels": [1]}, protocol=2)


CORPUS = {
    # configs: unknown keys, wrong types, out-of-range values, conflicting options
    "config-unknown-key": (train_with("train.epochz=3"), ("train.epochz", "train.epochs")),
    "config-unknown-section": (train_with("trian.epochs=3"), ("trian",)),
    "config-wrong-type-int": (train_with("train.batch_size=big"), ("train.batch_size", "int")),
    "config-wrong-type-list": (train_with("train.milestones=0.5"), ("train.milestones", "list")),
    "config-wrong-type-bool": (train_with("data.flip=maybe"), ("data.flip", "bool")),
    "config-eps-above-1": (train_with("attack.eps=1.5"), ("attack.eps", "<= 1.0")),
    "config-eps-zero": (train_with("attack.eps=0"), ("attack.eps", "> 0.0")),
    "config-eps-nan": (train_with("attack.eps=.nan"), ("attack.eps", "finite")),
    "config-density-zero": (lambda b, t: (["prune", "digits_pgdat", *FAST, "--method", "magnitude", "--density",
                                           "0", "--out", t / "new"], []), ("prune.density",)),
    "config-density-above-1": (train_with("prune.density=1.5"), ("prune.density", "<= 1.0")),
    "config-trades-beta-negative": (train_with("train.method=trades", "train.trades_beta=-1"),
                                    ("train.trades_beta", ">= 0.0")),
    "config-ntk-lambda-negative": (train_with("prune.ntk_weight=-0.1"), ("prune.ntk_weight",)),
    "config-trades-with-l2": (train_with("train.method=trades", "attack.norm=L2"), ("trades", "Linf")),
    "config-fgsm-at-with-l2": (train_with("train.method=fgsm_at", "attack.norm=L2"), ("fgsm_at", "Linf")),
    "config-mean-without-std": (train_with("model.mean=[0.5]"), ("model.mean", "model.std")),
    "config-bad-on-overfit": (train_with("train.on_overfit=panic"), ("train.on_overfit", "warn, stop")),
    "config-overfit-drop-zero": (train_with("train.overfit_drop=0"), ("train.overfit_drop",)),
    "config-milestone-out-of-range": (train_with("train.schedule=multistep", "train.milestones=[0.5, 2]"),
                                      ("train.milestones",)),
    "config-malformed-yaml": (yaml_file("train:\n  epochs: [1\n"), ("cfg.yaml", "not valid YAML")),
    "config-python-tag": (yaml_file("train:\n  epochs: !!python/object/apply:os.system ['touch pwned']\n"),
                          ("cfg.yaml", "not valid YAML")),
    "config-not-a-mapping": (yaml_file("- 1\n- 2\n"), ("cfg.yaml", "mapping")),
    "config-binary-file": (yaml_file(b"\xff\xfe\x00bin\x80"), ("cfg.yaml", "UTF-8")),
    # data files
    "cifar-truncated": (data_case("cifar10", lambda t: _cifar_tree(t, lambda p: _truncate(p, 0.7))),
                        ("data_batch_1.bin", "truncated")),
    "cifar-label-out-of-range": (data_case("cifar10", lambda t: _cifar_tree(
        t, lambda p: open(p, "r+b").write(b"\x0c"))), ("data_batch_1.bin", "labels", "[0, 10)")),
    "cifar-python-wrong-shape": (data_case("cifar10", lambda t: _cifar_tree(t, python_batch=pickle.dumps(
        {"data": np.zeros((2, 1024), np.uint8), "labels": [1, 2]}, protocol=2))), ("data_batch_1", "3072")),
    "cifar-python-hostile": (data_case("cifar10", lambda t: _cifar_tree(t, python_batch=_hostile_pickle(t))),
                             ("data_batch_1", "refused")),
    "mnist-truncated-idx": (data_case("mnist", lambda t: _mnist_tree(
        t, images=_idx((4, 28, 28), np.zeros((4, 28, 28)))[:-100])), ("images-idx3-ubyte", "truncated")),
    "mnist-wrong-shape": (data_case("mnist", lambda t: _mnist_tree(
        t, images=_idx((4, 27, 28), np.zeros((4, 27, 28))))), ("images-idx3-ubyte", "28x28")),
    "mnist-bad-magic": (data_case("mnist", lambda t: _mnist_tree(t, labels=b"\x00\x00\x09\x01" + bytes(8))),
                        ("labels-idx1-ubyte", "magic")),
    "mnist-label-count": (data_case("mnist", lambda t: _mnist_tree(t, labels=_idx((3,), np.array([0, 1, 2])))),
                          ("3 labels", "4 images")),
    "mnist-label-out-of-range": (data_case("mnist", lambda t: _mnist_tree(
        t, labels=_idx((4,), np.array([0, 1, 12, 3])))), ("labels-idx1-ubyte", "[0, 10)")),
    "svhn-non-array": (data_case("svhn", lambda t: _svhn_tree(t, {"X": "not an array", "y": np.ones((1, 1))})),
                       ("train_32x32.mat", "expected variables X")),
    "svhn-wrong-shape": (data_case("svhn", lambda t: _svhn_tree(
        t, {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1), np.uint8)})), ("train_32x32.mat", "X")),
    "svhn-label-out-of-range": (data_case("svhn", lambda t: _svhn_tree(
        t, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]], np.uint8)})),
        ("train_32x32.mat", "labels")),
    "svhn-not-matlab": (data_case("svhn", lambda t: _svhn_tree(t, raw=b"MATLAB 5.0 MAT-file" + bytes(50))),
                        ("train_32x32.mat", "MATLAB")),
    # masks (tickets)
    "mask-wrong-shape": (with_ticket(lambda h: _reseal(h, tensor_edit=_set_mask(shape=(3, 3)))), ("shape",)),
    "mask-non-binary": (with_ticket(lambda h: _reseal(h, tensor_edit=_set_mask(value=0.5))), ("0 and 1",)),
    "mask-density-mismatch": (with_ticket(lambda h: _reseal(h, meta_edit=lambda m: m["prune"].update(density=0.5))),
                              ("density 0.5", "do not belong together")),
    "ticket-other-architecture": (with_ticket(lambda h: None, which="ticket16"), ("was found for",)),
    "ticket-missing-weights": (with_ticket(lambda h: os.remove(_weights(h))), ("missing",)),
    # checkpoints
    "checkpoint-truncated": (eval_damaged(lambda h: _truncate(_weights(h))), ("safetensors", "truncated")),
    "checkpoint-hash-mismatch": (eval_damaged(lambda h: _flip_byte(_weights(h))), ("do not match the hash",)),
    "checkpoint-tampered-handle": (eval_damaged(lambda h: json.dump({**json.load(open(h)), "epoch": 7}, open(h, "w"))),
                                   ("best.json", "meta_sha256")),
    "checkpoint-missing-weights": (eval_damaged(lambda h: os.remove(_weights(h))), ("missing",)),
    "checkpoint-wrong-architecture": (eval_damaged(lambda h: _reseal(h, meta_edit=lambda m: m["model_spec"].update(
        options={"width": 16}))), ("does not fit",)),
    "checkpoint-handle-not-json": (eval_damaged(lambda h: open(h, "w").write("{not json")), ("best.json", "JSON")),
    "checkpoint-path-traversal": (eval_damaged(lambda h: _reseal(h) or json.dump(
        {**json.load(open(h)), "weights": "../../run.json"}, open(h, "w"))), ("weights",)),
    "resume-all-checkpoints-damaged": (resume_damaged(lambda h: _truncate(_weights(h))),
                                       ("no intact checkpoint", "truncated")),
    "eval-state-other-evaluation": (eval_state(_other_eval_state), ("s.json", "different evaluation", "eps")),
    "eval-state-damaged": (eval_state(lambda p, run: open(p, "w").write('{"signature": ')), ("s.json", "unreadable")),
}


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 30
    kinds = {key.split("-")[0] for key in CORPUS}
    assert {"config", "cifar", "mnist", "svhn", "mask", "checkpoint"} <= kinds


@pytest.mark.parametrize("key", list(CORPUS))
def test_bad_input_gives_one_clear_error_and_changes_nothing(key, base, tmp_path, capsys):
    make, words = CORPUS[key]
    work = tmp_path / "work"
    work.mkdir()
    argv, watched = make(base, work)
    new = str(work / "new")
    before = {w: tree_digest(w) for w in watched}
    base_before = tree_digest(str(base))
    capsys.readouterr()
    code, out, err = run_cli(capsys, *argv)
    err = "\n".join(line for line in err.splitlines() if not line.startswith("warning: "))
    assert_user_error(code, out, err + "\n", *words)
    assert not os.path.exists(new), "a failed command created its output folder"
    for w in watched:
        assert tree_digest(w) == before[w], f"{w} changed"
    assert tree_digest(str(base)) == base_before
    assert not any(p.name == "pwned" for p in tmp_path.rglob("*")), "a file made us run a command"
    assert not os.path.exists("pwned")


# ---------------------------------------------------------------- property-based fuzzing


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, width=32),
                     st.text(max_size=12), st.sampled_from(["pgd_at", "trades", "fgsm_at", "L2", "Linf", "cosine",
                                                            "digits", "cnn", "stop", "warn", "1e-3", "[1, 2"]))
_KEYS = st.sampled_from(["data", "model", "attack", "train", "prune", "eval", "name", "eps", "epochs", "lr",
                         "options", "width", "method", "norm", "density", "milestones", "on_overfit", "bogus"])
_DOCS = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(_KEYS, inner, max_size=5)), max_leaves=12)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(_DOCS.map(lambda d: yaml.safe_dump(d)), st.text(max_size=80)))
def test_random_yaml_documents_give_a_config_or_a_user_error(doc, tmp_path):
    path = tmp_path / "fuzz.yaml"
    path.write_text(doc, encoding="utf-8")
    try:
        cfg = load_config(str(path))
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(cfg, RunConfig)
    cfg.validate()


def _valid_files() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    cifar = np.concatenate([np.array([[1], [2]], np.uint8), rng.integers(0, 256, (2, 3072), dtype=np.uint8)],
                           axis=1).tobytes()
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"X": rng.integers(0, 256, (32, 32, 3, 2), dtype=np.uint8), "y": np.array([[1], [10]])})
    return {"cifar": cifar, "mat": mat.getvalue(), "idx-images": _idx((2, 28, 28), rng.integers(0, 256, (2, 28, 28))),
            "idx-labels": _idx((2,), np.array([3, 4])),
            "cifar-python": pickle.dumps({"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
                                          "labels": [1, 2]}, protocol=2)}


def _read_as(kind: str, data: bytes, folder) -> None:
    """Put ``data`` where dataset ``kind`` reads it (every file of the split) and load the test split."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind in ("cifar", "cifar-python"):
        sub = folder / ("cifar-10-batches-bin" if kind == "cifar" else "cifar-10-batches-py")
        sub.mkdir(exist_ok=True)
        (sub / ("test_batch.bin" if kind == "cifar" else "test_batch")).write_bytes(data)
        load_dataset("cifar10", "test", root=str(folder))
    elif kind in ("idx-images", "idx-labels"):
        good = _valid_files()
        images = data if kind == "idx-images" else good["idx-images"]
        labels = data if kind == "idx-labels" else good["idx-labels"]
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
        (folder / "t10k-labels-idx1-ubyte").write_bytes(labels)
        load_dataset("mnist", "test", root=str(folder))
    else:
        (folder / "test_32x32.mat").write_bytes(data)
        load_dataset("svhn", "test", root=str(folder))


def _mutations(kind: str):
    valid = _valid_files().get(kind)
    raw = st.binary(max_size=4000)
    if valid is None:
        return raw
    flips = st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), max_size=6)
    mutated = st.tuples(flips, st.integers(0, len(valid))).map(
        lambda p: bytes(v ^ b if i in dict(p[0]) and (b := dict(p[0])[i]) else v for i, v in enumerate(valid))[:p[1]])
    return st.one_of(raw, mutated)


@pytest.mark.parametrize("kind", ["cifar", "cifar-python", "idx-images", "idx-labels", "mat"])
def test_random_and_damaged_data_files_give_data_or_a_user_error(kind, tmp_path):
    counter = iter(range(10**6))

    @settings(max_examples=40, deadline=None)
    @given(data=_mutations(kind))
    def check(data):
        folder = tmp_path / f"case{next(counter)}"
        started = time.perf_counter()
        try:
            _read_as(kind, data, folder)
        except UserError as exc:
            assert str(exc) and "\n" not in str(exc)
        assert time.perf_counter() - started < 10, "a reader hung on a damaged file"
        assert not (folder / "pwned").exists()
    check()
