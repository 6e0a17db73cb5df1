"""Pruning-at-initialization scorers: each compared with an independent computation of its reference formula."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import robustsparse  # noqa: F401  (registers the models)
from robustsparse.errors import UserError
from robustsparse.models.registry import build_model
from robustsparse.prune import grasp, magnitude, random_prune, snip, synflow
from robustsparse.prune.scoring import _prunable, topk_masks


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def _cnn():
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, (8, 8), width=8)
    with torch.no_grad():  # non-trivial BN (eval mode uses these running statistics)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


CASES = {"tiny": (_tiny, (1, 4, 4), 4), "cnn": (_cnn, (1, 8, 8), 10)}


def _setup(case, dtype=torch.float64):
    factory, shape, classes = CASES[case]
    model = factory().to(dtype)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(6, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (6,), generator=g))
               for _ in range(2)]
    return model, batches, shape


def _random_masks(model, keep=0.7, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.rand(p.shape, generator=g) < keep).to(p.dtype) for n, p in _prunable(model).items()}


def _masked_copy(model, masks):
    c = copy.deepcopy(model).eval()
    with torch.no_grad():
        for n, p in c.named_parameters():
            if masks and n in masks:
                p.mul_(masks[n])
    return c


def _close(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].shape == b[n].shape, n
        assert torch.allclose(a[n].to(torch.float64), b[n].to(torch.float64), rtol=1e-5, atol=1e-12), n


def _ref_snip(model, batches, masks):
    c = _masked_copy(model, masks)
    names = list(_prunable(c))
    params = dict(c.named_parameters())
    ws = [params[n] for n in names]
    g = [torch.zeros_like(w) for w in ws]
    for x, y in batches:
        for acc, gi in zip(g, torch.autograd.grad(F.cross_entropy(c(x), y), ws)):
            acc += gi
    s = {n: (gi * w).detach().abs() for n, gi, w in zip(names, g, ws)}
    total = sum(v.sum() for v in s.values())
    return {n: v / total for n, v in s.items()}


def _ref_grasp(model, batches, masks, T=200.0):
    c = _masked_copy(model, masks)
    names = list(_prunable(c))
    w0 = tuple(p.detach().clone() for n, p in c.named_parameters() if n in names)
    ms = tuple(masks[n].to(w.dtype) if masks and n in masks else torch.ones_like(w) for n, w in zip(names, w0))

    # the reference's masked layers compute m ⊙ θ in the forward and differentiate in θ: Hg = m ⊙ H(m ⊙ g)
    def total_loss(*ws):
        masked = {n: w * m for n, w, m in zip(names, ws, ms)}
        return sum(F.cross_entropy(functional_call(c, masked, (x,)) / T, y) for x, y in batches)

    leaves = [w.clone().requires_grad_() for w in w0]
    g = torch.autograd.grad(total_loss(*leaves), leaves)
    _, hg = torch.autograd.functional.hvp(total_loss, w0, tuple(g))
    s = {n: h * w for n, h, w in zip(names, hg, w0)}
    norm = torch.abs(sum(v.sum() for v in s.values())) + 1e-10
    return {n: v / norm for n, v in s.items()}


def _ref_synflow(model, shape, masks):
    c = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for v in c.state_dict().values():
            if v.is_floating_point():
                v.abs_()
        for n, p in c.named_parameters():
            if masks and n in masks:
                p.mul_(masks[n].double())
    c(torch.ones(1, *shape, dtype=torch.float64)).sum().backward()
    params = dict(c.named_parameters())
    return {n: (params[n].grad * params[n]).detach().abs() for n in _prunable(c)}


@pytest.mark.parametrize("case", ["tiny", "cnn"])
@pytest.mark.parametrize("use_masks", [False, True])
def test_snip_matches_reference(case, use_masks):
    model, batches, _ = _setup(case)
    masks = _random_masks(model) if use_masks else None
    got = snip.score(model, batches, masks=masks)
    _close(got, _ref_snip(model, batches, masks))
    assert abs(float(sum(v.sum() for v in got.values())) - 1.0) < 1e-9
    if masks:
        assert all((got[n][masks[n] == 0] == 0).all() for n in got)


@pytest.mark.parametrize("case", ["tiny", "cnn"])
@pytest.mark.parametrize("use_masks", [False, True])
def test_grasp_matches_hvp_reference(case, use_masks):
    model, batches, _ = _setup(case)
    masks = _random_masks(model) if use_masks else None
    got = grasp.score(model, batches, masks=masks)
    _close(got, _ref_grasp(model, batches, masks))
    assert any((v < 0).any() for v in got.values())  # signed: +θ⊙Hg, higher = keep
    assert abs(float(sum(v.sum() for v in got.values()))) <= 1.0  # |Σ S| = |Σ Hg⊙θ| / (|Σ Hg⊙θ| + 1e-10)


@pytest.mark.parametrize("case", ["tiny", "cnn"])
@pytest.mark.parametrize("use_masks", [False, True])
def test_synflow_matches_abs_network_gradient(case, use_masks):
    model, batches, shape = _setup(case, dtype=torch.float32)
    masks = _random_masks(model) if use_masks else None
    got = synflow.score(model, batches, masks=masks)
    assert all(v.dtype == torch.float64 and (v >= 0).all() for v in got.values())
    _close(got, _ref_synflow(model, shape, masks))
    _close(synflow.score(model, None, masks=masks, input_shape=shape), got)
    if case == "cnn":  # input shape from the ImageClassifier's metadata
        _close(synflow.score(model, None, masks=masks), got)


def test_synflow_closed_form_two_layer_linear():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 3, bias=False)).double()
    a1, a2 = net[0].weight.detach().abs(), net[2].weight.detach().abs()
    got = synflow.score(net, None, input_shape=(5,))
    # R = 1ᵀ|W2||W1|1: dR/d|W1|_ij = Σ_k |W2|_ki, dR/d|W2|_ki = Σ_j |W1|_ij
    expected = {"0.weight": a1 * a2.sum(0)[:, None], "2.weight": a2 * a1.sum(1)[None, :]}
    _close(got, expected)
    r = (a2 @ a1 @ torch.ones(5, dtype=torch.float64)).sum()
    for v in got.values():  # synaptic flow is conserved: every layer's scores sum to R
        assert torch.allclose(v.sum(), r)


def test_magnitude_and_random():
    model, _, _ = _setup("cnn", dtype=torch.float32)
    weights = _prunable(model)
    masks = _random_masks(model)
    _close(magnitude.score(model, None), {n: w.detach().abs() for n, w in weights.items()})
    _close(magnitude.score(model, None, masks=masks), {n: (w.detach() * masks[n]).abs() for n, w in weights.items()})
    a, b, c = random_prune.score(model, None), random_prune.score(model, None, seed=0), random_prune.score(model, None,
                                                                                                          seed=1)
    assert {n: v.shape for n, v in a.items()} == {n: w.shape for n, w in weights.items()}
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)


SCORERS = {
    "random": (random_prune.score, {}),
    "magnitude": (magnitude.score, {}),
    "snip": (snip.score, {"train_mode": True}),
    "snip_eval": (snip.score, {}),
    "grasp": (grasp.score, {"train_mode": True}),
    "synflow": (synflow.score, {}),
}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorers_leave_model_unchanged(name):
    fn, opts = SCORERS[name]
    model, batches, _ = _setup("cnn", dtype=torch.float32)
    model.train()
    model.net.features[1].eval()  # mixed modes must come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    scores = fn(model, batches, masks=_random_masks(model), **opts)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert scores.keys() == _prunable(model).keys()
    assert all(torch.isfinite(v).all() for v in scores.values())


def test_bad_inputs():
    model, batches, _ = _setup("tiny")
    with pytest.raises(UserError, match="at least one"):
        snip.score(model, [])
    with pytest.raises(UserError, match="unknown or non-prunable"):
        magnitude.score(model, None, masks={"0.bias": torch.ones(3)})
    with pytest.raises(UserError, match="shape"):
        grasp.score(model, batches, masks={"0.weight": torch.ones(3)})
    with pytest.raises(UserError, match="input shape"):
        synflow.score(model, None)
    with pytest.raises(UserError, match="density"):
        synflow.synflow_iterative(model, 0.0, input_shape=(1, 4, 4))


def test_topk_masks_exact_and_deterministic():
    scores = {"a": torch.ones(2, 3), "b": torch.tensor([5.0, float("-inf"), 1.0, 1.0])}
    m = topk_masks(scores, 0.5, "global")  # round(0.5 * 10) = 5: b[0], then ties at 1.0 in order
    assert m["a"].flatten().tolist() == [1, 1, 1, 1, 0, 0] and m["b"].tolist() == [1, 0, 0, 0]
    m = topk_masks(scores, 0.5, "local")
    assert m["a"].sum() == 3 and m["b"].tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("scope", ["global", "local"])
def test_synflow_iterative_schedule_count_and_nesting(scope):
    model, _, _ = _setup("cnn", dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = {n: w.numel() for n, w in _prunable(model).items()}
    total, density, rounds = sum(sizes.values()), 0.05, 5
    seen = []
    final = synflow.synflow_iterative(model, density, rounds=rounds, input_shape=(1, 8, 8), scope=scope,
                                      callback=lambda t, m: seen.append((t, m)))
    assert [t for t, _ in seen] == list(range(1, rounds + 1))
    prev = {n: torch.ones(s) for n, s in sizes.items()}
    for t, masks in seen:
        d = density ** (t / rounds)
        if scope == "global":
            assert sum(int(m.sum()) for m in masks.values()) == round(d * total)
        else:
            assert all(int(masks[n].sum()) == round(d * sizes[n]) for n in sizes)
        assert all(((masks[n] == 1) <= (prev[n].reshape(masks[n].shape) == 1)).all() for n in sizes)  # nested
        assert all(set(torch.unique(m).tolist()) <= {0.0, 1.0} for m in masks.values())
        prev = masks
    assert all(torch.equal(final[n], seen[-1][1][n]) for n in sizes)
    if scope == "global":
        assert sum(int(m.sum()) for m in final.values()) == round(density * total)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_synflow_iterative_uses_given_mask_function():
    model, _, _ = _setup("tiny")
    calls = []

    def select(scores, density, scope):
        calls.append((density, scope))
        return topk_masks(scores, density, "global")

    masks = synflow.synflow_iterative(model, 0.2, rounds=3, input_shape=(1, 4, 4), scope="layer",
                                      masks_from_scores=select)
    assert [s for _, s in calls] == ["layer"] * 3 and calls[-1][0] == pytest.approx(0.2)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * (27 + 192))


def test_synflow_avoids_layer_collapse_where_magnitude_does_not():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 20, bias=False), nn.ReLU(), nn.Linear(20, 20, bias=False), nn.ReLU(),
                        nn.Linear(20, 20, bias=False))
    with torch.no_grad():
        net[2].weight.mul_(1e-3)  # a layer of tiny weights: global magnitude removes all of it
    density = 0.3
    mag = topk_masks(magnitude.score(net, None), density, "global")
    assert int(mag["2.weight"].sum()) == 0  # layer collapse: the network is disconnected
    syn = synflow.synflow_iterative(net, density, rounds=20, input_shape=(20,))
    assert sum(int(m.sum()) for m in syn.values()) == round(density * 1200)
    assert all(int(m.sum()) > 0 for m in syn.values())
    # and the kept network still conducts: the masked |W| product has a non-zero path
    a = [(net[i].weight.detach().abs() * syn[f"{i}.weight"]) for i in (0, 2, 4)]
    assert (a[2] @ a[1] @ a[0]).sum() > 0
