"""Channel compaction: which channels must be computed at all, and the program that computes only those.

Two passes over the lowered ops (`lower.Node`), exact for any input:

1. **Forward: batch-independent ("fixed") channels.** A conv output channel o is *live* only if its filter has
   a non-zero weight on a live input channel: W[o, c] ≠ 0 for some live c. Otherwise its value does not depend
   on the input at all: it is the map F_out = conv(F_in, W) + b (F_in: the fixed input channels, live channels
   zeroed), computed once here at batch 1. The map is not a constant when zero padding meets a non-zero fixed
   input, which is why maps and not scalars are tracked. ReLU, BN affine, pooling and addition act on the maps;
   a sum is live where either operand is; linear layers work as convs over features.
2. **Backward: needed channels.** The output needs every logit; a conv needs input channel c only if some
   computed output o has W[o, c] ≠ 0; elementwise ops pass the need through; flatten maps features to channels.

A node computes ``live ∧ needed`` channels only. Each conv/linear keeps the compact weight W[O][:, I]
(O: computed outputs, I: the input channels it reads), and the fixed inputs it would have read become its
bias (a per-channel vector, or a [O, H, W] map when padding makes it position-dependent). Where live and fixed
channels meet (an addition, the output), a ``reindex`` op places the computed channels into the stored fixed
map. A whole-zero filter therefore removes its channel from the conv, from the BN/ReLU after it, and from every
consumer's input, which is where channel-structured masks get their speed-up.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .lower import Node

_GATHER_BELOW = 0.75  # read a subset of the input channels through a gather only when it drops > 25% of them


def _channelwise(node: Node, fixed: torch.Tensor) -> torch.Tensor:
    """Apply a per-channel op to a batch-independent map (shape = the node's input shape)."""
    a, k = node.attrs, node.kind
    if k == "relu":
        return F.relu(fixed)
    if k == "normalize":
        view = (-1,) + (1,) * (fixed.dim() - 1)
        return (fixed - node.tensors["mean"].reshape(view)) / node.tensors["std"].reshape(view)
    if k == "affine":
        view = (-1,) + (1,) * (fixed.dim() - 1)
        return fixed * node.tensors["scale"].reshape(view) + node.tensors["shift"].reshape(view)
    if k == "maxpool2d":
        return F.max_pool2d(fixed[None], a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                            a["ceil_mode"])[0]
    if k == "avgpool2d":
        return F.avg_pool2d(fixed[None], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                            a["count_include_pad"], a["divisor_override"])[0]
    if k == "adaptive_avgpool2d":
        return F.adaptive_avg_pool2d(fixed[None], a["output_size"])[0]
    raise AssertionError(k)


CHANNELWISE = ("relu", "normalize", "affine", "maxpool2d", "avgpool2d", "adaptive_avgpool2d")


def _conv_map(node: Node, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    a = node.attrs
    return F.conv2d(x[None], weight, bias, a["stride"], a["padding"], a["dilation"], a["groups"])[0]


def _zero_live(fixed: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    return fixed * (~live).reshape((-1,) + (1,) * (fixed.dim() - 1)).to(fixed.dtype)


def analyse(nodes: list[Node], compact: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                              list[torch.Tensor]]:
    """(live, fixed, needed) per node: bool [C], float64 map of the node's shape, bool [C]. ``compact=False``
    marks every channel live and needed (the dense program, used as the BN-folded control in benchmarks)."""
    live, fixed = [None] * len(nodes), [None] * len(nodes)
    for n in nodes:
        c = n.shape[0]
        if n.kind == "input":
            live[n.id], fixed[n.id] = torch.ones(c, dtype=torch.bool), torch.zeros(n.shape, dtype=torch.float64)
            continue
        src = n.inputs[0]
        if n.kind in CHANNELWISE:
            live[n.id], fixed[n.id] = live[src].clone(), _channelwise(n, fixed[src])
        elif n.kind == "add":
            a, b = n.inputs
            live[n.id], fixed[n.id] = live[a] | live[b], fixed[a] + fixed[b]
        elif n.kind == "flatten":
            per = fixed[src][0].numel()
            live[n.id], fixed[n.id] = live[src].repeat_interleave(per), fixed[src].flatten()
        elif n.kind in ("conv", "linear"):
            w, b = n.tensors["weight"], n.tensors["bias"]
            rows = w.flatten(2).ne(0).any(2) if w.dim() == 4 else w.ne(0)       # [out, in / groups]
            fin = _zero_live(fixed[src], live[src])
            if n.kind == "conv" and n.attrs["groups"] != 1:
                live[n.id] = torch.ones(c, dtype=torch.bool)
            else:
                live[n.id] = (rows & live[src][None, :]).any(1)
            fixed[n.id] = _conv_map(n, fin, w, b) if n.kind == "conv" else \
                w @ fin + (b if b is not None else 0)
        elif n.kind == "output":
            live[n.id], fixed[n.id] = live[src].clone(), fixed[src].clone()
        else:
            raise AssertionError(n.kind)
    if not compact:
        return [torch.ones_like(v) for v in live], fixed, [torch.ones_like(v) for v in live]
    needed = [torch.zeros(n.shape[0], dtype=torch.bool) for n in nodes]
    for n in reversed(nodes):
        if n.kind == "output":
            needed[n.id][:] = True
        computed = live[n.id] & needed[n.id]
        for i in n.inputs:
            needed[i] |= _input_need(n, computed, nodes[i])
    return live, fixed, needed


def _input_need(n: Node, computed: torch.Tensor, src: Node) -> torch.Tensor:
    if n.kind in CHANNELWISE or n.kind in ("add", "output"):
        return computed
    if n.kind == "flatten":
        return computed.reshape(src.shape[0], -1).any(1)
    w = n.tensors["weight"]
    if n.kind == "conv" and n.attrs["groups"] != 1:
        return torch.ones(src.shape[0], dtype=torch.bool)
    rows = w.flatten(2).ne(0).any(2) if w.dim() == 4 else w.ne(0)
    return rows[computed].any(0)


class Emitter:
    """Builds the runtime program (ops over numbered values) and its float32 tensors."""

    def __init__(self):
        self.ops: list[dict] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.next_value = 0

    def tensor(self, t: torch.Tensor | None, dtype=torch.float32) -> str | None:
        if t is None:
            return None
        key = f"t{len(self.tensors)}"
        self.tensors[key] = t.detach().to(dtype).contiguous()
        return key

    def op(self, kind: str, inputs: list[int], **fields) -> int:
        out = self.next_value
        self.next_value += 1
        self.ops.append({"op": kind, "in": inputs, "out": out, **fields})
        return out


def _spatially_uniform(m: torch.Tensor) -> bool:
    return m.dim() == 1 or bool((m == m[:, :1, :1]).all())


def emit(nodes: list[Node], output_id: int, compact: bool = True) -> tuple[Emitter, list[dict], int]:
    """The compact program for ``nodes``: the emitter (ops, tensors), one record per conv/linear (for the kernel
    choice and the report; its ``weight`` is the compact float32 weight, not yet stored) and the output value."""
    live, fixed, needed = analyse(nodes, compact)
    em = Emitter()
    value, held = {}, {}        # node id -> runtime value id, and the sorted channel indices it physically holds
    layers = []

    def reindex(nid: int, target: torch.Tensor) -> int:
        """The value of node ``nid`` over channels ``target`` (live ones taken, the others from its fixed map)."""
        have = held[nid]
        if torch.equal(have, target):
            return value[nid]
        pos_in_have = {int(c): i for i, c in enumerate(have)}
        inside = torch.tensor([int(c) in pos_in_have for c in target], dtype=torch.bool)
        take = torch.tensor([pos_in_have[int(c)] for c in target[inside]], dtype=torch.long)
        if bool(inside.all()):
            return em.op("reindex", [value[nid]], index=em.tensor(take, torch.int64), fill=None)
        fill = fixed[nid][target]
        if fill.dim() == 3 and _spatially_uniform(fill):
            fill = fill[:, :1, :1]
        whole = take.numel() == have.numel() and torch.equal(take, torch.arange(have.numel()))
        return em.op("reindex", [value[nid]], index=None if whole else em.tensor(take, torch.int64),
                     fill=em.tensor(fill.expand(len(target), *nodes[nid].shape[1:])),
                     pos=em.tensor(inside.nonzero().flatten(), torch.int64), shape=[len(target), *nodes[nid].shape[1:]])

    for n in nodes:
        computed = (live[n.id] & needed[n.id]).nonzero().flatten()
        if n.kind == "input":
            value[n.id], held[n.id] = em.op("input", []), torch.arange(n.shape[0])
            continue
        src = n.inputs[0] if n.inputs else None
        if n.kind in CHANNELWISE:
            h = held[src]
            extra = {}
            if n.kind == "normalize":
                extra = {"mean": em.tensor(n.tensors["mean"][h].reshape(-1, 1, 1)),
                         "std": em.tensor(n.tensors["std"][h].reshape(-1, 1, 1))}
            elif n.kind == "affine":
                view = (-1, 1, 1) if len(n.shape) == 3 else (-1,)
                extra = {"scale": em.tensor(n.tensors["scale"][h].reshape(view)),
                         "shift": em.tensor(n.tensors["shift"][h].reshape(view))}
            value[n.id] = em.op(n.kind, [value[src]], **n.attrs, **extra)
            held[n.id] = h
        elif n.kind == "flatten":
            per = fixed[src][0].numel()
            value[n.id] = em.op("flatten", [value[src]])
            held[n.id] = (held[src][:, None] * per + torch.arange(per)[None, :]).flatten()
        elif n.kind == "add":
            a, b = n.inputs
            value[n.id] = em.op("add", [reindex(a, computed), reindex(b, computed)])
            held[n.id] = computed
        elif n.kind == "output":
            value[n.id], held[n.id] = reindex(src, torch.arange(n.shape[0])), torch.arange(n.shape[0])
        elif n.kind in ("conv", "linear"):
            value[n.id], held[n.id] = _emit_layer(n, computed, src, value, held, live, fixed, em, layers, reindex,
                                                   compact)
        else:
            raise AssertionError(n.kind)
    return em, layers, value[output_id]


def _emit_layer(n, computed, src, value, held, live, fixed, em, layers, reindex, compact=True):
    w, b = n.tensors["weight"], n.tensors["bias"]
    h = held[src]
    grouped = n.kind == "conv" and n.attrs["groups"] != 1
    if grouped:  # no compaction across groups: the conv reads every input channel and computes every output
        computed = torch.arange(n.shape[0])
        reads = torch.arange(fixed[src].shape[0])
        inp = reindex(src, reads)
    else:
        # Kernels need at least one output and one input channel; computing a channel nobody reads, or reading
        # one with zero weights, is harmless (its value is still exact).
        computed = computed if computed.numel() else torch.arange(1)
        rows = w.flatten(2).ne(0).any(2) if w.dim() == 4 else w.ne(0)
        used = rows[computed][:, h].any(0)
        if not bool(used.any()):
            used[0] = True
        if compact and used.sum() < _GATHER_BELOW * len(h):
            reads = h[used]
            inp = em.op("reindex", [value[src]], index=em.tensor(used.nonzero().flatten(), torch.int64), fill=None)
        else:
            reads, inp = h, value[src]
    fin = _zero_live(fixed[src], live[src])
    w_out = w[computed]
    if n.kind == "conv":
        bias_full = _conv_map(n, fin, w_out, b[computed] if b is not None else None) if not grouped else \
            (b.reshape(-1, 1, 1).expand(n.shape).clone() if b is not None else torch.zeros(n.shape, dtype=w.dtype))
        kept = w_out if grouped else w_out[:, reads]
        uniform = _spatially_uniform(bias_full)
        bias_vec = bias_full[:, 0, 0] if uniform else None
        bias_map = None if uniform else bias_full
        if bias_vec is not None and b is None and not bool(bias_vec.ne(0).any()):
            bias_vec = None
    else:
        bias_vec = w_out @ fin + (b[computed] if b is not None else 0)
        bias_map, kept = None, w_out[:, reads]
        if b is None and not bool(bias_vec.ne(0).any()):
            bias_vec = None
    record = {"name": n.name, "kind": n.kind, "original_shape": list(w.shape), "compact_shape": list(kept.shape),
              "nonzeros": int(kept.ne(0).sum()), "in_shape": [len(reads), *fixed[src].shape[1:]],
              "out_shape": [len(computed), *n.shape[1:]]}
    fields = {"weight_shape": list(kept.shape), "matrix_shape": [kept.shape[0], math.prod(kept.shape[1:])],
              "bias": em.tensor(bias_vec), "kernel": {}}
    if n.kind == "conv":
        fields.update(stride=n.attrs["stride"], padding=n.attrs["padding"], dilation=n.attrs["dilation"],
                      groups=n.attrs["groups"], out_hw=list(n.shape[1:]), bias_map=em.tensor(bias_map))
    out = em.op(n.kind, [inp], **fields)
    record["op_index"] = len(em.ops) - 1
    record["weight"] = kept.to(torch.float32)
    layers.append(record)
    return out, computed
