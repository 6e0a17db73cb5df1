"""Run folders and checkpoints (safetensors + JSON)."""
from .checkpoint import find_checkpoint, load_checkpoint, read_meta, save_checkpoint

__all__ = ["find_checkpoint", "load_checkpoint", "read_meta", "save_checkpoint"]
