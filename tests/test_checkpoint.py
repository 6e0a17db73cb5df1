"""Tests for robustsparse.runs.checkpoint (safetensors + JSON handle) and rs.load on a real tiny run."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil

import pytest
import torch

import robustsparse as rs
from robustsparse.errors import UserError
from robustsparse.runs.checkpoint import FORMAT, find_checkpoint, load_checkpoint, read_meta, save_checkpoint

TINY_RUN_OVERRIDES = ["train.epochs=1", "model.options={width: 8}", "attack.steps=1", "train.val_attack_steps=1",
                      "train.batch_size=256"]


@pytest.fixture(scope="module")
def ckpt_run_dir(tmp_path_factory):
    """One tiny trained digits run (a few seconds on a CPU); tests must not modify it (copy it first)."""
    from robustsparse.config import load_config
    from robustsparse.train import train

    run_dir = tmp_path_factory.mktemp("ckpt_run") / "run"
    cfg = load_config("digits_pgdat", TINY_RUN_OVERRIDES)
    train(cfg, str(run_dir), progress=False)
    return str(run_dir)


@pytest.fixture
def run_copy(ckpt_run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(ckpt_run_dir, dst)
    return str(dst)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, 3.4e38])
    return {
        "model.w": torch.randn(4, 3, generator=g),
        "model.special": special,
        "model.half": torch.randn(5, generator=g).half(),
        "model.bf16": torch.randn(5, generator=g).bfloat16(),
        "model.f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "model.long": torch.randint(-2**62, 2**62, (6,), generator=g),
        "model.u8": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8),
        "model.mask": torch.rand(3, 3, generator=g) > 0.5,
        "model.scalar": torch.tensor(2.5),
        "model.empty": torch.zeros(0, 3),
        "model.noncontig": torch.randn(4, 6, generator=g).t(),  # saved contiguous
        "optim.0.momentum_buffer": torch.randn(4, 3, generator=g, requires_grad=True),  # detached on save
    }


def _bits(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.numpy().tobytes() if t.dtype == torch.bool else t.view(torch.uint8).numpy().tobytes()


def _assert_bitwise_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert tuple(got[k].shape) == tuple(v.shape), k
        assert got[k].device.type == "cpu"
        assert _bits(got[k]) == _bits(v), k


META = {"epoch": 3, "step": 0, "best": {"score": 0.5, "epoch": 2}, "epoch_sums": None, "note": "ünïcode ✓",
        "list": [1, 2.5, None, "x"], "config": {"train": {"epochs": 5}}}


def _weights_files(folder, label):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(str(folder), f"{label}.*.safetensors")))


# ---------------------------------------------------------------- save / load


def test_round_trip_bitwise_and_metadata(tmp_path):
    tensors = _tensors()
    handle = save_checkpoint(str(tmp_path / "ck"), "last", tensors, META)
    assert handle == os.path.join(str(tmp_path / "ck"), "last.json")
    got, meta = load_checkpoint(handle)
    _assert_bitwise_equal(got, tensors)
    assert {k: meta[k] for k in META} == META
    assert meta["format"] == FORMAT and meta["label"] == "last"
    assert meta["library_version"] == rs.__version__
    weights = os.path.join(str(tmp_path / "ck"), meta["weights"])
    with open(weights, "rb") as fh:
        assert meta["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert meta["weights"] == f"last.{meta['sha256'][:12]}.safetensors"
    # the handle is plain JSON holding exactly these keys
    with open(handle) as fh:
        on_disk = json.load(fh)
    assert on_disk == meta
    assert {"library_version", "sha256", "weights", "label", "format"} <= set(on_disk)
    assert read_meta(handle) == meta
    # nothing temporary is left behind
    assert sorted(os.listdir(tmp_path / "ck")) == sorted(["last.json", meta["weights"]])


def test_saved_tensors_do_not_alias_inputs(tmp_path):
    tensors = {"a": torch.arange(6.0)}
    handle = save_checkpoint(str(tmp_path), "x", tensors, {})
    tensors["a"].add_(100)
    got, _ = load_checkpoint(handle)
    assert torch.equal(got["a"], torch.arange(6.0))


def test_save_last_twice_keeps_one_weights_file(tmp_path):
    folder = str(tmp_path)
    save_checkpoint(folder, "last", _tensors(0), {"epoch": 1})
    first = _weights_files(folder, "last")
    assert len(first) == 1
    handle = save_checkpoint(folder, "last", _tensors(1), {"epoch": 2})
    second = _weights_files(folder, "last")
    assert len(second) == 1 and second != first
    got, meta = load_checkpoint(handle)
    assert meta["weights"] == second[0] and meta["epoch"] == 2
    _assert_bitwise_equal(got, _tensors(1))
    # saving identical tensors again keeps the (same-named) file
    save_checkpoint(folder, "last", _tensors(1), {"epoch": 3})
    assert _weights_files(folder, "last") == second
    got, meta = load_checkpoint(handle)
    assert meta["epoch"] == 3
    _assert_bitwise_equal(got, _tensors(1))
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_labels_are_independent(tmp_path):
    folder = str(tmp_path)
    save_checkpoint(folder, "best", _tensors(0), {"epoch": 1})
    save_checkpoint(folder, "last", _tensors(0), {"epoch": 1})
    save_checkpoint(folder, "last", _tensors(2), {"epoch": 2})
    assert len(_weights_files(folder, "best")) == 1 and len(_weights_files(folder, "last")) == 1
    got, meta = load_checkpoint(os.path.join(folder, "best.json"))
    assert meta["epoch"] == 1
    _assert_bitwise_equal(got, _tensors(0))


# ---------------------------------------------------------------- damaged checkpoints


@pytest.fixture
def saved(tmp_path):
    handle = save_checkpoint(str(tmp_path), "last", _tensors(), META)
    weights = os.path.join(str(tmp_path), read_meta(handle)["weights"])
    return handle, weights


def test_truncated_weights_refused(saved):
    handle, weights = saved
    size = os.path.getsize(weights)
    with open(weights, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(UserError, match="truncated or was modified") as info:
        load_checkpoint(handle)
    assert os.path.basename(weights) in str(info.value)


def test_flipped_byte_refused(saved):
    handle, weights = saved
    data = bytearray(open(weights, "rb").read())
    data[len(data) - 3] ^= 0x01  # inside the tensor payload: still a valid safetensors file
    open(weights, "wb").write(bytes(data))
    with pytest.raises(UserError, match="truncated or was modified"):
        load_checkpoint(handle)


def test_handle_not_json(saved):
    handle, _ = saved
    with open(handle, "w") as fh:
        fh.write('{"format": "robustsparse-checkpoint/1", "weights": ')  # a half-written handle
    with pytest.raises(UserError, match="not a readable JSON"):
        load_checkpoint(handle)
    with open(handle, "wb") as fh:
        fh.write(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError):
        load_checkpoint(handle)


@pytest.mark.parametrize("content", [{"weights": "x.safetensors"}, {"format": "other/1"}, [1, 2], "text", None])
def test_handle_without_format(tmp_path, content):
    handle = tmp_path / "last.json"
    handle.write_text(json.dumps(content))
    with pytest.raises(UserError, match="not a robustsparse checkpoint"):
        load_checkpoint(str(handle))


def test_missing_handle(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "best.json"))


def test_missing_weights_file(saved):
    handle, weights = saved
    os.remove(weights)
    with pytest.raises(UserError, match="missing"):
        load_checkpoint(handle)


def test_weights_of_another_checkpoint_refused(tmp_path):
    # both files intact, but the handle names the other label's weights: the hash check refuses it
    folder = str(tmp_path)
    a = save_checkpoint(folder, "a", _tensors(0), {})
    b = save_checkpoint(folder, "b", _tensors(1), {})
    meta = json.load(open(a))
    meta["weights"] = read_meta(b)["weights"]
    json.dump(meta, open(a, "w"))
    with pytest.raises(UserError, match="do not match the hash"):
        load_checkpoint(a)


def test_handle_without_weights_key_is_user_error(saved):
    handle, _ = saved
    meta = json.load(open(handle))
    del meta["weights"]
    json.dump(meta, open(handle, "w"))
    with pytest.raises(UserError):
        load_checkpoint(handle)


# ---------------------------------------------------------------- crash safety


def test_stray_temp_file_from_a_kill_mid_write(tmp_path):
    folder = str(tmp_path)
    handle = save_checkpoint(folder, "last", _tensors(0), {"epoch": 1})
    # a kill while writing the next checkpoint: half a weights file in the temp name, a half-written JSON temp,
    # and even a complete, renamed weights file whose handle was never written
    good = open(os.path.join(folder, read_meta(handle)["weights"]), "rb").read()
    open(os.path.join(folder, ".last.safetensors.tmp"), "wb").write(good[: len(good) // 2])
    open(os.path.join(folder, "last.json.tmp"), "w").write('{"format": ')
    orphan = os.path.join(folder, "last.0123456789ab.safetensors")
    open(orphan, "wb").write(good[: len(good) // 3])
    got, meta = load_checkpoint(handle)
    assert meta["epoch"] == 1
    _assert_bitwise_equal(got, _tensors(0))
    assert find_checkpoint(folder, prefer="last") == handle
    # the next save overwrites the stale temp files and still works
    save_checkpoint(folder, "last", _tensors(1), {"epoch": 2})
    got, meta = load_checkpoint(handle)
    assert meta["epoch"] == 2
    _assert_bitwise_equal(got, _tensors(1))
    assert not os.path.exists(os.path.join(folder, ".last.safetensors.tmp"))
    assert not os.path.exists(os.path.join(folder, "last.json.tmp"))


# ---------------------------------------------------------------- find_checkpoint


def test_find_checkpoint_run_folder(run_copy):
    ckpt = os.path.join(run_copy, "checkpoints")
    assert find_checkpoint(run_copy) == os.path.join(ckpt, "best.json")
    assert find_checkpoint(run_copy, prefer="last") == os.path.join(ckpt, "last.json")
    assert find_checkpoint(ckpt) == os.path.join(ckpt, "best.json")
    # without best, falls back to last
    os.remove(os.path.join(ckpt, "best.json"))
    assert find_checkpoint(run_copy) == os.path.join(ckpt, "last.json")
    assert find_checkpoint(run_copy, prefer="best") == os.path.join(ckpt, "last.json")
    # a folder of handles without a checkpoints/ subfolder
    flat = os.path.join(run_copy, "flat")
    save_checkpoint(flat, "last", {"a": torch.ones(1)}, {})
    assert find_checkpoint(flat) == os.path.join(flat, "last.json")


def test_find_checkpoint_json_and_safetensors(tmp_path):
    folder = str(tmp_path)
    best = save_checkpoint(folder, "best", _tensors(0), {})
    last = save_checkpoint(folder, "last", _tensors(1), {})
    assert find_checkpoint(best) == best
    for handle in (best, last):
        weights = os.path.join(folder, read_meta(handle)["weights"])
        assert find_checkpoint(weights) == handle
    # also relative to the current folder
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        assert os.path.abspath(find_checkpoint(read_meta(last)["weights"])) == os.path.abspath(last)
    finally:
        os.chdir(cwd)


def test_find_checkpoint_errors(tmp_path, run_copy):
    with pytest.raises(UserError, match="does not exist"):
        find_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="is not a run folder"):
        find_checkpoint(os.path.join(run_copy, "config.yaml"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        find_checkpoint(str(tmp_path / "empty"))
    stray = tmp_path / "stray.safetensors"
    stray.write_bytes(b"")
    with pytest.raises(UserError, match="refers to it"):
        find_checkpoint(str(stray))


def test_find_checkpoint_safetensors_beside_unrelated_json(tmp_path):
    folder = str(tmp_path)
    handle = save_checkpoint(folder, "last", _tensors(0), {})
    (tmp_path / "a_labels.json").write_text("[1, 2, 3]")  # sorted before last.json
    assert find_checkpoint(os.path.join(folder, read_meta(handle)["weights"])) == handle


# ---------------------------------------------------------------- rs.load on a trained run


def test_rs_load_run(ckpt_run_dir):
    x, y = rs.load_dataset("digits", split="test")
    xb = x[:8]
    for which in ("best", "last"):
        model = rs.load(ckpt_run_dir, which=which)
        assert isinstance(model, torch.nn.Module)
        assert not model.training and all(not m.training for m in model.modules())
        with torch.no_grad():
            out = model(xb)
        assert out.shape == (8, 10) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        # deterministic in eval mode
        with torch.no_grad():
            assert torch.equal(model(xb), out)
    # the loaded weights are exactly the checkpoint's
    tensors, meta = load_checkpoint(find_checkpoint(ckpt_run_dir))
    model = rs.load(ckpt_run_dir)
    for k, v in model.state_dict().items():
        assert torch.equal(v, tensors[f"model.{k}"]), k
    assert meta["model_spec"]["num_classes"] == 10
    assert rs.load_meta(ckpt_run_dir)["label"] == "best"
    assert rs.load_meta(ckpt_run_dir, "last")["label"] == "last"


def test_rs_load_json_and_safetensors_paths(ckpt_run_dir):
    handle = os.path.join(ckpt_run_dir, "checkpoints", "last.json")
    weights = os.path.join(ckpt_run_dir, "checkpoints", read_meta(handle)["weights"])
    x = rs.load_dataset("digits", split="test")[0][:4]
    with torch.no_grad():
        ref = rs.load(ckpt_run_dir, which="last")(x)
        assert torch.equal(rs.load(handle)(x), ref)
        assert torch.equal(rs.load(weights)(x), ref)


def test_rs_load_errors(tmp_path, ckpt_run_dir):
    with pytest.raises(UserError):
        rs.load(ckpt_run_dir, which="latest")
    with pytest.raises(UserError, match="does not exist"):
        rs.load(str(tmp_path / "nope"))


@pytest.mark.parametrize("which", ["best", "last"])
def test_rs_load_truncated_run(run_copy, which):
    handle = os.path.join(run_copy, "checkpoints", f"{which}.json")
    weights = os.path.join(run_copy, "checkpoints", read_meta(handle)["weights"])
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(UserError, match="truncated"):
        rs.load(run_copy, which=which)


def test_rs_load_wrong_architecture(run_copy):
    from robustsparse.runs.checkpoint import _meta_digest
    handle = os.path.join(run_copy, "checkpoints", "best.json")
    meta = json.load(open(handle))
    meta["model_spec"]["options"] = {"width": 16}
    meta["meta_sha256"] = _meta_digest(meta)  # a consistent handle for another architecture, not a damaged one
    json.dump(meta, open(handle, "w"))
    with pytest.raises(UserError, match="does not fit"):
        rs.load(run_copy)
