"""Evaluation: one evaluator, sanity checks, resumable state; models built elsewhere (external.py)."""
from .evaluator import EvalResult, evaluate, parse_eps, parse_suite
from .external import evaluate_external, load_external_model

__all__ = ["EvalResult", "evaluate", "parse_eps", "parse_suite", "evaluate_external", "load_external_model"]
