"""Each baseline against its reference code's semantics (issue 19), written independently of our code: a few lines
of plain torch following yaodongyu/TRADES ``trades_loss``, inspire-group/hydra ``trainer/adv.py`` and
``models/layers.py::GetSubnet``, and ganguli-lab/Synaptic-Flow ``Pruners/pruners.py`` / ``prune.py``. Each test
checks our default against the reference and that the named option reproduces our earlier behaviour.
"""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustsparse as rs
from robustsparse.attacks.trades import TradesKL
from robustsparse.config import load_config
from robustsparse.posttrain.hydra import ScoredNetwork, _with_pre_forward
from robustsparse.prune import grasp, synflow
from robustsparse.sparse import masks_from_scores, prunable_parameters
from robustsparse.train.objectives import build_objective

EPS, ALPHA, STEPS, BETA = 0.1, 0.025, 3, 6.0


def _images(n=16, seed=0):
    """Digit-like inputs: many pixels exactly 0 or 1, where the start clamp matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    x[x < 0.35] = 0.0
    x[x > 0.8] = 1.0
    return x, torch.randint(0, 10, (n,), generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    model = rs.build_model("cnn", 1, 10, (8, 8), width=8)
    model.train()
    with torch.no_grad():  # non-trivial BN running statistics
        model(_images(32, seed=9)[0])
    return model


def _ref_kl_pgd(model, x, clamp_start=False):
    """trades.py's inner loop: start x + 0.001·randn (unclipped), clip after each step."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape).detach()
    if clamp_start:  # our earlier variant
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    for _ in range(STEPS):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + ALPHA * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


def _ref_trades_loss(model, x, y, forwards=3):
    x_adv = _ref_kl_pgd(model, x)
    model.train()
    logits = model(x)
    logits_adv = model(x_adv)
    target = model(x) if forwards == 3 else logits  # forwards=2: our earlier variant
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(target, dim=1), reduction="sum") / len(x)
    return F.cross_entropy(logits, y) + BETA * robust


def _bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _assert_same_stats(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


def _cfg(*extra):
    return load_config(None, ["train.method=trades", f"train.trades_beta={BETA}", f"attack.eps={EPS}",
                              f"attack.steps={STEPS}", f"attack.alpha={ALPHA}", *extra])


@pytest.mark.parametrize("clamp_start", [False, True])
def test_trades_kl_pgd_start_clamp(clamp_start):
    model, (x, y) = _model(), _images()
    torch.manual_seed(5)
    ours = TradesKL(model, EPS, steps=STEPS, alpha=ALPHA, clamp_start=clamp_start)(x, y)
    torch.manual_seed(5)
    ref = _ref_kl_pgd(copy.deepcopy(model), x, clamp_start=clamp_start)
    # same process and kernels; x + Π(x_adv − x) vs min(max(x_adv, x − ε), x + ε) can differ by one float32 ulp
    assert (ours - ref).abs().max() <= 1e-6
    if not clamp_start:  # and the two orders do differ on these inputs, so the test can fail
        torch.manual_seed(5)
        other = TradesKL(model, EPS, steps=STEPS, alpha=ALPHA, clamp_start=True)(x, y)
        assert (other - ours).abs().max() > 1e-3


@pytest.mark.parametrize("forwards", [3, 2])
def test_trades_objective_forwards_loss_and_bn_stats(forwards):
    model, (x, y) = _model(), _images()
    ref_model = copy.deepcopy(model)
    model.train()
    torch.manual_seed(7)
    out = build_objective(model, _cfg(f"train.trades_forwards={forwards}"))(x, y)
    torch.manual_seed(7)
    ref3 = _ref_trades_loss(ref_model, x, y, forwards=forwards)
    # the loss is the same for 2 and 3 forwards (train-mode BN uses the batch's own statistics)
    assert out.loss.item() == pytest.approx(ref3.item(), rel=1e-6)
    _assert_same_stats(_bn_stats(model), _bn_stats(ref_model), atol=1e-6)  # same ops, same order
    if forwards == 2:  # the running statistics are what tells the variants apart
        three = copy.deepcopy(_model())
        torch.manual_seed(7)
        _ref_trades_loss(three, x, y, forwards=3)
        assert max((a - b).abs().max() for a, b in zip(_bn_stats(model).values(), _bn_stats(three).values())) > 1e-4


@pytest.mark.parametrize("pre_forward", [True, False])
def test_hydra_pre_forward(pre_forward):
    """HYDRA's trainer/adv.py: ``output = model(images)`` (train mode), then ``trades_loss``."""
    model, (x, y) = _model(), _images()
    ref_model = copy.deepcopy(model)
    objective = build_objective(model, _cfg())
    if pre_forward:
        objective = _with_pre_forward(objective, model)
    model.train()
    torch.manual_seed(3)
    out = objective(x, y)
    ref_model.train()
    torch.manual_seed(3)
    if pre_forward:
        ref_model(x)
    ref = _ref_trades_loss(ref_model, x, y)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    _assert_same_stats(_bn_stats(model), _bn_stats(ref_model), atol=1e-6)


class _MaskedNet(nn.Module):
    """The reference's masked layers: the forward computes m ⊙ θ, the parameter is θ."""

    def __init__(self, plain, masks):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(plain[0].weight.detach().clone()), plain[0].bias.detach().clone()
        self.w2, self.b2 = nn.Parameter(plain[3].weight.detach().clone()), plain[3].bias.detach().clone()
        self.m1, self.m2 = masks["0.weight"], masks["3.weight"]

    def forward(self, x):
        h = torch.tanh(F.conv2d(x, self.m1 * self.w1, self.b1))
        return F.linear(h.flatten(1), self.m2 * self.w2, self.b2)


def _ref_grasp(net, batches, T=200.0):
    """Synaptic-Flow's GraSP.score, after prune_loop's apply_mask."""
    params = [net.w1, net.w2]
    with torch.no_grad():
        net.w1.mul_(net.m1)
        net.w2.mul_(net.m2)
    stopped = 0
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(net(x) / T, y), params)
        stopped = stopped + torch.cat([g.reshape(-1) for g in grads])
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(net(x) / T, y), params, create_graph=True)
        (stopped * torch.cat([g.reshape(-1) for g in grads])).sum().backward()
    scores = [p.grad * p.data for p in params]
    norm = torch.abs(sum(s.sum() for s in scores)) + 1e-10
    return [s / norm for s in scores]


def test_grasp_with_mask_follows_masked_layers():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 10)).double()
    masks = {"0.weight": (torch.rand(3, 1, 3, 3) > 0.4).double(), "3.weight": (torch.rand(10, 108) > 0.6).double()}
    batches = [(torch.rand(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,))) for _ in range(2)]
    ours = grasp.score(plain, batches, masks=masks)
    ref = _ref_grasp(_MaskedNet(plain, masks), batches)
    # float64; the two sum the per-batch Hessian-vector products in different orders
    for name, r in zip(["0.weight", "3.weight"], ref):
        assert torch.allclose(ours[name], r, rtol=1e-9, atol=1e-14), name
        assert (ours[name][masks[name] == 0] == 0).all()
    # the convention the old code used (derivatives in w = θ ⊙ m) differs, so this test can fail
    old_model = copy.deepcopy(plain)
    with torch.no_grad():
        for n, p in old_model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    old = grasp.score(old_model, batches)
    assert max(float((old[n] * masks[n] - ours[n]).abs().max() / ours[n].abs().max()) for n in masks) > 1e-3


def _ref_global_mask(scores, density):
    """Synaptic-Flow's _global_mask (its `sparsity` argument is the kept fraction)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int((1.0 - density) * flat.numel())
    if k < 1:
        return {n: torch.ones_like(s) for n, s in scores.items()}
    threshold, _ = torch.kthvalue(flat, k)
    return {n: torch.where(s <= threshold, 0.0, 1.0) for n, s in scores.items()}


@pytest.mark.parametrize("density", [0.1, 0.237, 0.5, 0.013])
def test_keep_count_reference_global(density):
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(37, 11, generator=g, dtype=torch.float64),
              "b": torch.rand(101, generator=g, dtype=torch.float64)}  # continuous: no ties
    ref = _ref_global_mask(scores, density)
    ours = masks_from_scores(scores, density, "global", 0.0, count="reference")
    for n in scores:
        assert torch.equal(ours[n], ref[n].float()), n
    total = 37 * 11 + 101
    assert masks_from_scores(scores, density, "global", 0.0).kept() == round(density * total)  # the round option


def test_synflow_schedule_matches_prune_loop():
    """prune_loop (exponential schedule) with SynFlow scores and _global_mask, against ours with count=reference."""
    torch.manual_seed(0)
    model = rs.build_model("cnn", 1, 10, (8, 8), width=8).double().eval()
    density, rounds = 0.1, 4
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    masks = {f"{n}.weight": torch.ones_like(dict(model.named_modules())[n].weight) for n in names}
    for t in range(1, rounds + 1):
        c = copy.deepcopy(model)
        with torch.no_grad():
            for v in c.state_dict().values():
                if v.is_floating_point():
                    v.abs_()
            for n, p in c.named_parameters():
                if n in masks:
                    p.mul_(masks[n])  # apply_mask
        c(torch.ones(1, 1, 8, 8, dtype=torch.float64)).sum().backward()
        params = dict(c.named_parameters())
        scores = {n: (params[n].grad * params[n]).detach().abs() for n in masks}
        masks = _ref_global_mask(scores, density ** (t / rounds))
    select = functools.partial(masks_from_scores, min_layer_density=0.0, count="reference")
    ours = synflow.synflow_iterative(model, density, rounds=rounds, masks_from_scores=select)
    for n in masks:
        assert torch.equal(ours[n], masks[n].float()), n
    rounded = synflow.synflow_iterative(model, density, rounds=rounds)  # our round() count
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in rounded.values()) == round(density * total)


def _ref_get_subnet(scores, k):
    """HYDRA's GetSubnet.forward: zero the int((1 − k)·n) lowest, keep the rest."""
    out = scores.clone()
    _, idx = scores.flatten().sort()
    j = int((1 - k) * scores.numel())
    flat = out.flatten()
    flat[idx[:j]] = 0
    flat[idx[j:]] = 1
    return flat.reshape(scores.shape)


@pytest.mark.parametrize("count", ["reference", "round"])
def test_hydra_topk_count(count):
    torch.manual_seed(0)
    net = rs.build_model("cnn", 1, 10, (8, 8), width=8)
    g = torch.Generator().manual_seed(2)
    scores = {n: torch.randn(p.shape, generator=g) for n, p in prunable_parameters(net).items()}
    k = 0.13
    mask = ScoredNetwork(net, scores, k, "layer", 0.0, count).mask
    for n, s in scores.items():
        if count == "reference":
            assert torch.equal(mask[n], _ref_get_subnet(s.abs(), k)), n
        else:
            assert int(mask[n].sum()) == max(1, round(k * s.numel())), n
