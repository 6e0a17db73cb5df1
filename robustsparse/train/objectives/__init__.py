"""Training objectives, one registry (``base.py``); importing a family's file registers its members."""
from . import standard, fgsm_at, ofa  # noqa: F401  isort: skip  (registry order: dense, fast AT, once-for-all)
from .base import OBJECTIVES, Objective, StepOutput, build_objective, register_objective

__all__ = ["OBJECTIVES", "Objective", "StepOutput", "build_objective", "register_objective"]
