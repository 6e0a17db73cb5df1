"""Tests for robustsparse.models (CPU, small inputs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustsparse.errors import UserError
from robustsparse.models import (MODELS, DualBatchNorm2d, Normalize, bn_route, build_model, convert_to_dual_bn,
                                 list_models, register_model, set_bn_route)

EXPECTED_NAMES = {"cnn", "smallcnn", "resnet18", "resnet34", "preact_resnet18", "wrn-16-8", "wrn-28-4", "wrn-34-10",
                  "wrn-40-2", "vgg16_bn"}
# Heavy models: only construction + one forward on a 2x3x32x32 batch.
HEAVY = {"resnet34", "wrn-34-10"}
# (in_channels, H, W) per light model; each gets at least two sizes.
SIZES = {
    "cnn": [(1, 8, 8), (3, 32, 32), (3, 96, 96)],
    "smallcnn": [(1, 28, 28), (1, 8, 8), (3, 96, 96)],
    "resnet18": [(1, 8, 8), (3, 32, 32), (3, 96, 96)],
    "preact_resnet18": [(1, 8, 8), (3, 32, 32)],
    "wrn-16-8": [(1, 8, 8), (3, 32, 32)],
    "wrn-28-4": [(1, 8, 8), (3, 32, 32)],
    "wrn-40-2": [(1, 8, 8), (3, 32, 32)],
    "vgg16_bn": [(1, 8, 8), (3, 32, 32), (3, 96, 96)],
}
PARAMS = {"resnet18": 11_173_962, "resnet34": 21_282_122, "wrn-28-10": 36_479_194, "wrn-16-8": 10_961_370}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_names():
    assert set(list_models()) == EXPECTED_NAMES
    assert set(MODELS) == EXPECTED_NAMES
    assert set(SIZES) | HEAVY == EXPECTED_NAMES


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_forward_shapes(name):
    sizes = [(3, 32, 32)] if name in HEAVY else SIZES[name]
    for c, h, w in sizes:
        model = build_model(name, c, 7, (h, w))
        batch = 2 if name in HEAVY or h <= 32 else 1
        out = model.eval()(torch.rand(batch, c, h, w))
        assert out.shape == (batch, 7)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,count", sorted(PARAMS.items()))
def test_parameter_counts(name, count):
    assert n_params(build_model(name, 3, 10, (32, 32))) == count


def test_cnn_small():
    model = build_model("cnn", 1, 10, (8, 8))
    assert n_params(model) < 500_000
    x = torch.rand(128, 1, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None
    narrow = build_model("cnn", 1, 10, (8, 8), width=8)
    assert n_params(narrow) < n_params(model)


def test_only_plain_layers_hold_weights():
    """The pruning package masks `.weight` of nn.Conv2d / nn.Linear; BN must be nn.BatchNorm2d."""
    for name in ["cnn", "resnet18", "preact_resnet18", "wrn-16-8", "vgg16_bn"]:
        model = build_model(name, 3, 10, (32, 32))
        for mod_name, mod in model.named_modules():
            if "weight" in dict(mod.named_parameters(recurse=False)):
                assert type(mod) in (nn.Conv2d, nn.Linear, nn.BatchNorm2d), (name, mod_name, type(mod))


def test_generic_wrn_and_case_insensitive():
    model = build_model("WRN-10-1", 1, 3, (8, 8))
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    assert n_params(build_model(" ResNet18 ", 3, 10, (8, 8))) == PARAMS["resnet18"]
    for bad in ["wrn-20-2", "wrn-4-2", "wrn-16-0"]:
        with pytest.raises(UserError, match="depth|width"):
            build_model(bad, 3, 10, (32, 32))


def test_vgg_skips_pools_on_small_inputs():
    small = build_model("vgg16_bn", 1, 10, (8, 8))
    big = build_model("vgg16_bn", 3, 10, (32, 32))
    pools = lambda m: sum(isinstance(x, nn.MaxPool2d) for x in m.modules())  # noqa: E731
    assert pools(small) == 3 and pools(big) == 5
    assert n_params(big) == 14_728_266


def test_normalize_inside_model():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    plain = build_model("resnet18", 3, 10, (8, 8)).eval()
    normed = build_model("resnet18", 3, 10, (8, 8), mean=mean, std=std).eval()
    normed.net.load_state_dict(plain.net.state_dict())
    assert isinstance(normed[0], Normalize) and isinstance(plain[0], nn.Identity)
    x = torch.rand(4, 3, 8, 8)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normed(x), plain((x - m) / s))
    state = normed.state_dict()
    assert "normalize.mean" in state and "normalize.std" in state
    assert "normalize.mean" not in plain.state_dict()
    assert n_params(normed) == n_params(plain)
    assert normed.to(torch.float64).normalize.mean.dtype == torch.float64


def test_backward_input_gradients():
    for name in ["cnn", "preact_resnet18", "wrn-16-8", "vgg16_bn"]:
        model = build_model(name, 1, 10, (8, 8), mean=(0.5,), std=(0.25,))
        x = torch.rand(3, 1, 8, 8, requires_grad=True)
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_name_lists_models():
    with pytest.raises(UserError) as info:
        build_model("resnet99", 3, 10, (32, 32))
    msg = str(info.value)
    for name in EXPECTED_NAMES:
        assert name in msg
    assert "wrn-{depth}-{widen}" in msg


def test_options():
    with pytest.raises(UserError, match="dropout"):
        build_model("cnn", 1, 10, (8, 8), dropout=0.1)  # cnn accepts only width; message lists it
    with pytest.raises(UserError, match="width"):
        build_model("cnn", 1, 10, (8, 8), dropout=0.1)
    with pytest.raises(UserError, match="none"):
        build_model("resnet18", 3, 10, (32, 32), width=2)
    with pytest.raises(UserError, match="dropout"):
        build_model("wrn-16-8", 3, 10, (32, 32), width=2)
    with pytest.raises(UserError, match="dropout"):
        build_model("wrn-10-1", 3, 10, (8, 8), dropout=1.5)
    with pytest.raises(UserError, match="width"):
        build_model("cnn", 1, 10, (8, 8), width=0)
    with pytest.raises(UserError, match="mean"):
        build_model("cnn", 1, 10, (8, 8), mean=(0.5,))
    with pytest.raises(UserError, match="1 or 3"):
        build_model("cnn", 3, 10, (8, 8), mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(UserError, match="num_classes"):
        build_model("cnn", 1, 0, (8, 8))
    with pytest.raises(UserError, match="input_size"):
        build_model("cnn", 1, 10, 8)
    model = build_model("wrn-10-1", 3, 5, (8, 8), dropout=0.5).train()
    x = torch.rand(4, 3, 8, 8)
    assert not torch.equal(model(x), model(x))  # dropout active in train mode
    model.eval()
    assert torch.equal(model(x), model(x))


def test_register_new_model():
    @register_model("test_tiny_linear")
    def tiny(in_channels, num_classes, input_size, *, bias: bool = True):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size[0] * input_size[1], num_classes,
                                                     bias=bias))

    try:
        assert "test_tiny_linear" in list_models()
        assert build_model("test_tiny_linear", 1, 2, (3, 3), bias=False)(torch.rand(5, 1, 3, 3)).shape == (5, 2)
        with pytest.raises(ValueError):
            register_model("TEST_tiny_linear")(tiny)
    finally:
        MODELS.pop("test_tiny_linear", None)


# ---------------------------------------------------------------- dual batch norm


def _random_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=1e-3, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.num_batches_tracked += 7
    return bn


def test_dual_bn_separate_running_stats():
    dual = convert_to_dual_bn(_random_bn(4)).train()
    assert isinstance(dual, DualBatchNorm2d) and dual.route == "clean"
    assert dual.bn_clean.weight is not dual.bn_adv.weight
    adv_before = {k: v.clone() for k, v in dual.bn_adv.state_dict().items()}
    clean_before = dual.bn_clean.running_mean.clone()
    dual(torch.randn(8, 4, 5, 5) + 3)
    assert not torch.equal(dual.bn_clean.running_mean, clean_before)
    for k, v in dual.bn_adv.state_dict().items():
        assert torch.equal(v, adv_before[k]), k
    dual.route = "adv"
    dual(torch.randn(8, 4, 5, 5))
    assert not torch.equal(dual.bn_adv.running_mean, adv_before["running_mean"])


@pytest.mark.parametrize("train", [True, False])
def test_dual_bn_split_equals_halves(train):
    dual = convert_to_dual_bn(_random_bn(3))
    ref = DualBatchNorm2d.from_batchnorm(_random_bn(3))
    ref.load_state_dict(dual.state_dict())
    with torch.no_grad():  # make the branches differ
        dual.bn_adv.weight.mul_(2)
        ref.bn_adv.weight.mul_(2)
    dual.train(train)
    ref.train(train)
    x = torch.randn(10, 3, 4, 4)
    dual.route = ("split", 6)
    out = dual(x)
    ref.route = "clean"
    a = ref(x[:6])
    ref.route = "adv"
    b = ref(x[6:])
    torch.testing.assert_close(out, torch.cat([a, b]))
    for k, v in dual.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k])
    dual.route = ("split", 10)
    assert dual(x).shape == x.shape
    dual.route = ("split", 11)
    with pytest.raises(ValueError):
        dual(x)


def test_dual_bn_invalid_route():
    dual = DualBatchNorm2d(2)
    for bad in ["both", ("split", -1), ("split", 1.5), ("mix", 2), None]:
        with pytest.raises(ValueError, match="route"):
            dual.route = bad
    with pytest.raises(ValueError):
        set_bn_route(dual, "nope")


@pytest.mark.parametrize("name", ["resnet18", "wrn-10-1", "cnn"])
def test_convert_preserves_output(name):
    model = build_model(name, 1, 10, (8, 8), mean=(0.5,), std=(0.3,))
    model.train()
    with torch.no_grad():  # non-trivial running stats
        for _ in range(3):
            model(torch.rand(16, 1, 8, 8))
    model.eval()
    x = torch.rand(4, 1, 8, 8)
    ref = model(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert convert_to_dual_bn(model) is model
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    assert len(duals) == n_bn
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2 * n_bn
    for route in ["clean", "adv", ("split", 2)]:
        assert set_bn_route(model, route) == n_bn
        assert torch.equal(model(x), ref)
    convert_to_dual_bn(model)  # idempotent
    assert len([m for m in model.modules() if isinstance(m, DualBatchNorm2d)]) == n_bn


def test_bn_route_context_restores():
    model = convert_to_dual_bn(build_model("cnn", 1, 10, (8, 8), width=8))
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    duals[0].route = "adv"
    before = [d.route for d in duals]
    with bn_route(model, ("split", 3)):
        assert all(d.route == ("split", 3) for d in duals)
        model(torch.rand(5, 1, 8, 8))
    assert [d.route for d in duals] == before
    with pytest.raises(RuntimeError):
        with bn_route(model, "adv"):
            assert all(d.route == "adv" for d in duals)
            raise RuntimeError("boom")
    assert [d.route for d in duals] == before
