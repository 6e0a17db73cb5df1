"""Training: objectives (train/objectives/), the one step loop (loop.py), the trainer, engine, DDP, guards, stages."""
from .objectives import OBJECTIVES, register_objective
from .trainer import TrainResult, train

__all__ = ["OBJECTIVES", "register_objective", "TrainResult", "train"]
