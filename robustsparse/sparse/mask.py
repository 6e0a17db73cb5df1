"""Binary masks over the prunable weights, how masks are chosen from scores, and how a model carries one.

Definitions used by the whole library:

* **Prunable parameters**: the ``.weight`` of every ``nn.Conv2d`` and ``nn.Linear``; biases, BatchNorm and the
  input normalisation are never pruned. A mask is keyed by the full name from ``model.named_parameters()``
  (e.g. ``net.layer1.0.conv1.weight``).
* **density** = kept / total over the prunable weights (density 0.1 keeps 10%); **sparsity** = 1 - density.

A masked model carries its mask as a buffer ``weight_mask`` on each pruned module, so the mask is in
``state_dict`` (``<module>.weight_mask``), moves with ``.to()`` and is saved with the weights. Two hooks keep
masked weights at exactly 0: a forward pre-hook re-multiplies ``weight.data`` by the mask before every forward (a
hand edit cannot leak into an output), and a gradient hook zeroes their gradient, so SGD momentum, weight decay
and Adam moments stay exactly 0 there too (decay of 0 is 0, a zero moment gives a zero step).
"""
from __future__ import annotations

import math
import os
import weakref

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import UserError

MASK_FORMAT = "robustsparse-mask/1"
_PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


def _prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name -> owning conv/linear module, in ``named_parameters`` order (shared weights counted once)."""
    params = dict(model.named_parameters())
    out = {}
    for mod_name, module in model.named_modules():
        if not isinstance(module, _PRUNABLE_TYPES):
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        if not isinstance(module.weight, nn.Parameter):
            raise UserError(f"{mod_name or type(module).__name__}: weight is not a plain parameter (is "
                            "torch.nn.utils.prune or parametrize applied?); remove that before using masks")
        if params.get(name) is module.weight:
            out[name] = module
    return out


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of every Conv2d/Linear, keyed by full parameter name, ordered as in ``named_parameters``."""
    return {name: module.weight for name, module in _prunable_modules(model).items()}


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t) + ")"


class Mask:
    """A validated mapping parameter name -> float32 tensor of exact 0s and 1s (1 = kept).

    Validation happens once here, so every consumer can trust a `Mask`. The tensors are copies: changing the
    dict or tensors passed in does not change the mask.
    """

    def __init__(self, tensors: dict[str, Tensor]):
        if not isinstance(tensors, dict) or not tensors:
            raise UserError("a mask needs a non-empty dict of parameter name -> 0/1 tensor")
        self._t: dict[str, Tensor] = {}
        for key, t in tensors.items():
            if not isinstance(key, str) or not isinstance(t, Tensor):
                raise UserError(f"mask entry {key!r}: keys must be parameter names and values tensors, "
                                f"got {type(key).__name__} -> {type(t).__name__}")
            t = t.detach().to(dtype=torch.float32, copy=True)
            bad = (t != 0) & (t != 1)
            if bad.any():
                raise UserError(f"mask entry {key!r} holds values other than 0 and 1 "
                                f"(e.g. {t[bad].flatten()[0].item()}); a mask must be binary")
            self._t[key] = t

    @classmethod
    def _trusted(cls, tensors: dict[str, Tensor]) -> "Mask":
        mask = cls.__new__(cls)
        mask._t = dict(tensors)
        return mask

    @classmethod
    def ones_like(cls, model: nn.Module) -> "Mask":
        """The dense mask (everything kept) for ``model``, on its weights' devices."""
        params = prunable_parameters(model)
        if not params:
            raise UserError("the model has no Conv2d/Linear weights, so there is nothing to mask")
        return cls._trusted({k: torch.ones(p.shape, device=p.device) for k, p in params.items()})

    def check(self, model: nn.Module) -> None:
        """Raise `UserError` unless the keys are exactly the model's prunable names and every shape matches."""
        params = prunable_parameters(model)
        missing = [k for k in params if k not in self._t]
        extra = [k for k in self._t if k not in params]
        if missing or extra:
            parts = ([f"missing {len(missing)} key(s): " + ", ".join(missing[:5])] if missing else []) + \
                    ([f"{len(extra)} extra key(s): " + ", ".join(extra[:5])] if extra else [])
            raise UserError("mask does not match the model's prunable weights: " + "; ".join(parts))
        for key, p in params.items():
            if self._t[key].shape != p.shape:
                raise UserError(f"mask entry {key!r} has shape {_shape(self._t[key].shape)} but the model's "
                                f"weight has shape {_shape(p.shape)}")

    def kept(self) -> int:
        return sum(int(t.count_nonzero()) for t in self._t.values())

    def total(self) -> int:
        return sum(t.numel() for t in self._t.values())

    def density(self) -> float:
        """kept / total over all entries."""
        return self.kept() / self.total()

    def layer_density(self) -> dict[str, float]:
        return {k: int(t.count_nonzero()) / t.numel() for k, t in self._t.items()}

    def keys(self):
        return self._t.keys()

    def items(self):
        return self._t.items()

    def __getitem__(self, key: str) -> Tensor:
        return self._t[key]

    def __contains__(self, key) -> bool:
        return key in self._t

    def __iter__(self):
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def __repr__(self) -> str:
        return f"Mask({len(self)} tensors, density {self.density():.4f})"

    def is_nested_in(self, other: "Mask") -> bool:
        """True when every entry kept here is also kept in ``other`` (the same keys and shapes are required)."""
        if set(self._t) != set(other._t):
            raise UserError("cannot compare masks over different parameter names")
        for k, t in self._t.items():
            o = other._t[k]
            if o.shape != t.shape:
                raise UserError(f"cannot compare masks: entry {k!r} has shapes {_shape(t.shape)} and "
                                f"{_shape(o.shape)}")
            if bool(((t != 0) & (o.to(t.device) == 0)).any()):
                return False
        return True

    def to(self, device) -> "Mask":
        return Mask._trusted({k: t.to(device) for k, t in self._t.items()})

    def state(self) -> dict[str, Tensor]:
        """The tensors (keyed by parameter name) for embedding in a checkpoint; `Mask(state)` restores it."""
        return dict(self._t)

    def save(self, path: str) -> None:
        """Write a safetensors file atomically (temp file, then rename)."""
        tmp = f"{path}.tmp"
        save_file({k: t.contiguous().cpu() for k, t in self._t.items()}, tmp,
                  metadata={"format": MASK_FORMAT, "density": repr(self.density())})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        from ..runs.atomic import replace_durably
        replace_durably(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Mask":
        """Read a mask file; a missing, truncated or non-binary file is a `UserError`."""
        if not os.path.isfile(path):
            raise UserError(f"mask file {path} does not exist")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"mask file {path} is not a readable safetensors file (truncated or corrupt?): "
                            f"{exc}") from exc
        try:
            return cls(tensors)
        except UserError as exc:
            raise UserError(f"mask file {path}: {exc}") from exc


def _top(s: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries of 1-D ``s``; among equal scores the lower index wins. Exact
    count and deterministic, in O(n) (kthvalue, then the ties at the threshold by index) instead of a full sort."""
    n = s.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=s.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=s.device)
    threshold = torch.kthvalue(s, n - k + 1).values
    keep = s > threshold
    keep[(s == threshold).nonzero().flatten()[:k - int(keep.count_nonzero())]] = True
    return keep


KEEP_COUNTS = ("round", "reference")


def kept_count(density: float, n: int, count: str = "round") -> int:
    """How many of ``n`` entries density ``d`` keeps: ``round(d · n)`` (``"round"``, Python's half to even), or
    ``n − int((1 − d) · n)`` (``"reference"``: Synaptic-Flow's ``_global_mask``/``_local_mask`` prune the
    ``int((1 − d) · n)`` lowest, HYDRA's ``GetSubnet`` zeroes ``int((1 − k) · n)``; about ``ceil(d · n)``, in the
    same float arithmetic as those codes)."""
    if count == "round":
        return round(density * n)
    if count == "reference":
        return n - int((1.0 - density) * n)
    raise UserError(f"keep count must be one of {', '.join(KEEP_COUNTS)}, got {count!r}")


def _keep_count(density: float, n: int, floor: int, count: str = "round") -> int:
    return min(n, max(floor, kept_count(density, n, count)))


def masks_from_scores(scores: dict[str, Tensor], density: float, scope: str = "global",
                      min_layer_density: float = 0.0, count: str = "round") -> Mask:
    """Keep the top-``density`` fraction of ``scores`` (higher score = more important).

    ``scope="global"``: one ranking over all layers; exactly ``round(density * total)`` entries are kept.
    ``scope="layer"`` (alias ``"local"``): each layer keeps ``round(density * n_layer)`` of its own top entries.
    Ties are broken deterministically by position: among equal scores the earlier entry wins (earlier layer in
    dict order, then lower flat index), exactly as a stable descending sort would, so the count is exact even when
    all scores are equal. (``round`` is Python's, half to even.) ``count="reference"`` keeps
    ``n − int((1 − density) · n)`` instead (`kept_count`; SynFlow's and HYDRA's reference codes).

    Layer-collapse guard: every layer keeps at least ``max(1, ceil(min_layer_density * n_layer))`` entries (its
    top scores), so no layer is ever removed whole. Globally, the entries a layer gets this way are paid for by
    dropping the lowest-scoring kept entries of layers above their own minimum, so the total stays exact; if the
    minimums alone exceed the target, that is a `UserError`. Per layer, the minimum can only raise a layer's count.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise UserError(f"density must be in (0, 1] (the fraction of weights kept), got {density!r}")
    if isinstance(min_layer_density, bool) or not isinstance(min_layer_density, (int, float)) \
            or not 0 <= min_layer_density <= 1:
        raise UserError(f"min_layer_density must be in [0, 1], got {min_layer_density!r}")
    scope = scope.lower() if isinstance(scope, str) else scope
    if scope not in ("global", "layer", "local"):
        raise UserError(f"mask scope must be 'global' or 'layer' ('local' is accepted as 'layer'), got {scope!r}")
    if not isinstance(scores, dict) or not scores:
        raise UserError("scores must be a non-empty dict of parameter name -> tensor")
    names = list(scores)
    for name in names:
        if not isinstance(name, str) or not isinstance(scores[name], Tensor) or scores[name].numel() == 0:
            raise UserError(f"score for {name!r} must be a non-empty tensor keyed by a parameter name")
    device = scores[names[0]].device
    wide = any(scores[n].dtype == torch.float64 or not scores[n].is_floating_point() for n in names)
    flats = []
    for name in names:
        s = scores[name].detach().to(device=device, dtype=torch.float64 if wide else torch.float32).flatten()
        if torch.isnan(s).any():
            raise UserError(f"score for {name!r} contains NaN; cannot rank its weights")
        flats.append(s)
    sizes = [s.numel() for s in flats]
    # max(1, ceil(min * n)); rounding to 9 places first stops float noise (0.7 * 10 = 7.000000000000001) adding 1.
    mins = [min(n, max(1, math.ceil(round(min_layer_density * n, 9)))) for n in sizes]

    if scope != "global":
        keeps = [_top(s, _keep_count(density, n, m, count)) for s, n, m in zip(flats, sizes, mins)]
    else:
        total = sum(sizes)
        target = kept_count(density, total, count)
        if sum(mins) > target:
            raise UserError(f"density {density} keeps {target} of {total} weights, fewer than the "
                            f"{sum(mins)} needed to keep at least max(1, ceil({min_layer_density} * n)) in each "
                            f"of the {len(sizes)} layers; raise density or lower min_layer_density")
        flat = torch.cat(flats)
        keep = _top(flat, target)
        keeps = list(keep.split(sizes))  # views into keep
        counts = [int(k.count_nonzero()) for k in keeps]
        if any(c < m for c, m in zip(counts, mins)):
            # A layer's kept set is the top of its own order, so topping up and giving back are both about
            # prefixes. Short layers keep their top `min`; the others offer the kept entries beyond their
            # own top `min`, and the `extra` lowest of those offers (reverse keep order) are dropped.
            extra, offers = 0, []
            for k, s, c, m in zip(keeps, flats, counts, mins):
                if c < m:
                    k.copy_(_top(s, m))
                    extra += m - c
                    offers.append(torch.zeros_like(k))
                else:
                    offers.append(k & ~_top(s, m))
            idx = torch.cat(offers).nonzero().flatten()
            drop = _top(-flat[idx].flip(0), extra).flip(0)
            keep[idx[drop]] = False
    return Mask._trusted({name: k.reshape(scores[name].shape).to(torch.float32) for name, k in zip(names, keeps)})


# ----------------------------------------------------------------------------------------------------------
# A model carrying a mask


class _MaskGrad:
    """Gradient hook: grad * mask. Holds weak references, and is a no-op once stale (mask removed, or the weight
    replaced), so a leftover hook never applies the wrong mask."""

    def __init__(self, module: nn.Module, weight: Tensor):
        self.module, self.weight = weakref.ref(module), weakref.ref(weight)

    def __call__(self, grad: Tensor) -> Tensor:
        module = self.module()
        if module is None or module.weight is not self.weight() or "weight_mask" not in module._buffers:
            return grad
        return grad * module.weight_mask


def _ensure_grad_hook(module: nn.Module) -> None:
    """Register the gradient hook on the module's current weight unless it has a live one. Checked on every
    forward because deepcopy, pickling and some ``.to()`` paths make a new Parameter without its hooks."""
    weight = module.weight
    if not weight.requires_grad:  # e.g. inside attack_mode; the next forward with grads on registers it
        return
    for hook in (getattr(weight, "_backward_hooks", None) or {}).values():
        if isinstance(hook, _MaskGrad) and hook.module() is module and hook.weight() is weight:
            return
    weight.register_hook(_MaskGrad(module, weight))


def _mask_pre_hook(module: nn.Module, args) -> None:
    """Forward pre-hook (a module-level function, so deepcopy and pickling keep it pointing at the right module).
    Uses ``.data`` so that autograd's version counter is untouched: a graph from an earlier forward (e.g. the
    clean and adversarial passes of TRADES) can still be backpropagated. A weight substituted by
    ``torch.func.functional_call`` (a plain or functorch-wrapped tensor, not the module's Parameter) is used as
    given and never written to: masking substituted weights is the caller's business."""
    mask = module._buffers.get("weight_mask")
    if mask is not None and isinstance(module.weight, nn.Parameter):
        module.weight.data.mul_(mask)
        _ensure_grad_hook(module)


def apply_mask(model: nn.Module, mask: Mask) -> nn.Module:
    """Attach ``mask`` to ``model`` (in place; returned for chaining) and zero the masked weights now.

    A second call replaces the mask (buffers updated, hooks not duplicated). Masked weights then stay exactly 0
    under any optimizer whose step at a zero weight with zero gradient and zero state is zero (SGD with momentum
    and weight decay, Adam, AdamW). If the optimizer already has state from before the mask, call
    `mask_optimizer_state` once.
    """
    if not isinstance(mask, Mask):
        raise UserError(f"apply_mask needs a Mask, got {type(mask).__name__}")
    mask.check(model)
    for name, module in _prunable_modules(model).items():
        weight = module.weight
        module.register_buffer("weight_mask", mask[name].to(device=weight.device, dtype=weight.dtype))
        if not any(h is _mask_pre_hook for h in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(_mask_pre_hook)
        _ensure_grad_hook(module)
        with torch.no_grad():
            weight.data.mul_(module.weight_mask)
    return model


def _masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {k: m for k, m in _prunable_modules(model).items() if "weight_mask" in m._buffers}


def is_masked(model: nn.Module) -> bool:
    return bool(_masked_modules(model))


def get_mask(model: nn.Module) -> Mask | None:
    """The model's mask rebuilt from its ``weight_mask`` buffers, or None for a dense model."""
    masked = _masked_modules(model)
    if not masked:
        return None
    missing = [k for k in _prunable_modules(model) if k not in masked]
    if missing:
        raise UserError(f"the model carries masks on only some prunable layers (none on {', '.join(missing[:5])})")
    return Mask({k: m.weight_mask for k, m in masked.items()})


def remove_mask(model: nn.Module) -> nn.Module:
    """Drop the buffers and hooks; weights keep their current values (masked ones stay 0 until trained)."""
    for module in _masked_modules(model).values():
        del module._buffers["weight_mask"]
        for key in [k for k, h in module._forward_pre_hooks.items() if h is _mask_pre_hook]:
            del module._forward_pre_hooks[key]
        # A leftover gradient hook is a no-op once the buffer is gone (see _MaskGrad).
    return model


def enforce_mask(model: nn.Module) -> None:
    """Re-multiply every masked weight by its mask (e.g. right after ``optimizer.step()``)."""
    with torch.no_grad():
        for module in _masked_modules(model).values():
            module.weight.data.mul_(module.weight_mask)
            _ensure_grad_hook(module)


def mask_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Zero the optimizer state (momentum, Adam moments) at masked positions, for a mask applied mid-training."""
    for module in _masked_modules(model).values():
        for value in optimizer.state.get(module.weight, {}).values():
            if isinstance(value, Tensor) and value.shape == module.weight.shape:
                value.mul_(module.weight_mask.to(value.dtype))


def attach_mask_buffers(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Make ``model``'s mask buffers match ``state_dict`` so that ``load_state_dict`` (strict) accepts it.

    A state_dict with ``<module>.weight_mask`` keys gets the corresponding mask applied (a mismatch with the
    model is a `UserError`); one without any removes a mask the model may carry. Call it before loading.
    """
    suffix = "weight_mask"
    found = {k[:-len("_mask")]: v for k, v in state_dict.items() if k == suffix or k.endswith("." + suffix)}
    if not found:
        return remove_mask(model)
    try:
        mask = Mask(found)
    except UserError as exc:
        raise UserError(f"the saved model's mask is invalid: {exc}") from exc
    return apply_mask(model, mask)


def load_model_state(model: nn.Module, state: dict, source: str = "the saved weights") -> None:
    """Load a state dict that may carry ``weight_mask`` buffers: the mask is attached first, then the weights."""
    if any(k.endswith("weight_mask") for k in state):
        attach_mask_buffers(model, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise UserError(f"{source} does not fit this architecture: {detail}") from exc
