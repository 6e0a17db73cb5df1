"""After-training pruning: robust dense pre-training → prune (HYDRA, LWM, adversarial IMP) → fine-tune/rounds.

    after.py     the registry (``AFTER_TRAINING``, ``register_after_training``, ``Outcome``)
    hydra.py     HYDRA: scores with top-k and a straight-through gradient, weights frozen; the score stage
    lwm.py       least-weight magnitude of the pre-trained weights
    imp.py       adversarial IMP with rewinding
    pipeline.py  ``posttrain()`` and ``Pipeline``, the context every method gets

Importing the package registers the three methods (the explicit list below, as open_lth keeps its registry).
"""
from . import hydra, imp, lwm  # noqa: F401  importing a method registers it
from .after import AFTER_TRAINING, Outcome, register_after_training
from .pipeline import Pipeline, PosttrainResult, posttrain

__all__ = ["AFTER_TRAINING", "Outcome", "register_after_training", "Pipeline", "PosttrainResult", "posttrain"]
