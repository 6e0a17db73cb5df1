"""The model spec: everything needed to rebuild a run's architecture, stored in every checkpoint and ticket."""
from __future__ import annotations

import torch

from ..data import dataset_spec
from ..models import build_model
from ..ofa import make_conditional, ofa_spec


def model_spec(cfg) -> dict:
    """The registry model's arguments for ``cfg`` (the dataset fixes channels, classes and input size), plus an
    ``ofa`` entry for once-for-all methods (oat, float, smart)."""
    spec = dataset_spec(cfg.data.name, **cfg.data.options)
    return {"name": cfg.model.name, "in_channels": spec.channels, "num_classes": spec.num_classes,
            "input_size": list(spec.size), "mean": cfg.model.mean, "std": cfg.model.std,
            "options": dict(cfg.model.options), **ofa_spec(cfg)}


def build_from_spec(spec: dict) -> torch.nn.Module:
    model = build_model(spec["name"], spec["in_channels"], spec["num_classes"], tuple(spec["input_size"]),
                        mean=spec["mean"], std=spec["std"], **spec["options"])
    if "ofa" in spec:  # a once-for-all model: the registry model converted in place (robustsparse/ofa/)
        model = make_conditional(model, spec["ofa"])
    return model
