"""Dense training: objectives (standard, PGD-AT, TRADES), schedules, the trainer."""
from .objectives import OBJECTIVES, register_objective
from .trainer import TrainResult, train

__all__ = ["OBJECTIVES", "register_objective", "TrainResult", "train"]
