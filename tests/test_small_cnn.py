"""``smallcnn``: the SmallCNN of the TRADES code (yaodongyu/TRADES models/small_cnn.py), any input size, prunable."""
import pytest
import torch

from robustsparse.config import load_config
from robustsparse.errors import UserError
from robustsparse.models import build_model, list_models
from robustsparse.models.small_cnn import reference_param_count
from robustsparse.prune.registry import find_ticket
from robustsparse.sparse.mask import load_model_state
from robustsparse.sparse import apply_mask, prunable_parameters


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_matches_the_reference_architecture_on_28x28():
    m = build_model("smallcnn", 1, 10, (28, 28))
    assert "smallcnn" in list_models() and "cnn" in list_models()
    # the reference's layers, by hand: 4 convs (3x3, bias) 32-32-64-64, fc 64*4*4 -> 200 -> 200 -> 10
    by_hand = (9 * 1 * 32 + 32) + (9 * 32 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64) \
        + (1024 * 200 + 200) + (200 * 200 + 200) + (200 * 10 + 10)
    assert _count(m) == reference_param_count() == by_hand == 312202
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64] and all(c.padding == (0, 0) for c in convs)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    assert [n for n, _ in m.net.classifier.named_children()] == ["fc1", "relu1", "drop", "fc2", "relu2", "fc3"]
    assert m.net.classifier.drop.p == 0.5 and m.net.classifier.fc1.in_features == 1024
    # fc3 is not zero-initialised by default (pruning at init needs gradients through it); the option restores it
    assert m.net.classifier.fc3.weight.abs().sum() > 0
    z = build_model("smallcnn", 1, 10, (28, 28), zero_init_last=True)
    assert z.net.classifier.fc3.weight.abs().sum() == 0 and z.net.classifier.fc3.bias.abs().sum() == 0


@pytest.mark.parametrize("shape,classes", [((1, 28, 28), 10), ((3, 32, 32), 10), ((3, 32, 32), 100),
                                           ((1, 8, 8), 10), ((3, 5, 7), 3), ((2, 1, 1), 2)])
def test_any_input_size_channels_and_classes(shape, classes):
    m = build_model("smallcnn", shape[0], classes, shape[1:]).eval()
    assert m(torch.rand(3, *shape)).shape == (3, classes)
    if min(shape[1:]) >= 16:  # no conv padded and no pool skipped: the reference's closed form holds
        assert _count(m) == reference_param_count(shape[0], classes, shape[1:])


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="dropout"):
        build_model("smallcnn", 1, 10, (28, 28), dropout=1.5)
    with pytest.raises(UserError, match="zero_init_last"):
        build_model("smallcnn", 1, 10, (28, 28), zero_init_last="yes")
    with pytest.raises(UserError, match="width"):
        build_model("smallcnn", 1, 10, (28, 28), width=3)


@pytest.mark.parametrize("method", ["magnitude", "snip", "synflow"])
def test_pruning_at_init_and_masks_work(method):
    cfg = load_config("fmnist_pgdat", ["data.name=synthetic", "data.options={shape: [1, 28, 28], n_train: 40}",
                                       f"prune.method={method}", "prune.density=0.1", "prune.synflow_rounds=5"])
    torch.manual_seed(0)
    model = build_model("smallcnn", 1, 10, (28, 28))
    x, y = torch.rand(40, 1, 28, 28), torch.randint(0, 10, (40,))
    ticket = find_ticket(model, cfg, x, y, progress=False)
    assert abs(ticket.mask.density() - 0.1) < 0.01
    names = set(prunable_parameters(model))
    assert {"net.features.conv1.weight", "net.classifier.fc3.weight"} <= names and len(names) == 7
    load_model_state(model, ticket.state)
    apply_mask(model, ticket.mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # masked weights stay exactly zero through optimizer steps
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    params = prunable_parameters(model)
    for name, keep in ticket.mask.items():
        assert torch.all(params[name].detach()[~keep.bool()] == 0)
        assert params[name].detach()[keep.bool()].abs().sum() > 0


def _reference_order(net):
    """The same modules in the reference's order, conv → ReLU → maxpool (ours pools before the ReLU)."""
    names = [n for n, _ in net.features.named_children()]
    for i, name in enumerate(list(names)):
        if name.startswith("maxpool"):
            names[i], names[i + 1] = names[i + 1], names[i]
    assert all(a.startswith("relu") and b.startswith("maxpool") for a, b in zip(names, names[1:])
               if b.startswith("maxpool"))
    features = torch.nn.Sequential(*(getattr(net.features, n) for n in names))
    return lambda x: net.classifier(features(x).flatten(1))


@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_before_relu_is_bit_identical_to_the_reference_order(channels_last):
    """Outputs, input gradients and weight gradients equal bit for bit (torch.equal): the convolutions see the
    same tensors either way, so this holds on any CPU. Ties are forced: a constant image makes every 2x2 window
    of every map a tie, and negative biases make whole windows ≤ 0."""
    torch.manual_seed(0)
    m = build_model("smallcnn", 1, 10, (28, 28)).eval()
    net = m.net
    with torch.no_grad():
        net.features.conv2.bias.fill_(-0.05)
        net.features.conv4.bias.fill_(-0.05)
    x = torch.cat([torch.rand(6, 1, 28, 28), torch.full((2, 1, 28, 28), 0.5), torch.zeros(1, 1, 28, 28)])
    if channels_last:
        net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (len(x),))
    results = []
    for forward in (net, _reference_order(net)):
        xi = x.clone().requires_grad_(True)
        out = forward(xi)
        params = [p for p in net.parameters()]
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), [xi, *params])
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert grads_a[0].abs().sum() > 0  # the check compares real gradients, not zeros
    # the ties are real: on the constant images every window of the first pool's input is a tie
    pre_pool = net.features.conv2(net.features.relu1(net.features.conv1(x[6:8])))
    assert torch.equal(pre_pool[..., ::2, ::2], pre_pool[..., 1::2, 1::2])
