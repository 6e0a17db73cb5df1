"""The sparse core: choosing masks from scores, Mask validation and files, masks that survive training, reports."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustsparse.errors import UserError
from robustsparse.models import build_model
from robustsparse.sparse import (Mask, apply_mask, attach_mask_buffers, enforce_mask, get_mask, is_masked,
                                 mask_optimizer_state, masks_from_scores, prunable_parameters, remove_mask,
                                 sparsity_report)
from robustsparse.sparse.mask import _MaskGrad, _mask_pre_hook


def cnn():
    return build_model("cnn", 1, 10, (8, 8), width=16)


def magnitude_mask(model, density, **kw):
    return masks_from_scores({k: p.abs() for k, p in prunable_parameters(model).items()}, density, **kw)


def reference_global(scores, density, min_layer_density=0.0):
    """The specification, spelled out with a full stable sort and Python loops (small inputs only)."""
    names = list(scores)
    flat = torch.cat([scores[n].flatten().double() for n in names])
    sizes = [scores[n].numel() for n in names]
    layer_of = sum(([i] * n for i, n in enumerate(sizes)), [])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    order = torch.sort(flat, descending=True, stable=True).indices.tolist()
    target = round(density * len(flat))
    kept = set(order[:target])
    mins = [min(n, max(1, math.ceil(round(min_layer_density * n, 9)))) for n in sizes]
    count = [sum(layer_of[j] == i for j in kept) for i in range(len(sizes))]
    short = [i for i in range(len(sizes)) if count[i] < mins[i]]
    extra = 0
    for i in short:
        own = torch.sort(flat[starts[i]:starts[i] + sizes[i]], descending=True, stable=True).indices.tolist()
        kept |= {starts[i] + j for j in own[:mins[i]]}
        extra += mins[i] - count[i]
    for j in reversed(order[:target]):
        i = layer_of[j]
        if extra and i not in short and count[i] > mins[i]:
            kept.discard(j)
            count[i] -= 1
            extra -= 1
    keep = torch.zeros(len(flat))
    keep[sorted(kept)] = 1
    return dict(zip(names, [k.reshape(scores[n].shape) for k, n in zip(keep.split(sizes), names)]))


# ---------------------------------------------------------------------------------------------------------
# masks_from_scores


def test_prunable_parameters_are_conv_and_linear_weights_in_order():
    model = cnn()
    names = list(prunable_parameters(model))
    assert names == [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == ["net.features.0.weight", "net.features.3.weight", "net.features.7.weight",
                     "net.classifier.0.weight", "net.classifier.2.weight"]


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_global_keeps_exact_count_with_ties(density):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randint(0, 5, (50, 20), generator=g).float(), "b": torch.rand(300, generator=g),
              "c": torch.randint(0, 3, (4, 4, 3, 3), generator=g).float()}
    mask = masks_from_scores(scores, density)
    assert mask.kept() == round(density * 1444)
    ref = reference_global(scores, density)
    assert all(torch.equal(mask[k], ref[k]) for k in scores)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.37, 0.9])
def test_global_keeps_the_top_scores(density):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randn(50, 20, generator=g), "b": torch.randn(300, generator=g) + 0.5,
              "c": torch.randn(16, 8, 3, 3, generator=g) - 0.5}
    mask = masks_from_scores(scores, density)
    kept = torch.cat([scores[k][mask[k] == 1] for k in scores])
    dropped = torch.cat([scores[k][mask[k] == 0] for k in scores])
    assert len(kept) == round(density * (1000 + 300 + 1152)) and kept.min() > dropped.max()
    for k in scores:   # one threshold across layers: layer densities differ with the score distributions
        assert 0 < mask.layer_density()[k] < 1
    assert mask.layer_density()["b"] > mask.layer_density()["a"] > mask.layer_density()["c"]


def test_all_equal_scores_keep_exact_count_earliest_first():
    scores = {"a": torch.ones(10, 10), "b": torch.ones(7)}
    mask = masks_from_scores(scores, 0.5)
    assert mask.kept() == round(0.5 * 107) == 54
    assert mask["a"].flatten()[:53].all() and mask["a"].flatten()[53:].sum() == 0
    assert mask["b"].sum() == 1          # the collapse guard: b keeps one, a gives back its last kept entry
    layer = masks_from_scores(scores, 0.3, scope="layer")
    assert layer["a"].sum() == 30 and layer["b"].sum() == round(0.3 * 7)
    assert torch.equal(layer["a"].flatten()[:30], torch.ones(30))


@pytest.mark.parametrize("scope", ["layer", "local"])
def test_layer_scope_keeps_exact_count_per_layer(scope):
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.randint(0, 4, (64, 9), generator=g).float(), "b": torch.randn(10, 100, generator=g),
              "c": torch.zeros(33)}
    for density in (0.05, 0.2, 0.5, 1.0):
        mask = masks_from_scores(scores, density, scope=scope)
        for k, s in scores.items():
            assert mask[k].sum() == max(1, round(density * s.numel()))
            kept, dropped = s[mask[k] == 1], s[mask[k] == 0]
            assert not len(dropped) or kept.min() >= dropped.max()


def test_collapse_guard_keeps_minimum_and_total_stays_exact():
    g = torch.Generator().manual_seed(2)
    scores = {"big": torch.rand(1000, generator=g) + 1, "tiny": torch.rand(200, generator=g) * 1e-9,
              "mid": torch.rand(300, generator=g) + 0.5}
    total = 1500
    plain = masks_from_scores(scores, 0.2)
    assert plain["tiny"].sum() == 1       # never a whole layer, even with min_layer_density=0
    assert plain.kept() == round(0.2 * total)
    guarded = masks_from_scores(scores, 0.2, min_layer_density=0.1)
    assert guarded.kept() == round(0.2 * total)
    for k, s in scores.items():
        assert guarded[k].sum() >= math.ceil(0.1 * s.numel())
        kept, dropped = s[guarded[k] == 1], s[guarded[k] == 0]
        assert kept.min() >= dropped.max()  # within a layer, still its top scores
    assert guarded["tiny"].sum() == 20
    for mld in (0.0, 0.1):
        ref = reference_global(scores, 0.2, mld)
        got = masks_from_scores(scores, 0.2, min_layer_density=mld)
        assert all(torch.equal(got[k], ref[k]) for k in scores)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=30), min_size=1, max_size=5),
       st.floats(0.05, 1.0), st.sampled_from([0.0, 0.05, 0.2]))
def test_global_matches_reference(layers, density, mld):
    scores = {f"l{i}.weight": torch.tensor(v, dtype=torch.float32) for i, v in enumerate(layers)}
    total = sum(len(v) for v in layers)
    needed = sum(min(len(v), max(1, math.ceil(round(mld * len(v), 9)))) for v in layers)
    if needed > round(density * total):
        with pytest.raises(UserError, match="min_layer_density"):
            masks_from_scores(scores, density, min_layer_density=mld)
        return
    mask = masks_from_scores(scores, density, min_layer_density=mld)
    ref = reference_global(scores, density, mld)
    assert all(torch.equal(mask[k], ref[k]) for k in scores)
    assert mask.kept() == round(density * total)
    assert all(mask[k].sum() >= 1 for k in scores)


def test_minus_inf_scores_give_nested_masks():
    """Iterative pruning (SynFlow) scores pruned entries -inf: a lower density must stay inside the old mask."""
    g = torch.Generator().manual_seed(4)
    scores = {"a": torch.rand(200, generator=g), "b": torch.rand(50, 4, generator=g)}
    old = masks_from_scores(scores, 0.5)
    again = {k: torch.rand(s.shape, generator=g).masked_fill(old[k] == 0, float("-inf")) for k, s in scores.items()}
    new = masks_from_scores(again, 0.2, min_layer_density=0.05)
    assert new.kept() == round(0.2 * 400) and new.is_nested_in(old) and not old.is_nested_in(new)


def test_bad_arguments_are_user_errors():
    scores = {"a": torch.rand(10), "b": torch.rand(5)}
    for bad in (0, 0.0, -0.1, 1.5, float("nan"), True, "0.1", None):
        with pytest.raises(UserError, match="density"):
            masks_from_scores(scores, bad)
    with pytest.raises(UserError, match="scope"):
        masks_from_scores(scores, 0.5, scope="per-channel")
    with pytest.raises(UserError, match="'b'.*NaN"):
        masks_from_scores({"a": torch.rand(10), "b": torch.tensor([0.1, float("nan")])}, 0.5)
    with pytest.raises(UserError, match="min_layer_density"):
        masks_from_scores(scores, 0.1, min_layer_density=0.5)   # minimums need more than the target
    with pytest.raises(UserError, match="min_layer_density"):
        masks_from_scores(scores, 0.5, min_layer_density=2.0)
    with pytest.raises(UserError):
        masks_from_scores({}, 0.5)


# ---------------------------------------------------------------------------------------------------------
# Mask


def test_mask_validation_messages():
    model = cnn()
    ones = Mask.ones_like(model)
    assert ones.density() == 1.0 and list(ones.keys()) == list(prunable_parameters(model))
    with pytest.raises(UserError, match="values other than 0 and 1"):
        Mask({"w": torch.tensor([0.0, 0.5, 1.0])})
    with pytest.raises(UserError, match="values other than 0 and 1"):
        Mask({"w": torch.tensor([0.0, float("nan")])})
    key = "net.features.3.weight"
    wrong = {k: (torch.ones(3, 3) if k == key else v) for k, v in ones.items()}
    with pytest.raises(UserError) as err:
        Mask(wrong).check(model)
    assert key in str(err.value) and "(3, 3)" in str(err.value) and "(16, 8, 3, 3)" in str(err.value)
    missing = {k: v for k, v in ones.items() if k != key}
    with pytest.raises(UserError, match=f"missing 1 key.*{key}"):
        Mask(missing).check(model)
    with pytest.raises(UserError, match="extra key.*net.normalize.weight"):
        Mask({**ones.state(), "net.normalize.weight": torch.ones(1)}).check(model)


def test_mask_methods_and_file_round_trip(tmp_path):
    a = Mask({"x": torch.tensor([1.0, 0.0, 1.0, 1.0]), "y": torch.tensor([[True, False]])})
    assert a.density() == 4 / 6 and a.layer_density() == {"x": 0.75, "y": 0.5} and len(a) == 2
    b = Mask({"x": torch.tensor([1.0, 0.0, 0.0, 1.0]), "y": torch.tensor([[1.0, 0.0]])})
    assert b.is_nested_in(a) and not a.is_nested_in(b)
    assert a["y"].dtype == torch.float32 and a.to("cpu")["x"].equal(a["x"])
    path = str(tmp_path / "m.safetensors")
    a.save(path)
    loaded = Mask.load(path)
    assert list(loaded.keys()) == ["x", "y"] and all(torch.equal(loaded[k], a[k]) for k in a.keys())
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:len(data) - 5])
    with pytest.raises(UserError, match="not a readable safetensors"):
        Mask.load(path)
    with open(path, "wb") as fh:
        fh.write(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a readable safetensors"):
        Mask.load(path)
    with pytest.raises(UserError, match="does not exist"):
        Mask.load(str(tmp_path / "missing.safetensors"))
    from safetensors.torch import save_file
    save_file({"x": torch.tensor([0.0, 2.0])}, path)
    with pytest.raises(UserError, match="values other than 0 and 1"):
        Mask.load(path)


# ---------------------------------------------------------------------------------------------------------
# A model carrying a mask


def _train(model, opt, steps=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)], ids=["sgd", "adam", "adamw"])
def test_masked_weights_stay_exactly_zero_through_training(make_opt):
    torch.manual_seed(0)
    model = cnn()
    mask = magnitude_mask(model, 0.3)
    apply_mask(model, mask)
    before = {k: p.detach().clone() for k, p in prunable_parameters(model).items()}
    opt = make_opt(model.parameters())
    _train(model, opt)   # no enforce_mask: the hooks alone must hold
    for k, p in prunable_parameters(model).items():
        off = mask[k] == 0
        assert (p.detach()[off] == 0).all(), k
        assert not torch.equal(p.detach()[~off], before[k][~off]), f"{k} did not train"
        for name, state in opt.state[p].items():
            if isinstance(state, torch.Tensor) and state.shape == p.shape:
                assert (state[off] == 0).all(), f"{k} {name}"


def test_two_forwards_then_backward_still_works():
    """TRADES-style: two forwards in one graph. The pre-hook edits .data, so autograd sees no in-place change."""
    model = apply_mask(cnn(), magnitude_mask(cnn(), 0.5))
    x = torch.rand(4, 1, 8, 8)
    loss = model(x).sum() + model(x + 0.01).sum()
    loss.backward()


def test_hand_edit_is_masked_in_the_next_forward():
    model = cnn().eval()
    apply_mask(model, magnitude_mask(model, 0.2))
    x = torch.rand(5, 1, 8, 8)
    expected = model(x)
    mask = get_mask(model)
    with torch.no_grad():
        for k, p in prunable_parameters(model).items():
            p[mask[k] == 0] = 1.0        # every masked weight becomes non-zero
    assert torch.equal(model(x), expected)
    assert all((p[get_mask(model)[k] == 0] == 0).all() for k, p in prunable_parameters(model).items())


def test_apply_twice_replaces_and_does_not_duplicate_hooks():
    model = cnn()
    apply_mask(model, magnitude_mask(model, 0.8))
    second = magnitude_mask(model, 0.4)
    apply_mask(model, second)
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    assert abs(get_mask(model).density() - second.density()) < 1e-12
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert sum(h is _mask_pre_hook for h in m._forward_pre_hooks.values()) == 1
            assert sum(isinstance(h, _MaskGrad) for h in m.weight._backward_hooks.values()) == 1
    remove_mask(model)
    assert not is_masked(model) and get_mask(model) is None
    assert "net.features.0.weight_mask" not in model.state_dict()


def test_deepcopy_of_masked_model_keeps_its_own_mask_in_training():
    model = apply_mask(cnn(), magnitude_mask(cnn(), 0.3))
    clone = copy.deepcopy(model)
    _train(clone, torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9))
    mask = get_mask(clone)
    assert all((p[mask[k] == 0] == 0).all() for k, p in prunable_parameters(clone).items())


def test_pickled_masked_model_keeps_masking():
    import io
    model = apply_mask(cnn(), magnitude_mask(cnn(), 0.3))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _train(loaded, torch.optim.SGD(loaded.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4))
    mask = get_mask(loaded)
    assert all((p[mask[k] == 0] == 0).all() for k, p in prunable_parameters(loaded).items())


def test_functional_call_on_masked_model_uses_given_weights_untouched():
    from torch.func import functional_call, jacrev, vmap
    model = apply_mask(cnn(), magnitude_mask(cnn(), 0.3)).eval()
    params = {k: torch.randn_like(v) for k, v in model.named_parameters()}
    copies = {k: v.clone() for k, v in params.items()}
    x = torch.rand(3, 1, 8, 8)
    functional_call(model, params, (x,))
    vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))), in_dims=(None, 0))(params, x)
    assert all(torch.equal(params[k], copies[k]) for k in params)


def test_mask_applied_mid_training_and_optimizer_state():
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, steps=2)
    mask = magnitude_mask(model, 0.3)
    apply_mask(model, mask)
    mask_optimizer_state(model, opt)
    _train(model, opt, steps=3, seed=1)
    enforce_mask(model)
    for k, p in prunable_parameters(model).items():
        assert (p[mask[k] == 0] == 0).all() and (opt.state[p]["momentum_buffer"][mask[k] == 0] == 0).all()


def test_state_dict_round_trip_with_attach_mask_buffers():
    torch.manual_seed(3)
    model = cnn()
    apply_mask(model, magnitude_mask(model, 0.25))
    _train(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4), steps=3)
    state = model.state_dict()
    assert "net.features.0.weight_mask" in state and "net.classifier.2.weight_mask" in state
    fresh = cnn()
    attach_mask_buffers(fresh, state)
    fresh.load_state_dict(state)
    x = torch.rand(6, 1, 8, 8)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
    assert get_mask(fresh).density() == get_mask(model).density()
    assert is_masked(fresh)
    dense_state = cnn().state_dict()
    attach_mask_buffers(fresh, dense_state)        # a dense checkpoint: the mask goes away
    fresh.load_state_dict(dense_state)
    assert not is_masked(fresh)
    bad = {**state, "net.features.0.weight_mask": torch.ones(3)}
    with pytest.raises(UserError, match="net.features.0.weight"):
        attach_mask_buffers(cnn(), bad)


# ---------------------------------------------------------------------------------------------------------
# Report


def test_report_cnn_by_hand():
    model = cnn().train()
    rep = sparsity_report(model, (1, 8, 8))
    assert model.training and all(m.training for m in model.modules())   # mode restored
    # conv 1->8 and 8->16 at 8x8, maxpool, 16->32 at 4x4, maxpool, linear 128->256, 256->10
    by_hand = [8 * 8 * 8 * 9, 8 * 8 * 16 * 8 * 9, 4 * 4 * 32 * 16 * 9, 128 * 256, 256 * 10]
    assert [r.macs for r in rep.rows] == by_hand and rep.dense_macs == sum(by_hand)
    assert rep.density == 1.0 and rep.sparse_macs == rep.dense_macs
    assert rep.total_params == sum(p.numel() for p in model.parameters())
    assert "| **total** |" in rep.table() and rep.to_dict()["dense_macs"] == sum(by_hand)
    with pytest.raises(UserError, match="input_shape"):
        sparsity_report(model, (8, 8))
    with pytest.raises(UserError, match="cannot run"):
        sparsity_report(model, (3, 8, 8))


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_model("resnet18", 3, 10, (32, 32))


def test_report_resnet18_counts(resnet18):
    rep = sparsity_report(resnet18, (3, 32, 32))
    assert rep.total_params == 11_173_962
    # Conv + linear MACs of the kuangliu CIFAR ResNet-18. The often-quoted 556,651,520 (thop) also counts
    # BatchNorm as 2 ops per output element: 2 * 614,400 = 1,228,800 more.
    assert rep.dense_macs == 555_422_720
    bn_elements = []
    hooks = [m.register_forward_hook(lambda m, i, o: bn_elements.append(o.numel()))
             for m in resnet18.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        resnet18.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert rep.dense_macs + 2 * sum(bn_elements) == 556_651_520


def test_report_resnet18_sparse(resnet18):
    model = copy.deepcopy(resnet18)
    with torch.no_grad():                # make every non-prunable parameter non-zero (BN biases start at 0)
        prunable = {id(p) for p in prunable_parameters(model).values()}
        for p in model.parameters():
            if id(p) not in prunable:
                p.fill_(0.5)
    mask = magnitude_mask(model, 0.1)
    apply_mask(model, mask)
    rep = sparsity_report(model, (3, 32, 32))
    assert rep.prunable_kept == round(0.1 * rep.prunable_total) == mask.kept()
    assert rep.nonzero_params == rep.total_params - rep.prunable_total + round(0.1 * rep.prunable_total)
    assert abs(rep.nonzero_params - (rep.total_params - 0.9 * rep.prunable_total)) <= 0.5
    assert rep.sparse_macs < rep.dense_macs and rep.masked
    for row in rep.rows:
        assert row.sparse_macs * row.total == row.macs * row.kept
