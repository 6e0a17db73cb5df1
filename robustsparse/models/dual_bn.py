"""Dual batch norm (OAT: Wang et al. 2020, "Once-for-All Adversarial Training", VITA-Group ``models/DualBN.py``).

`DualBatchNorm2d` holds two ordinary ``nn.BatchNorm2d`` branches, ``bn_clean`` and ``bn_adv``, each with its own
affine parameters and running statistics. Which branch a batch uses is set explicitly by the module's ``route``:

* ``"clean"`` (default) or ``"adv"``: the whole batch goes through that branch;
* ``("split", n_clean)``: the first ``n_clean`` samples go through ``bn_clean`` and the rest through ``bn_adv``
  (OAT's ``idx2BN``); the outputs are concatenated back in the original order.

`convert_to_dual_bn` swaps every ``nn.BatchNorm2d`` of a model for a `DualBatchNorm2d` whose both branches start
as copies of it; `set_bn_route` / `bn_route` (a context manager that restores the previous routes) set the route
on every dual BN of a model.

An invalid route is a programming error, not a user error: it raises ``ValueError`` (when set, or, for a split
larger than the batch, in ``forward``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Union

import torch
from torch import nn

Route = Union[str, tuple]

_ROUTE_HELP = "a route is 'clean', 'adv' or ('split', n_clean) with an integer n_clean >= 0"


def _check_route(route) -> Route:
    if isinstance(route, str) and route in ("clean", "adv"):
        return route
    if isinstance(route, (tuple, list)) and len(route) == 2 and route[0] == "split":
        n = route[1]
        if not isinstance(n, bool) and isinstance(n, int) and n >= 0:
            return ("split", int(n))
    raise ValueError(f"invalid batch-norm route {route!r}; {_ROUTE_HELP}")


class DualBatchNorm2d(nn.Module):
    """Two ``BatchNorm2d`` branches (``bn_clean``, ``bn_adv``) selected by ``route``; arguments as BatchNorm2d."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        kw = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
                  device=device, dtype=dtype)
        self.num_features = num_features
        self.bn_clean = nn.BatchNorm2d(num_features, **kw)
        self.bn_adv = nn.BatchNorm2d(num_features, **kw)
        self.route = "clean"

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "DualBatchNorm2d":
        """A dual BN whose both branches are exact copies of ``bn`` (parameters, running stats, settings, mode)."""
        dual = cls.__new__(cls)
        nn.Module.__init__(dual)
        dual.num_features = bn.num_features
        dual.bn_clean = copy.deepcopy(bn)
        dual.bn_adv = copy.deepcopy(bn)
        dual.route = "clean"
        dual.train(bn.training)
        return dual

    @property
    def route(self) -> Route:
        return self._route

    @route.setter
    def route(self, value) -> None:
        self._route = _check_route(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self._route
        if route == "clean":
            return self.bn_clean(x)
        if route == "adv":
            return self.bn_adv(x)
        n = route[1]
        if n > x.shape[0]:
            raise ValueError(f"route ('split', {n}) needs at least {n} samples, the batch has {x.shape[0]}")
        if n == x.shape[0]:
            return self.bn_clean(x)
        if n == 0:
            return self.bn_adv(x)
        return torch.cat([self.bn_clean(x[:n]), self.bn_adv(x[n:])], dim=0)

    def extra_repr(self) -> str:
        return f"{self.num_features}, route={self._route!r}"


def convert_to_dual_bn(model: nn.Module) -> nn.Module:
    """Replace, in place and recursively, every ``nn.BatchNorm2d`` by a `DualBatchNorm2d` copying it; return model.

    If ``model`` is itself a ``BatchNorm2d``, the new `DualBatchNorm2d` is returned. Existing dual BNs are left
    alone, so converting twice is harmless.
    """
    if isinstance(model, nn.BatchNorm2d):
        return DualBatchNorm2d.from_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, DualBatchNorm2d):
            continue
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, DualBatchNorm2d.from_batchnorm(child))
        else:
            convert_to_dual_bn(child)
    return model


def _dual_bns(model: nn.Module) -> Iterator[DualBatchNorm2d]:
    return (m for m in model.modules() if isinstance(m, DualBatchNorm2d))


def set_bn_route(model: nn.Module, route: Route) -> int:
    """Set ``route`` on every `DualBatchNorm2d` in ``model``; return how many were set. ValueError if invalid."""
    route = _check_route(route)
    count = 0
    for m in _dual_bns(model):
        m.route = route
        count += 1
    return count


@contextmanager
def bn_route(model: nn.Module, route: Route):
    """Context manager: route every dual BN of ``model`` via ``route``, restoring each one's previous route on exit."""
    route = _check_route(route)
    saved = [(m, m.route) for m in _dual_bns(model)]
    try:
        for m, _ in saved:
            m.route = route
        yield model
    finally:
        for m, previous in saved:
            m.route = previous
