"""Training objectives, one registry (``base.py``); one file per family registers its members on import."""
from .base import OBJECTIVES, StepOutput, build_objective, register_objective

__all__ = ["OBJECTIVES", "StepOutput", "build_objective", "register_objective"]
