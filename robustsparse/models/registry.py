"""Model registry: names -> builders, and `build_model`, the one way the rest of the library makes a network.

A builder is a function ``builder(in_channels, num_classes, input_size, *, opt=default, ...)`` returning an
``nn.Module`` that maps normalised images to logits. Its keyword-only parameters are the options a user may pass
(anything else is a `UserError`). Register it with ``@register_model("name")``.

A name containing ``{field}`` parts is a *pattern*: ``@register_model("wrn-{depth}-{widen}")`` matches e.g.
``wrn-22-3`` and calls the builder with ``depth=22, widen=3`` (each field is a non-negative integer). Exact names
win over patterns. Names are case-insensitive.

`build_model` wraps the network in an `ImageClassifier`: ``nn.Sequential(normalize=..., net=...)`` whose first
layer is a `Normalize` (when mean/std are given) or an ``nn.Identity`` (when not), so the model always takes images
in [0, 1] and state_dict keys of the network are always ``net.<...>``.
"""

from __future__ import annotations

import inspect
import re
from collections import OrderedDict
from typing import Callable

from torch import nn

from robustsparse.errors import UserError
from robustsparse.models.normalize import Normalize

Builder = Callable[..., nn.Module]

#: Exact model names (lower case) -> builder.
MODELS: dict[str, Builder] = {}
#: Pattern names such as ``"wrn-{depth}-{widen}"`` -> (compiled regex, builder).
MODEL_PATTERNS: dict[str, tuple[re.Pattern, Builder]] = {}

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _pattern_regex(template: str) -> re.Pattern:
    parts, pos = [], 0
    for m in _FIELD.finditer(template):
        parts.append(re.escape(template[pos:m.start()]))
        parts.append(rf"(?P<{m.group(1)}>\d+)")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts) + r"\Z")


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``name`` (a fixed name or a ``{field}`` pattern)."""
    key = name.strip().lower()

    def decorator(builder: Builder) -> Builder:
        if key in MODELS or key in MODEL_PATTERNS:
            raise ValueError(f"model name {key!r} is registered twice")
        if _FIELD.search(key):
            MODEL_PATTERNS[key] = (_pattern_regex(key), builder)
        else:
            MODELS[key] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """The exact registered names, sorted (patterns such as ``wrn-{depth}-{widen}`` are not included)."""
    return sorted(MODELS)


def _accepted_names() -> str:
    names = ", ".join(list_models())
    if MODEL_PATTERNS:
        names += "; or a pattern: " + ", ".join(sorted(MODEL_PATTERNS)) + " (fields are integers)"
    return names


def _resolve(name: str) -> tuple[Builder, dict[str, int]]:
    if not isinstance(name, str):
        raise UserError(f"model name must be a string, got {name!r}; known models: {_accepted_names()}")
    key = name.strip().lower()
    if key in MODELS:
        return MODELS[key], {}
    for regex, builder in MODEL_PATTERNS.values():
        m = regex.match(key)
        if m:
            return builder, {k: int(v) for k, v in m.groupdict().items()}
    raise UserError(f"unknown model {name!r}; known models: {_accepted_names()}")


def model_options(builder: Builder, fields: dict | None = None) -> dict[str, object]:
    """The user options a builder accepts, with their defaults (its keyword-only parameters minus pattern fields)."""
    fields = fields or {}
    return {p.name: p.default for p in inspect.signature(builder).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in fields}


class ImageClassifier(nn.Sequential):
    """``Sequential(normalize, net)`` plus metadata (``arch``, ``in_channels``, ``num_classes``, ``input_size``)."""

    def __init__(self, normalize: nn.Module, net: nn.Module, *, arch: str, in_channels: int, num_classes: int,
                 input_size: tuple[int, int]):
        super().__init__(OrderedDict([("normalize", normalize), ("net", net)]))
        self.arch = arch
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = input_size


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


def build_model(name: str, in_channels: int, num_classes: int, input_size: tuple[int, int],
                mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                **options) -> nn.Module:
    """Build registered model ``name`` for images of shape (in_channels, *input_size) in [0, 1].

    ``mean``/``std`` (both or neither, one value per channel) add a `Normalize` first layer inside the model.
    ``options`` are the architecture's options (e.g. ``dropout`` for ``wrn-*``, ``width`` for ``cnn``).
    Raises `UserError` for an unknown name, an unknown or invalid option, or invalid sizes/statistics.
    """
    builder, fields = _resolve(name)
    in_channels = _positive_int(in_channels, "in_channels")
    num_classes = _positive_int(num_classes, "num_classes")
    try:
        h, w = input_size
    except (TypeError, ValueError):
        raise UserError(f"input_size must be a pair (height, width), got {input_size!r}") from None
    input_size = (_positive_int(h, "input height"), _positive_int(w, "input width"))

    accepted = model_options(builder, fields)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        acc = ", ".join(f"{k} (default {v!r})" for k, v in accepted.items()) or "none"
        raise UserError(f"model {name!r} does not accept option(s) {', '.join(unknown)}; accepted options: {acc}")

    if (mean is None) != (std is None):
        raise UserError("give both mean and std for input normalisation, or neither")
    if mean is not None:
        mean, std = tuple(mean), tuple(std)
        if len(mean) not in (1, in_channels) or len(std) not in (1, in_channels):
            raise UserError(f"mean and std need 1 or {in_channels} values (one per channel), "
                            f"got {len(mean)} and {len(std)}")
        if any(not s > 0 for s in std):
            raise UserError(f"std values must all be > 0, got {std}")
        normalize: nn.Module = Normalize(mean, std)
    else:
        normalize = nn.Identity()

    net = builder(in_channels, num_classes, input_size, **fields, **options)
    return ImageClassifier(normalize, net, arch=name.strip().lower(), in_channels=in_channels,
                           num_classes=num_classes, input_size=input_size)
