"""Empirical neural tangent kernel (NTK) of a network, optionally differentiable, optionally memory-bounded.

For a network f with per-sample output f(x) in R^K and parameters θ (the tensors of ``params``),

    Θ(x, x')[i, j, k, l] = Σ_p ∂f_k(x_i)/∂θ_p · ∂f_l(x'_j)/∂θ_p          shape [n1, n2, K, K]  (mode "full")
    Θ_tr(x, x')[i, j]    = Σ_k Θ(x, x')[i, j, k, k]                      shape [n1, n2]        (mode "trace")

The function differentiated is the *per-sample* map f(θ, x_i) = model(x_i[None])[0] (flattened), evaluated with
``torch.func.functional_call`` on the ``params`` dict (the model's other parameters and its buffers are taken from
the model, as constants). Per-sample evaluation needs batch-size-1 forwards, so the model is put in **eval mode**
for the computation and every submodule's previous ``training`` flag is restored afterwards: the NTK of a
batch-norm network is taken with its running statistics (at initialisation (0, 1)), never with batch statistics.

Three paths:

* **unchunked** (``memory_budget_mb=None``, the default): ``vmap(jacrev(f), in_dims=(None, 0))`` gives per-parameter
  Jacobians ``[n, K, *p.shape]`` for all samples at once; Θ = Σ_p J1_p J2_pᵀ over the flattened parameter axis.
  ``x2=None`` (or ``x2 is x1``) reuses the Jacobian of ``x1``. Memory: the whole Jacobian, see
  `estimate_ntk_memory_mb` (ResNet-18, 8 points, 10 classes: 3.4 GB).
* **differentiable** (``differentiable=True``): the same ``torch.func`` computation on the ``params`` tensors
  themselves (not detached), under ``torch.enable_grad()``. ``torch.func`` transforms compose with ordinary
  autograd in this torch (2.x): the result carries an autograd graph back to every ``params`` tensor that requires
  grad (leaves or not, e.g. ``weight * mask`` with a learnable mask), so ``loss(Θ).backward()`` performs the double
  backward. Verified against finite differences (``torch.autograd.gradcheck`` in float64, and central
  differences through a mask on a BN conv net) in ``tests/test_ntk.py``; no
  ``torch.autograd.grad(create_graph=True, is_grads_batched=True)`` fallback was needed.
* **chunked** (``memory_budget_mb`` given; not differentiable: combining both raises ValueError): the Jacobian is
  never held whole. Its rows are indexed by (sample i, output k). A block of x1 rows is computed with
  ``torch.func.vjp`` (one forward per sample in the block, then one backward per row with a one-hot cotangent,
  each row copied into a preallocated ``[rows, *p.shape]`` block: no concatenation, so no doubling). Blocks hold
  as many rows as fit: two blocks plus one row being assembled stay within the budget, so each block is at most
  half of it (``rows · P · element_size`` bytes, P = number of parameters in ``params``). A budget below three
  rows raises `UserError` naming the MB needed. Kernel entries then come from one of two strategies
  (module-level ``chunk_strategy``):

  - ``"jvp"`` (used by the default ``"auto"``): the held x1 block J_a meets *all* x2 rows at once through
    forward-mode AD, ``vmap`` over its rows of ``jvp(θ ↦ f(θ, x2_j), θ, J_a[t])`` = Σ_p ∂f(x2_j)/∂θ_p · J_a[t]_p,
    i.e. a whole row of Θ per held Jacobian row. The x2 Jacobian is never formed, every x1 row is computed
    once, and when x2 is x1 only the upper triangle (x2 samples from the block's first sample on) is evaluated
    and mirrored, so the result is exactly symmetric. Peak Jacobian memory: one block plus one row.
  - ``"vjp"``: x2 row blocks are computed the same way and stream past the held x1 block; Θ is accumulated from
    block products J_a J_bᵀ. When x2 is x1 only block pairs (a, b ≥ a) are computed; the streaming order
    snakes so that the last block of one pass is reused next; in ``"trace"`` mode rows are output-major and
    block pairs without a common output are skipped. Peak: two blocks plus one row. It needs reverse mode only,
    so ``"auto"`` falls back to it when the jvp path raises (a model without forward-mode AD or vmap support,
    e.g. an ``autograd.Function`` without a jvp rule; the reason is kept in ``last_chunk_info``).

  On ResNet-18 (11.2M parameters, 42.6 MB per row; 8 points, 10 classes; budget 512 MB → 5 rows per block) the
  jvp strategy evaluates 80 Jacobian rows and ~380 (row, sample) forward-mode products: ~18-20 s on one busy CPU
  thread, against ~50 s for the vjp strategy (121 block computations). Both agree with float64 references to
  ~1e-7 relative. Float32 products over millions of parameters are summed in float64 chunks (`_gram`): a single
  float32 GEMM over ResNet-18's 11.2M parameters is ~1e-3 off.

  The Jacobian memory held at once (``nbytes`` of the live blocks and of a row being copied in) is tracked: after
  a chunked call, the module-level ``last_peak_block_mb`` holds its peak in MB and ``last_chunk_info`` the
  strategy, rows per block, blocks computed, etc. The budget bounds these Jacobian blocks, not the process:
  autograd's and forward-mode's transient activations come on top (ResNet-18 at 32×32, budget 512 MB: tracked
  peak 256 MB, process RSS +~540 MB including allocator slack).

MB means 2**20 bytes throughout.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from robustsparse.errors import UserError

__all__ = ["empirical_ntk", "ntk_distance", "estimate_ntk_memory_mb", "last_peak_block_mb", "last_chunk_info"]

_MB = float(2 ** 20)

#: Peak Jacobian-block memory (MB) held at once by the last chunked `empirical_ntk` call (0.0 before any).
last_peak_block_mb: float = 0.0
#: Details of the last chunked call: strategy, budget_mb, row_mb, rows_per_block, rows1, rows2, peak_block_mb,
#: jvp_fallback_reason, blocks_computed, jvp_calls, block_pairs.
last_chunk_info: dict = {}

_MODES = ("full", "trace")


# ----------------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's previous ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _resolve_params(model: nn.Module, params: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """The parameters to differentiate w.r.t.: ``params`` (checked), or the model's trainable parameters.

    Default: every parameter with ``requires_grad``; when none has it (a frozen teacher network), all parameters.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
        return chosen or named
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict name -> tensor, got {type(params).__name__}")
    unknown = [n for n in params if n not in named]
    if unknown:
        raise ValueError(f"params names {unknown[:5]} are not parameters of the model; "
                         f"parameter names look like {list(named)[:5]}")
    for n, t in params.items():
        if not isinstance(t, Tensor) or t.shape != named[n].shape:
            raise ValueError(f"params[{n!r}] must be a tensor of shape {tuple(named[n].shape)}, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    return dict(params)


def _param_count_bytes(params: dict[str, Tensor]) -> tuple[int, int]:
    """(number of parameters, bytes of one Jacobian row) for ``params``."""
    count = sum(t.numel() for t in params.values())
    nbytes = sum(t.numel() * t.element_size() for t in params.values())
    return count, nbytes


def _check_inputs(x1: Tensor, x2: Tensor | None) -> None:
    if not isinstance(x1, Tensor) or x1.dim() < 1:
        raise ValueError("x1 must be a tensor with a leading sample dimension")
    if x2 is not None and (not isinstance(x2, Tensor) or x2.shape[1:] != x1.shape[1:]):
        raise ValueError(f"x2 must be a tensor of per-sample shape {tuple(x1.shape[1:])}, "
                         f"got {getattr(x2, 'shape', type(x2).__name__)}")


def _per_sample_fn(model: nn.Module):
    """f(params, x_i) = model(x_i[None])[0], flattened to [K]."""
    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)
    return f


def estimate_ntk_memory_mb(model: nn.Module, n1: int, n2: int | None, num_outputs: int,
                           params: dict[str, Tensor] | None = None) -> float:
    """MB needed by the unchunked `empirical_ntk` to hold its Jacobians and result.

    ``(n1 + n2) · K · P`` Jacobian entries (``n2=None``: x2 is x1, one Jacobian of ``n1 · K · P``) plus the
    ``n1 · n2 · K²`` result, at the parameters' element size. A lower bound: autograd's activations for the
    batched backward come on top. If it is too large, pass ``memory_budget_mb`` to `empirical_ntk`.
    """
    p = _resolve_params(model, params)
    _, row_bytes = _param_count_bytes(p)
    elsize = max((t.element_size() for t in p.values()), default=4)
    rows = (n1 + (n2 if n2 is not None else 0)) * num_outputs
    n2_ = n1 if n2 is None else n2
    return (rows * row_bytes + n1 * n2_ * num_outputs ** 2 * elsize) / _MB


def ntk_distance(a: Tensor, b: Tensor) -> Tensor:
    """Relative Frobenius distance ‖a − b‖_F / ‖b‖_F between two kernels of the same shape (differentiable)."""
    if a.shape != b.shape:
        raise ValueError(f"ntk_distance needs kernels of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)


# -------------------------------------------------------------------------------------------------------- unchunked
def _jacobian(f, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    """Per-parameter Jacobians, name -> [n, K, numel(p)]."""
    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    return {n: j.reshape(j.shape[0], j.shape[1], -1) for n, j in jac.items()}


#: Inner-dimension chunk of the float32 Gram products, accumulated in float64 (see `_gram`).
_GEMM_CHUNK = 1 << 14


def _gram(a: Tensor, b: Tensor) -> Tensor:
    """a @ bᵀ for a [ra, p], b [rb, p]. Low-precision inputs: float32 partial products over chunks of p, summed in
    float64 (one float32 GEMM over millions of parameters loses ~1e-3 relative accuracy on ResNet-18)."""
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return a @ b.t()
    out = None
    # split, not slicing: in a differentiable kernel each slice's backward allocates a zero gradient of the whole
    # [ra, p] and adds into it (13 full-size buffers for smallcnn's fc1); split's backward is one concatenation
    for chunk_a, chunk_b in zip(a.split(_GEMM_CHUNK, dim=1), b.split(_GEMM_CHUNK, dim=1)):
        term = (chunk_a @ chunk_b.t()).double()
        out = term if out is None else out + term
    return out if out is not None else torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)


def _contract(j1: dict[str, Tensor], j2: dict[str, Tensor], mode: str,
              kept: dict[str, Tensor] | None = None) -> Tensor | None:
    """Σ_p over per-parameter Jacobians [n, K, numel(p)]: [n1, n2, K, K] ("full") or [n1, n2] ("trace").

    ``kept``: name -> flat indices of the unpruned coordinates. A masked Jacobian's other columns are zero, so
    only these enter the products: a density-d kernel costs d times the dense GEMMs (and their backward)."""
    out = None
    for n in j1:
        a, b = j1[n], j2[n]
        if kept and n in kept:
            a, b = a.index_select(2, kept[n]), b.index_select(2, kept[n])
        n1, k, _ = a.shape
        n2 = b.shape[0]
        if mode == "full":
            term = _gram(a.reshape(n1 * k, -1), b.reshape(n2 * k, -1)).reshape(n1, k, n2, k).permute(0, 2, 1, 3)
        else:
            term = sum(_gram(a[:, c], b[:, c]) for c in range(k))
        out = term if out is None else out + term
    return out


def _ntk_unchunked(model, x1, x2, params, mode):
    f = _per_sample_fn(model)
    j1 = _jacobian(f, params, x1)
    j2 = j1 if x2 is None else _jacobian(f, params, x2)
    kept = None
    if isinstance(model, _MaskedView):
        kept = {f"inner.{n}": m.flatten().nonzero().squeeze(1) for n, m in model.masks.items()}
    out = _contract(j1, j2, mode, kept)
    if out is None:  # empty params dict
        raise ValueError("params is empty: there is nothing to differentiate w.r.t.")
    return out.to(next(iter(params.values())).dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------- chunked
#: How the chunked path turns held Jacobian blocks into kernel entries: "jvp", "vjp", or "auto" (the default:
#: "jvp", falling back to "vjp" when the model does not support forward-mode AD or vmap). See the module docstring.
chunk_strategy: str = "auto"
_STRATEGIES = ("auto", "jvp", "vjp")
#: jvp path: at most this many (tangent, sample) pairs per forward-mode call (bounds forward-mode activations).
_JVP_PAIRS = 64


class _Tracker:
    """Bytes of Jacobian blocks alive at once, and their peak."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def sub(self, nbytes: int) -> None:
        self.live -= nbytes


class _Block:
    """Jacobian rows (samples[t], outputs[t]) as name -> [rows, *p.shape], and their bytes."""

    def __init__(self, index: int, samples: Tensor, outputs: Tensor, grads: dict[str, Tensor], nbytes: int):
        self.index, self.samples, self.outputs, self.grads, self.nbytes = index, samples, outputs, grads, nbytes

    def __len__(self) -> int:
        return len(self.samples)


def _compute_block(f, params, x: Tensor, index: int, samples: Tensor, outputs: Tensor,
                   tracker: _Tracker) -> _Block:
    """Jacobian rows ∂f_{outputs[t]}(x[samples[t]])/∂θ: one forward (vjp) per run of equal samples, then one
    backward per row with a one-hot cotangent, copied into a preallocated block (never a concatenation)."""
    r = len(samples)
    grads = {n: torch.empty((r, *t.shape), dtype=t.dtype, device=t.device) for n, t in params.items()}
    nbytes = sum(g.numel() * g.element_size() for g in grads.values())
    tracker.add(nbytes)
    row_bytes = nbytes // max(r, 1)
    sl, ol = samples.tolist(), outputs.tolist()
    start = 0
    while start < r:
        stop = start
        while stop < r and sl[stop] == sl[start]:
            stop += 1
        xi = x[sl[start]]
        out, vjp_fn = vjp(lambda p: f(p, xi), params)
        for t in range(start, stop):
            ct = torch.zeros_like(out)
            ct[ol[t]] = 1
            (g,) = vjp_fn(ct)
            tracker.add(row_bytes)  # the row is alive next to the block until copied in
            for n, dst in grads.items():
                dst[t].copy_(g[n])
            del g
            tracker.sub(row_bytes)
        del vjp_fn, out
        start = stop
    return _Block(index, samples, outputs, grads, nbytes)


def _release(block: _Block | None, tracker: _Tracker) -> None:
    if block is not None and block.grads is not None:
        tracker.sub(block.nbytes)
        block.grads = None


def _row_order(n: int, num_outputs: int, output_major: bool) -> tuple[Tensor, Tensor]:
    """(sample, output) of every Jacobian row, sample-major (or output-major)."""
    if not output_major:
        return torch.arange(n).repeat_interleave(num_outputs), torch.arange(num_outputs).repeat(n)
    return torch.arange(n).repeat(num_outputs), torch.arange(num_outputs).repeat_interleave(n)


def _split(samples: Tensor, outputs: Tensor, rows_per_block: int) -> list[tuple[Tensor, Tensor]]:
    return [(samples[s:s + rows_per_block], outputs[s:s + rows_per_block])
            for s in range(0, len(samples), rows_per_block)]


# --- "jvp": each held x1 block meets all x2 rows through forward-mode AD (the x2 Jacobian is never formed)
def _scatter_jvp(out: Tensor, vals: Tensor, block: _Block, js: Tensor, mode: str, symmetric: bool) -> None:
    """vals[t, c, l] = J2[(js[c], l)] · J1[t]ᵀ; write it into Θ / add it into Θ_tr (upper triangle if symmetric)."""
    r, c, num_outputs = vals.shape
    vals = vals.to(out.dtype)
    i = block.samples.view(r, 1, 1).expand(r, c, num_outputs)
    k = block.outputs.view(r, 1, 1).expand(r, c, num_outputs)
    j = js.view(1, c, 1).expand(r, c, num_outputs)
    l = torch.arange(num_outputs).view(1, 1, num_outputs).expand(r, c, num_outputs)
    if mode == "full":
        if not symmetric:
            out[i, j, k, l] = vals
            return
        keep = (j * num_outputs + l) >= (i * num_outputs + k)  # each unordered row pair once
        i, j, k, l, v = i[keep], j[keep], k[keep], l[keep], vals[keep]
        out[i, j, k, l] = v
        out[j, i, l, k] = v
    else:
        keep = l == k
        if symmetric:
            keep &= j >= i
        i, j, v = i[keep], j[keep], vals[keep]
        out.index_put_((i, j), v, accumulate=True)
        if symmetric:
            off = j > i
            out.index_put_((j[off], i[off]), v[off], accumulate=True)


def _chunked_jvp(f, params, x1, x2, symmetric, mode, rows_per_block, num_outputs, out, tracker, stats) -> None:
    n2 = x2.shape[0]
    for a, (samples, outputs) in enumerate(_split(*_row_order(x1.shape[0], num_outputs, False), rows_per_block)):
        block = _compute_block(f, params, x1, a, samples, outputs, tracker)
        stats["blocks_computed"] += 1
        first = int(samples[0]) if symmetric else 0  # symmetric: rows of earlier samples were paired before
        per_call = max(1, _JVP_PAIRS // len(block))
        for c0 in range(first, n2, per_call):
            js = torch.arange(c0, min(n2, c0 + per_call))
            xs = x2[c0:c0 + len(js)]

            def outputs_at(p, xs=xs):
                return vmap(f, in_dims=(None, 0))(p, xs)  # [c, K], per sample

            vals = vmap(lambda t: jvp(outputs_at, (params,), (t,))[1])(block.grads)  # [r, c, K]
            stats["jvp_calls"] += 1
            _scatter_jvp(out, vals, block, js, mode, symmetric)
        _release(block, tracker)


# --- "vjp": x1 blocks held while x2 blocks stream past them; Θ accumulated from block products J_a J_bᵀ
def _block_product(a: _Block, b: _Block) -> Tensor:
    """J_a @ J_bᵀ [rows(a), rows(b)], in the accumulation dtype of `_gram`."""
    prod = None
    for n, ga in a.grads.items():
        term = _gram(ga.reshape(len(a), -1), b.grads[n].reshape(len(b), -1))
        prod = term if prod is None else prod.add_(term)
    return prod


def _scatter(out: Tensor, prod: Tensor, a: _Block, b: _Block, mode: str, transpose: bool) -> None:
    """Write the block product into Θ (full) or add its same-output entries into Θ_tr (trace)."""
    prod = prod.to(out.dtype)
    if transpose:  # the (b, a) block of a symmetric kernel
        prod, a, b = prod.t(), b, a
    ia, ka = a.samples[:, None], a.outputs[:, None]
    ib, kb = b.samples[None, :], b.outputs[None, :]
    if mode == "full":
        out[ia, ib, ka, kb] = prod
    else:
        same = ka == kb
        rows = ia.expand_as(same)[same]
        cols = ib.expand_as(same)[same]
        out.index_put_((rows, cols), prod[same], accumulate=True)


def _chunked_vjp(f, params, x1, x2, symmetric, mode, rows_per_block, num_outputs, out, tracker, stats) -> None:
    trace = mode == "trace"  # output-major rows, so that block pairs without a common output can be skipped
    blocks1 = _split(*_row_order(x1.shape[0], num_outputs, trace), rows_per_block)
    blocks2 = blocks1 if symmetric else _split(*_row_order(x2.shape[0], num_outputs, trace), rows_per_block)

    def compute(x, index, rows):
        stats["blocks_computed"] += 1
        return _compute_block(f, params, x, index, rows[0], rows[1], tracker)

    def needed(rows_a, rows_b):
        return not trace or bool(torch.isin(rows_a[1], rows_b[1]).any())

    def pair(a, b, transpose_too):
        stats["block_pairs"] += 1
        prod = _block_product(a, b)
        if a is b:
            prod = (prod + prod.t()) / 2  # exact symmetry of diagonal blocks
        _scatter(out, prod, a, b, mode, transpose=False)
        if transpose_too:
            _scatter(out, prod, a, b, mode, transpose=True)

    held: _Block | None = None
    cache: _Block | None = None  # the last streamed block, reused when it is needed next
    for a, rows_a in enumerate(blocks1):
        _release(held, tracker)
        held = None
        if symmetric and cache is not None and cache.index == a:
            held, cache = cache, None
        else:
            if symmetric:
                _release(cache, tracker)
                cache = None
            held = compute(x1, a, rows_a)
        if symmetric:
            pair(held, held, transpose_too=False)
            order = reversed(range(a + 1, len(blocks1)))  # descending: the last one, a + 1, is held next
        else:
            order = range(len(blocks2)) if a % 2 == 0 else reversed(range(len(blocks2)))  # snake
        for b in order:
            if not needed(rows_a, blocks2[b]):
                continue
            if cache is None or cache.index != b:
                _release(cache, tracker)
                cache = None
                cache = compute(x2, b, blocks2[b])
            pair(held, cache, transpose_too=symmetric)
    _release(held, tracker)
    _release(cache, tracker)


def _fmt_mb(mb: float, up: bool = False) -> str:
    """0.1 MB resolution from 1 MB on, 3 significant digits below; ``up``: rounded up (a safe minimum)."""
    digits = 1 if mb >= 1 else 2 - math.floor(math.log10(mb))
    scale = 10 ** digits
    value = math.ceil(mb * scale - 1e-9) / scale if up else round(mb, digits)
    return f"{value:.{digits}f}"


def _ntk_chunked(model, x1, x2, params, mode, budget_mb: float) -> Tensor:
    global last_peak_block_mb, last_chunk_info
    if not (isinstance(budget_mb, (int, float)) and not isinstance(budget_mb, bool) and budget_mb > 0
            and math.isfinite(budget_mb)):
        raise UserError(f"memory_budget_mb must be a positive number of MB, got {budget_mb!r}")
    if chunk_strategy not in _STRATEGIES:
        raise ValueError(f"robustsparse.analysis.ntk.chunk_strategy must be one of {_STRATEGIES}, got {chunk_strategy!r}")
    count, row_bytes = _param_count_bytes(params)
    if count == 0:
        raise ValueError("params is empty: there is nothing to differentiate w.r.t.")
    # Two blocks of rows (x1 held, x2 streamed) plus one row being copied into a block: 2·rows + 1 rows.
    rows_per_block = int((budget_mb * _MB // row_bytes - 1) // 2)
    if rows_per_block < 1:
        raise UserError(f"memory_budget_mb={budget_mb:g} is too small for the chunked NTK: one Jacobian row of "
                        f"the {count:,} parameters takes {_fmt_mb(row_bytes / _MB)} MB, and the budget must hold "
                        f"two blocks of at least one row each plus one row being assembled; use "
                        f"memory_budget_mb >= {_fmt_mb(3 * row_bytes / _MB, up=True)}")
    f = _per_sample_fn(model)
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    n1, n2 = x1.shape[0], x2.shape[0]
    first = next(iter(params.values()))
    num_outputs = f(params, x1[0]).numel() if n1 else 0
    shape = (n1, n2, num_outputs, num_outputs) if mode == "full" else (n1, n2)
    acc_dtype = torch.float64 if first.dtype in (torch.float32, torch.float16, torch.bfloat16) else first.dtype
    out = torch.zeros(shape, dtype=acc_dtype, device=first.device)  # accumulated in float64, returned as params'
    if n1 == 0 or n2 == 0:
        return out.to(first.dtype)
    strategy = "jvp" if chunk_strategy == "auto" else chunk_strategy
    fallback_reason = None
    peak = 0
    while True:
        tracker = _Tracker()
        stats = {"blocks_computed": 0, "jvp_calls": 0, "block_pairs": 0}
        run = _chunked_jvp if strategy == "jvp" else _chunked_vjp
        try:
            run(f, params, x1, x2, symmetric, mode, rows_per_block, num_outputs, out, tracker, stats)
            break
        except Exception as err:  # noqa: BLE001  (any failure of the jvp path: retry with plain vjp blocks)
            if strategy != "jvp" or chunk_strategy != "auto":
                raise
            # Forward-mode AD or vmap over it is unsupported by this model (e.g. an autograd.Function without a
            # jvp rule): stream vjp blocks instead, which need reverse mode only. A genuine error recurs there.
            strategy, fallback_reason = "vjp", f"{type(err).__name__}: {err}"[:300]
            out.zero_()
        finally:
            peak = max(peak, tracker.peak)
    last_peak_block_mb = peak / _MB
    last_chunk_info = {"strategy": strategy, "budget_mb": float(budget_mb), "row_mb": row_bytes / _MB,
                       "rows_per_block": rows_per_block, "rows1": n1 * num_outputs, "rows2": n2 * num_outputs,
                       "peak_block_mb": last_peak_block_mb, "jvp_fallback_reason": fallback_reason, **stats}
    return out.to(first.dtype)


# ------------------------------------------------------------------------------------------------------------ entry
class _MaskedView(nn.Module):
    """``model`` with weights m ⊙ u: differentiating w.r.t. u gives J diag(m), the sparse network's Jacobian."""

    def __init__(self, model: nn.Module, masks: dict[str, Tensor]):
        super().__init__()
        self.inner = model
        self.masks = masks

    def forward(self, x: Tensor) -> Tensor:
        params = dict(self.inner.named_parameters())
        return functional_call(self.inner, {n: (p * self.masks[n] if n in self.masks else p)
                                            for n, p in params.items()}, (x,))


def empirical_ntk(model: nn.Module, x1: Tensor, x2: Tensor | None = None, *,
                  params: dict[str, Tensor] | None = None, mode: str = "full", differentiable: bool = False,
                  memory_budget_mb: float | None = None, masks: dict[str, Tensor] | None = None) -> Tensor:
    """Empirical NTK Θ(x1, x2) of ``model`` w.r.t. ``params``: [n1, n2, K, K] ("full") or [n1, n2] ("trace").

    ``params``: name -> tensor for (some of) the model's parameters, used in their place via ``functional_call``
    and summed over in the kernel (default: the parameters with ``requires_grad``, or all of them when none
    has it). ``x2=None``: x2 = x1 (the Jacobian is reused). The model runs in eval mode (batch-norm running
    statistics) and its modes are restored afterwards.

    ``differentiable=True``: the result keeps the autograd graph to the ``params`` tensors that require grad (for
    use inside a loss; double backward through ``torch.func``). Otherwise the result is detached.

    ``masks``: 0/1 tensors by parameter name (default: the model's own mask, if ``apply_mask`` gave it one). The
    kernel is then the sparse network's, Θᵐ = J diag(m) Jᵀ (method-notes §4(b).1): pruned weights are not
    trainable, so their Jacobian columns are dropped. Pass ``masks={}`` for the kernel over every coordinate.

    ``memory_budget_mb``: compute in Jacobian row blocks that together stay under this many MB (see the module
    docstring; `UserError` naming the MB needed if three rows do not fit). Not combinable with
    ``differentiable=True`` (ValueError). After a chunked call, read ``robustsparse.analysis.ntk.last_peak_block_mb`` and
    ``robustsparse.analysis.ntk.last_chunk_info`` as module attributes (a ``from ... import`` copy would not update).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if differentiable and memory_budget_mb is not None:
        raise ValueError("the chunked NTK (memory_budget_mb) is not differentiable; "
                         "pass differentiable=True or memory_budget_mb, not both")
    _check_inputs(x1, x2)
    if masks is None:
        from ..sparse import get_mask
        found = get_mask(model)
        masks = {} if found is None else dict(found.items())
    if masks:
        model = _MaskedView(model, masks)
        params = None if params is None else {f"inner.{k}": v for k, v in params.items()}
    p = _resolve_params(model, params)
    if x2 is x1:
        x2 = None
    with _eval_mode(model):
        if differentiable:
            with torch.enable_grad():
                return _ntk_unchunked(model, x1, x2, p, mode)
        p = {n: t.detach() for n, t in p.items()}
        with torch.no_grad():
            if memory_budget_mb is None:
                return _ntk_unchunked(model, x1, x2, p, mode)
            return _ntk_chunked(model, x1, x2, p, mode, memory_budget_mb)
