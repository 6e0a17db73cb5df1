"""The empirical NTK (robustsparse.analysis.ntk): against explicit J·Jᵀ, chunked == unchunked, double backward, ResNet-18.

Tolerances: float32 kernels are compared with float64 references built from plain per-row ``torch.autograd.grad``
Jacobians at rtol 1e-5 / atol 1e-6 (``torch.testing.assert_close``); float64 kernels at rtol 1e-10 / atol 1e-12.
Chunked vs unchunked (both float32): max |difference| <= 1e-5 · max |unchunked|.
These compare float32 kernels computed by other code paths (vmap'd jvp/vjp blocks vs per-row autograd) whose sums
run in another order; no sign() or argmax sits in between, so the error stays at float32 rounding on any CPU.
Measured worst ratio |difference| / tolerance: 0.034 (explicit) and 0.031 (chunked) on AVX-512, 0.040 and 0.021
with AVX2 kernels (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2), 0.034 and 0.021
with oneDNN off, 0.034 and 0.031 at 2 threads. Exact symmetry (torch.equal) is by construction, not by rounding.
"""
import copy
import time

import pytest
import torch
from torch import nn

from robustsparse.analysis import ntk
from robustsparse.errors import UserError
from robustsparse.models import build_model
from robustsparse.analysis.ntk import empirical_ntk, estimate_ntk_memory_mb, ntk_distance

F32 = dict(rtol=1e-5, atol=1e-6)
F64 = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def tiny_convnet():
    """Conv-BN-ReLU-pool-linear with non-trivial BN running statistics, left in train mode."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(12, 4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.2, 0.2)
    return net.train()


MODELS = {"mlp": (tiny_mlp, (6,)), "convnet": (tiny_convnet, (2, 5, 5))}


def inputs(shape, n1=4, n2=3, dtype=torch.float32):
    return torch.randn(n1, *shape, dtype=dtype), torch.randn(n2, *shape, dtype=dtype)


def reference_jacobian(model, x, names=None):
    """[n, K, P] float64 Jacobian of the eval-mode per-sample outputs, one torch.autograd.grad per (i, k) row."""
    model = copy.deepcopy(model).double().eval()
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    rows = []
    for xi in x.double():
        out = model(xi[None])[0].reshape(-1)
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in
                                            torch.autograd.grad(out[k], params, retain_graph=True)])
                                 for k in range(out.numel())]))
    return torch.stack(rows)


def reference_ntk(model, x1, x2=None, mode="full", names=None):
    j1 = reference_jacobian(model, x1, names)
    j2 = j1 if x2 is None else reference_jacobian(model, x2, names)
    return torch.einsum("ikp,jlp->ijkl" if mode == "full" else "ikp,jkp->ij", j1, j2)


def bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------- against explicit Jacobians
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("same", [True, False])
def test_matches_explicit_jacobian(name, mode, same):
    make, shape = MODELS[name]
    model = make()
    x1, x2 = inputs(shape)
    x2 = None if same else x2
    before = bn_state(model)
    got = empirical_ntk(model, x1, x2, mode=mode)
    ref = reference_ntk(model, x1, x2, mode)
    n2 = len(x1) if same else len(x2)
    k = 3 if name == "mlp" else 4
    assert got.shape == ((len(x1), n2, k, k) if mode == "full" else (len(x1), n2))
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), ref, **F32)
    # float64 model: exact up to float64 rounding
    got64 = empirical_ntk(copy.deepcopy(model).double(), x1.double(), None if same else x2.double(), mode=mode)
    torch.testing.assert_close(got64, ref, **F64)
    # modes restored, running statistics untouched (eval mode inside)
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_full_and_trace_agree_and_symmetry():
    model = tiny_convnet()
    x, _ = inputs((2, 5, 5), n1=5)
    full = empirical_ntk(model, x)
    trace = empirical_ntk(model, x, mode="trace")
    torch.testing.assert_close(trace, torch.diagonal(full, dim1=2, dim2=3).sum(-1), **F32)
    torch.testing.assert_close(full, full.permute(1, 0, 3, 2), **F32)  # Θ[i,j,k,l] == Θ[j,i,l,k]
    torch.testing.assert_close(trace, trace.t(), **F32)
    # x2 given as the same points: the same kernel
    torch.testing.assert_close(empirical_ntk(model, x, x.clone()), full, **F32)


def test_params_subset_and_masked_params():
    model = tiny_mlp()
    x1, x2 = inputs((6,))
    sub = {"2.weight": model[2].weight}
    torch.testing.assert_close(empirical_ntk(model, x1, x2, params=sub).double(),
                               reference_ntk(model, x1, x2, names={"2.weight"}), **F32)
    # substituted tensors (weight * mask) are used in place of the model's
    mask = (torch.rand_like(model[0].weight) > 0.5).float()
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[0].weight.mul_(mask)
    params = {n: p for n, p in model.named_parameters()}
    params["0.weight"] = model[0].weight * mask
    torch.testing.assert_close(empirical_ntk(model, x1, x2, params=params), empirical_ntk(masked, x1, x2), **F32)


def test_frozen_model_and_no_grad_context():
    """A frozen teacher (no parameter requires grad) differentiates w.r.t. all parameters, also under no_grad."""
    model = tiny_mlp()
    x1, x2 = inputs((6,))
    ref = empirical_ntk(model, x1, x2)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        got = empirical_ntk(model, x1, x2)
        got_chunked = empirical_ntk(model, x1, x2, memory_budget_mb=0.01)
    torch.testing.assert_close(got, ref, **F32)
    torch.testing.assert_close(got_chunked, ref, **F32)


def test_mixed_train_eval_modes_are_restored():
    model = tiny_convnet()
    model[1].eval()  # the BN already in eval mode, the rest in train mode
    flags = [m.training for m in model.modules()]
    x, _ = inputs((2, 5, 5), n1=2)
    empirical_ntk(model, x, memory_budget_mb=0.01)
    empirical_ntk(model, x, differentiable=True)
    empirical_ntk(model, x)
    assert [m.training for m in model.modules()] == flags


# ------------------------------------------------------------------------------------------------------- chunked
STRATEGIES = ("jvp", "vjp")
CHUNK_CASES = ([(s, "mlp", mode, same, rows) for s in STRATEGIES for mode in ("full", "trace")
                for same in (True, False) for rows in (1, 4)]
               + [(s, "convnet", mode, same, 3) for s in STRATEGIES for mode in ("full", "trace")
                  for same in (True, False)]
               + [(s, "cnn", mode, same, 7) for s in STRATEGIES for mode, same in (("full", True), ("trace", False))])


@pytest.mark.parametrize("strategy, name, mode, same, rows", CHUNK_CASES)
def test_chunked_equals_unchunked(monkeypatch, strategy, name, mode, same, rows):
    monkeypatch.setattr(ntk, "chunk_strategy", strategy)
    if name == "cnn":
        model, shape = build_model("cnn", 1, 10, (8, 8), width=4).train(), (1, 8, 8)
    else:
        make, shape = MODELS[name]
        model = make()
    x1, x2 = inputs(shape, n1=3, n2=2) if name == "cnn" else inputs(shape)
    x2 = None if same else x2
    row_mb = sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20
    budget = (2 * rows + 1) * row_mb * 1.0001  # blocks of `rows` rows: many blocks
    full = empirical_ntk(model, x1, x2, mode=mode)
    chunked = empirical_ntk(model, x1, x2, mode=mode, memory_budget_mb=budget)
    info = ntk.last_chunk_info
    assert info["strategy"] == strategy and info["rows_per_block"] == rows
    assert info["blocks_computed"] >= info["rows1"] // rows > 1
    assert 0 < ntk.last_peak_block_mb <= budget
    assert chunked.shape == full.shape
    assert (chunked - full).abs().max() <= 1e-5 * full.abs().max()
    if same:  # the chunked symmetric kernel is exactly symmetric
        sym = chunked.permute(1, 0, 3, 2) if mode == "full" else chunked.t()
        assert torch.equal(chunked, sym)
    assert all(m.training for m in model.modules())


def test_auto_strategy_falls_back_without_forward_ad(monkeypatch):
    """A model using an autograd.Function without a jvp rule: "auto" falls back to streaming vjp blocks."""

    class Square(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(Square.apply(self.a(x)))

    model = Net()
    x1, _ = inputs((6,))
    monkeypatch.setattr(ntk, "chunk_strategy", "auto")
    full = empirical_ntk(model, x1)
    torch.testing.assert_close(full.double(), reference_ntk(model, x1), **F32)
    chunked = empirical_ntk(model, x1, memory_budget_mb=0.001)
    assert ntk.last_chunk_info["strategy"] == "vjp" and ntk.last_chunk_info["jvp_fallback_reason"]
    assert (chunked - full).abs().max() <= 1e-5 * full.abs().max()
    monkeypatch.setattr(ntk, "chunk_strategy", "jvp")  # no fallback when jvp is asked for explicitly
    with pytest.raises(Exception):
        empirical_ntk(model, x1, memory_budget_mb=0.001)


def test_budget_too_small_names_the_mb():
    model = tiny_mlp()
    x1, _ = inputs((6,))
    row_mb = 53 * 4 / 2 ** 20  # 0.000202 MB; three rows: 0.000607 MB
    with pytest.raises(UserError, match=r"0\.000202 MB.*memory_budget_mb >= 0\.000607"):
        empirical_ntk(model, x1, memory_budget_mb=2.5 * row_mb)
    big = build_model("resnet18", 3, 10, (32, 32))
    with pytest.raises(UserError, match=r"42\.6 MB.*memory_budget_mb >= 127\.9"):
        empirical_ntk(big, torch.rand(1, 3, 32, 32), memory_budget_mb=100)
    with pytest.raises(UserError):
        empirical_ntk(model, x1, memory_budget_mb=-1)


def test_bad_arguments():
    model = tiny_mlp()
    x1, x2 = inputs((6,))
    with pytest.raises(ValueError, match="mode"):
        empirical_ntk(model, x1, mode="diag")
    with pytest.raises(ValueError, match="not both"):
        empirical_ntk(model, x1, differentiable=True, memory_budget_mb=10)
    with pytest.raises(ValueError, match="not parameters"):
        empirical_ntk(model, x1, params={"nope": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        empirical_ntk(model, x1, params={"0.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="per-sample shape"):
        empirical_ntk(model, x1, torch.zeros(2, 7))


# ------------------------------------------------------------------------------------------------ differentiable
@pytest.mark.parametrize("mode", ["full", "trace"])
def test_differentiable_gradcheck(mode):
    """d Θ / d θ (double backward through torch.func) against finite differences, float64."""
    model = tiny_mlp().double()
    x1, x2 = inputs((6,), n1=2, n2=2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    leaves = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def kernel(*tensors):
        return empirical_ntk(model, x1, x2, params=dict(zip(names, tensors)), mode=mode, differentiable=True)

    assert torch.autograd.gradcheck(kernel, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_differentiable_loss_backward_convnet_and_mask():
    """loss = ‖Θ_student − Θ_target‖² backpropagates to a mask inside the params (as in the NTK ticket search),
    with gradients equal to central finite differences; BN network in train mode (eval statistics inside)."""
    model = tiny_convnet().double()
    x1, x2 = inputs((2, 5, 5), n1=2, n2=2, dtype=torch.float64)
    target = empirical_ntk(model, x1, x2) * 0.5
    mask = torch.rand_like(model[0].weight).requires_grad_(True)

    def loss_of(m):
        params = dict(model.named_parameters())
        params["0.weight"] = params["0.weight"] * m
        return ((empirical_ntk(model, x1, x2, params=params, differentiable=True) - target) ** 2).sum()

    loss = loss_of(mask)
    assert loss.requires_grad
    loss.backward()
    grads = mask.grad.clone()
    assert model[5].weight.grad is not None  # the model's own parameters get gradients too
    eps = 1e-6
    flat = mask.detach().reshape(-1)
    for idx in range(0, flat.numel(), 7):
        plus, minus = flat.clone(), flat.clone()
        plus[idx] += eps
        minus[idx] -= eps
        with torch.no_grad():
            numeric = (loss_of(plus.view_as(mask)) - loss_of(minus.view_as(mask))) / (2 * eps)
        assert abs(numeric.item() - grads.reshape(-1)[idx].item()) <= 1e-6 * max(1.0, abs(numeric.item()))
    assert all(m.training for m in model.modules())


def test_not_differentiable_by_default():
    model = tiny_mlp()
    x1, _ = inputs((6,))
    assert not empirical_ntk(model, x1).requires_grad
    assert empirical_ntk(model, x1, differentiable=True).requires_grad


# ----------------------------------------------------------------------------------------------------- helpers
def test_estimate_memory_and_distance():
    model = tiny_mlp()  # 53 parameters, 3 outputs
    assert estimate_ntk_memory_mb(model, 4, None, 3) == pytest.approx((4 * 3 * 53 * 4 + 16 * 9 * 4) / 2 ** 20)
    assert estimate_ntk_memory_mb(model, 4, 2, 3) == pytest.approx((6 * 3 * 53 * 4 + 8 * 9 * 4) / 2 ** 20)
    big = build_model("resnet18", 3, 10, (32, 32))
    assert estimate_ntk_memory_mb(big, 8, None, 10) > 3000  # why ResNet-18 diagnostics need the chunked path
    b = torch.randn(3, 3, 2, 2)
    assert ntk_distance(b, b).item() == 0.0
    assert ntk_distance(2 * b, b).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ntk_distance(b, b[0])


# ------------------------------------------------------------------------------------------------------ ResNet-18
def test_resnet18_chunked_within_budget():
    """8 probe points, budget 512 MB (one row = 42.6 MB, so at most 5 rows per block): [8, 8, 10, 10], finite,
    exactly symmetric, positive diagonal, Jacobian blocks held at once within the budget, entries right."""
    model = build_model("resnet18", 3, 10, (32, 32))
    x = torch.rand(8, 3, 32, 32)
    started = time.perf_counter()
    theta = empirical_ntk(model, x, memory_budget_mb=512)
    seconds = time.perf_counter() - started
    assert theta.shape == (8, 8, 10, 10)
    assert torch.isfinite(theta).all()
    assert torch.equal(theta, theta.permute(1, 0, 3, 2))
    diag = torch.diagonal(torch.diagonal(theta, dim1=0, dim2=1), dim1=0, dim2=1)  # Θ[i, i, k, k]
    assert (diag > 0).all()
    info = ntk.last_chunk_info
    assert info["rows_per_block"] == 5 and 0 < ntk.last_peak_block_mb <= 512
    assert ntk.last_peak_block_mb >= 5 * info["row_mb"]  # the blocks really were as big as the budget allowed
    assert estimate_ntk_memory_mb(model, 8, None, 10) > 6 * 512  # the unchunked path would not fit
    # spot check: samples 0 and 7 from plain autograd rows, their products in float64 (one float32 GEMM over the
    # 11.2M parameters would itself be ~1e-3 off)
    model.eval()
    params = [p for p in model.parameters()]
    rows = []
    outputs = (0, 3, 9)
    for i in (0, 7):
        out = model(x[i:i + 1])[0]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[k], params,
                                                                                      retain_graph=True)])
                                 for k in outputs]).double())
    for a, i in enumerate((0, 7)):
        for b, j in enumerate((0, 7)):
            ref = rows[a] @ rows[b].t()
            got = theta[i, j][list(outputs)][:, list(outputs)].double()
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    print(f"ResNet-18 chunked NTK: {seconds:.1f} s, {info}")


def test_sparse_network_kernel_drops_pruned_coordinates():
    """Θᵐ = J diag(m) Jᵀ for a masked model (method-notes §4(b).1), both from its own mask and from masks=."""
    from robustsparse.sparse import Mask, apply_mask
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(4, 6)
    masks = {"0.weight": (torch.rand(5, 6) > 0.5).float(), "2.weight": (torch.rand(3, 5) > 0.5).float()}
    apply_mask(net, Mask(masks))
    rows = []
    for i in range(len(x)):
        for k in range(3):
            net.zero_grad()
            net(x[i:i + 1])[0, k].backward()
            rows.append(torch.cat([(p.grad * masks.get(n, torch.ones_like(p))).flatten()
                                   for n, p in net.named_parameters()]))
    jac = torch.stack(rows).view(4, 3, -1)
    expected = torch.einsum("ikp,jlp->ijkl", jac, jac)
    assert torch.allclose(empirical_ntk(net, x), expected, rtol=1e-5, atol=1e-6)
    dense = empirical_ntk(net, x, masks={})
    assert not torch.allclose(dense, expected, rtol=1e-3)  # the unmasked kernel differs
