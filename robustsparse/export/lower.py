"""Lower a masked model to a flat list of inference ops (``Node``), with batch norm folded into the convs.

The model is traced with ``torch.fx`` in eval mode (``Normalize`` and ``DualBatchNorm2d`` are kept whole), its
shapes are taken from one batch-1 forward pass, and each graph node becomes one of a small set of op kinds:
input, normalize, affine, conv, linear, relu, add, flatten, maxpool2d, avgpool2d, adaptive_avgpool2d, output.
Identity, dropout (eval) and ``contiguous`` disappear. Anything else is a `UserError` naming the op.

Weights are the effective ones, ``weight * weight_mask``, so masked entries are exact zeros.

BN folding (eval mode, running statistics): a ``BatchNorm2d`` whose input is a conv read by nothing else becomes
part of that conv,

    W'[o] = W[o] · γ_o / √(σ²_o + ε),    b'_o = (b_o − μ_o) · γ_o / √(σ²_o + ε) + β_o,

which keeps the zeros of W exact (0 · s = 0). Any other BN (pre-activation blocks: BN before the conv) becomes a
per-channel ``affine`` x·s + t with s = γ/√(σ²+ε), t = β − μ·s.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import UserError
from ..models.dual_bn import DualBatchNorm2d
from ..models.normalize import Normalize
from ..sparse.mask import _prunable_modules


@dataclass
class Node:
    id: int
    kind: str
    inputs: list[int]
    shape: tuple[int, ...]            # output shape without the batch dimension: (C, H, W) or (F,)
    attrs: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)
    name: str = ""                    # the module or graph node it came from (for reports)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Normalize, DualBatchNorm2d)) or super().is_leaf_module(m, qualname)


def effective_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode whose prunable weights are ``weight * mask`` and which carries no mask hooks."""
    from ..sparse.mask import remove_mask
    copied = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in _prunable_modules(copied).values():
            mask = module._buffers.get("weight_mask")
            if mask is not None:
                module.weight.mul_(mask)
    return remove_mask(copied)


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise UserError("a BatchNorm2d without running statistics (track_running_stats=False) normalises with "
                        "each batch's statistics even in eval mode, so it cannot be exported")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def _batchnorm(module):
    if isinstance(module, DualBatchNorm2d):
        if module.route not in ("clean", "adv"):
            raise UserError(f"a dual batch norm routed {module.route!r} cannot be exported; route it 'clean' or "
                            "'adv' (robustsparse.models.set_bn_route) first")
        return module.bn_clean if module.route == "clean" else module.bn_adv
    return module


def lower(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[list[Node], int]:
    """(nodes in execution order, id of the output node) for ``model`` (already an `effective_copy`)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: this model cannot be exported
        raise UserError(f"the model cannot be traced for export ({type(exc).__name__}: {exc})") from exc
    gm = fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros((1, *input_shape)))
    nodes: list[Node] = []
    ids: dict[fx.Node, int] = {}        # fx node -> id of the Node holding its value
    folded_into: dict[int, fx.Node] = {}

    def add(kind, inputs, fxn, attrs=None, tensors=None, name=None):
        shape = tuple(fxn.meta["tensor_meta"].shape[1:])
        node = Node(len(nodes), kind, [ids[i] for i in inputs], shape, attrs or {}, tensors or {},
                    name or fxn.name)
        nodes.append(node)
        ids[fxn] = node.id
        return node

    def tensor_args(fxn):
        return [a for a in fxn.args if isinstance(a, fx.Node)]

    output_id = None
    for fxn in gm.graph.nodes:
        if fxn.op == "placeholder":
            if nodes:
                raise UserError("only models with a single input can be exported")
            add("input", [], fxn)
        elif fxn.op == "output":
            result = fxn.args[0]
            if not isinstance(result, fx.Node):
                raise UserError("only models returning a single tensor of logits can be exported")
            output_id = ids[result]
        elif fxn.op == "call_module":
            _lower_module(gm.get_submodule(fxn.target), fxn, add, ids, nodes, folded_into)
        elif fxn.op in ("call_function", "call_method"):
            _lower_function(fxn, add, ids, tensor_args(fxn))
        else:
            raise UserError(f"cannot export graph node {fxn.op} {fxn.target}")
    out = nodes[output_id]
    final = Node(len(nodes), "output", [output_id], out.shape, name="output")
    nodes.append(final)
    return nodes, final.id


def _lower_module(module, fxn, add, ids, nodes, folded_into):
    (src,) = [a for a in fxn.args if isinstance(a, fx.Node)][:1] or [None]
    name = fxn.target
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise UserError(f"{name}: only convs with explicit zero padding can be exported")
        bias = module.bias.detach().double() if module.bias is not None else None
        add("conv", [src], fxn, {"stride": _pair(module.stride), "padding": _pair(module.padding),
                                 "dilation": _pair(module.dilation), "groups": module.groups},
            {"weight": module.weight.detach().double(), "bias": bias}, name)
    elif isinstance(module, nn.Linear):
        bias = module.bias.detach().double() if module.bias is not None else None
        add("linear", [src], fxn, {}, {"weight": module.weight.detach().double(), "bias": bias}, name)
    elif isinstance(module, (nn.BatchNorm2d, DualBatchNorm2d)):
        scale, shift = _bn_scale_shift(_batchnorm(module))
        producer = nodes[ids[src]]
        if producer.kind == "conv" and len(src.users) == 1 and producer.id not in folded_into:
            w, b = producer.tensors["weight"], producer.tensors["bias"]
            producer.tensors["weight"] = w * scale.reshape(-1, 1, 1, 1)
            producer.tensors["bias"] = (b if b is not None else torch.zeros_like(scale)) * scale + shift
            producer.name += f"+{name}"
            folded_into[producer.id] = fxn
            ids[fxn] = producer.id
        else:
            add("affine", [src], fxn, {}, {"scale": scale, "shift": shift}, name)
    elif isinstance(module, nn.ReLU):
        add("relu", [src], fxn, name=name)
    elif isinstance(module, Normalize):
        c = fxn.meta["tensor_meta"].shape[1]
        add("normalize", [src], fxn, {}, {"mean": module.mean.detach().double().flatten().expand(c).clone(),
                                          "std": module.std.detach().double().flatten().expand(c).clone()}, name)
    elif isinstance(module, nn.MaxPool2d):
        add("maxpool2d", [src], fxn, {"kernel_size": _pair(module.kernel_size), "stride": _pair(module.stride),
                                      "padding": _pair(module.padding), "dilation": _pair(module.dilation),
                                      "ceil_mode": bool(module.ceil_mode)}, name=name)
    elif isinstance(module, nn.AvgPool2d):
        add("avgpool2d", [src], fxn, {"kernel_size": _pair(module.kernel_size), "stride": _pair(module.stride),
                                      "padding": _pair(module.padding), "ceil_mode": bool(module.ceil_mode),
                                      "count_include_pad": bool(module.count_include_pad),
                                      "divisor_override": module.divisor_override}, name=name)
    elif isinstance(module, nn.AdaptiveAvgPool2d):
        add("adaptive_avgpool2d", [src], fxn, {"output_size": list(fxn.meta["tensor_meta"].shape[2:])}, name=name)
    elif isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1 or len(nodes[ids[src]].shape) != 3:
            raise UserError(f"{name}: only Flatten(1, -1) of an image tensor can be exported")
        add("flatten", [src], fxn, name=name)
    elif isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout2d)):
        ids[fxn] = ids[src]
    else:
        raise UserError(f"cannot export module {name} ({type(module).__name__}); supported: Conv2d, Linear, "
                        "BatchNorm2d, ReLU, pooling, Flatten, Dropout, Identity, Normalize")


def _lower_function(fxn, add, ids, args):
    target = fxn.target
    if target in (operator.add, torch.add, "add") and len(args) == 2 and len(fxn.args) == 2 and not fxn.kwargs:
        add("add", args, fxn)
    elif target in (F.relu, torch.relu, "relu", "relu_", torch.relu_):
        add("relu", args[:1], fxn)
    elif target in (torch.flatten, "flatten"):
        start = fxn.args[1] if len(fxn.args) > 1 else fxn.kwargs.get("start_dim", 0)
        if start != 1 or len(fxn.meta["tensor_meta"].shape) != 2:
            raise UserError(f"{fxn.name}: only flatten(1) of an image tensor can be exported")
        add("flatten", args[:1], fxn)
    elif target in ("view", "reshape") and len(fxn.meta["tensor_meta"].shape) == 2:
        add("flatten", args[:1], fxn)
    elif target in (F.dropout, "contiguous"):
        if target is F.dropout and fxn.kwargs.get("training", True):
            raise UserError(f"{fxn.name}: dropout in training mode cannot be exported")
        ids[fxn] = ids[args[0]]
    elif target is F.adaptive_avg_pool2d:
        add("adaptive_avgpool2d", args[:1], fxn, {"output_size": list(fxn.meta["tensor_meta"].shape[2:])})
    else:
        raise UserError(f"cannot export the operation {fxn.op} {getattr(target, '__name__', target)} "
                        f"(node {fxn.name}); supported: add, relu, flatten, dropout (eval), adaptive average pool")
