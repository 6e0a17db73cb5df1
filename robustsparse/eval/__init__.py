"""Evaluation: one evaluator, sanity checks, resumable state."""
from .evaluator import EvalResult, evaluate, parse_suite

__all__ = ["EvalResult", "evaluate", "parse_suite"]
