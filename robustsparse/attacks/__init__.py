"""Attacks: one base class (eval mode, no parameter gradients), short attacks with a docstring contract."""
from .autoattack import COMPONENTS as AUTOATTACK_COMPONENTS
from .base import Attack, attack_mode
from .fgsm import FGSM
from .pgd import PGD
from .trades import TradesKL

__all__ = ["Attack", "attack_mode", "FGSM", "PGD", "TradesKL", "AUTOATTACK_COMPONENTS"]
