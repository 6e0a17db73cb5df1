"""Every config in robustsparse/configs/ loads, says how to run it, and trains one step on synthetic data of its shape.

The folder is listed at collection time, so a new config is covered without touching this file. The one-step run
goes through the real trainer (`robustsparse.train.trainer.train`: data, model, objective, optimizer, validation,
checkpoint) with the config's model, method, attack, schedule and augmentation; only what makes it fit seconds on a
CPU is overridden: the data (``synthetic`` with the config's input shape and classes, 4 training and 2 validation
images), ``train.batch_size=4`` and ``train.epochs=1`` (one step), and ``attack.steps=1`` /
``train.val_attack_steps=1``: PGD-k runs the same loop body k times, so one step exercises the code while
WRN-34-10's PGD-10 step alone would take a minute here.
"""
import math
import os
import re
import shutil

import pytest

from robustsparse.config import load_config, resolve_config_path, shipped_configs
from robustsparse.configs import description, shipped_descriptions
from robustsparse.data import dataset_spec
from robustsparse.posttrain.after import AFTER_TRAINING
from robustsparse.runs.checkpoint import find_checkpoint, load_checkpoint

CONFIGS = shipped_configs()
RUN_LINE = re.compile(r"^#\s*Run:\s*robustsparse (\w+) (\S+)", re.M)
COMMAND = re.compile(r"^#.*?robustsparse (\w+) (\S+)", re.M)


def _text(name: str) -> str:
    with open(resolve_config_path(name), encoding="utf-8") as fh:
        return fh.read()


def test_the_issue_settings_are_shipped():
    expected = {"digits_pgdat", "fmnist_pgdat", "fmnist_trades", "cifar10_pgdat_resnet18", "cifar10_trades_wrn34-10",
                "cifar10_fgsmat_preact18", "cifar10_smart_resnet34", "cifar10_oat_resnet34", "cifar10_float_resnet34",
                "svhn_smart_wrn16-8", "cifar10_hydra_vgg16", "cifar10_hydra_wrn28-4", "cifar10_awt_resnet18"}
    assert expected <= set(CONFIGS)
    assert [n for n, _ in shipped_descriptions()] == CONFIGS


def test_description_reads_only_the_header():
    assert description("# description: one line  \n# more\ndata: {}\n") == "one line"
    assert description("# a header without one\ndata: {}\n# description: too late\n") is None
    assert description("\n# description: after a blank line\n") == "after a blank line"


@pytest.mark.parametrize("name", CONFIGS)
def test_header_names_the_command_that_runs_it(name):
    text = _text(name)
    desc = description(text)
    assert desc and "\n" not in desc and len(desc) <= 120
    runs = RUN_LINE.findall(text)
    assert runs, f"{name}: no '# Run: robustsparse <command> {name} ...' header line"
    command, config = runs[0]
    assert config == name
    cfg = load_config(name)
    if command == "posttrain":  # posttrain takes method and density from prune.*
        assert cfg.prune.method in AFTER_TRAINING
    elif command == "prune":
        assert cfg.prune.method not in AFTER_TRAINING
        assert ("train", name) in COMMAND.findall(text), f"{name}: say how its ticket is trained (train {name} --ticket)"
    else:
        assert command == "train"


@pytest.mark.parametrize("name", CONFIGS)
def test_one_training_step_on_synthetic_data_of_the_same_shape(name, tmp_path):
    from robustsparse.train.trainer import train
    cfg = load_config(name)
    spec = dataset_spec(cfg.data.name, **cfg.data.options)
    shape = [spec.channels, *spec.size]
    overrides = [
        "data.name=synthetic", "data.root=null", "data.val_size=2",
        f"data.options={{shape: {shape}, num_classes: {spec.num_classes}, n_train: 6, n_test: 2}}",
        "train.batch_size=4", "train.epochs=1", "attack.steps=1", "train.val_attack_steps=1", "train.device=cpu",
        "train.keep_epochs=[]"]
    if cfg.train.warmup_epochs > 1:
        overrides.append("train.warmup_epochs=1")
    small = load_config(name, overrides)
    out = str(tmp_path / "run")
    try:
        train(small, out, progress=False)
        tensors, meta = load_checkpoint(find_checkpoint(out, prefer="last"))
        assert meta["global_step"] == 1 and meta["model_spec"]["name"] == cfg.model.name
        assert meta["model_spec"]["input_size"] == list(spec.size)
        # one optimizer step was taken: SGD's momentum buffers hold that step's (non-zero) gradients
        momenta = [v for k, v in tensors.items() if k.startswith("optim.") and k.endswith("momentum_buffer")]
        assert momenta and any(float(v.abs().sum()) > 0 for v in momenta)
        assert all(bool(v.isfinite().all()) for k, v in tensors.items() if v.is_floating_point())
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            row = fh.readline()
        loss = float(re.search(r'"train_loss": ([^,}]+)', row).group(1))
        assert math.isfinite(loss)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # WRN-34-10's checkpoints are ~0.4 GB each
