"""robustsparse: find, train and honestly evaluate sparse, adversarially robust image classifiers.

    import robustsparse as rs
    x, y = rs.load_dataset("digits", split="test")   # float [0, 1] NCHW, int64 labels
    model = rs.load("runs/digits")                    # eval-mode nn.Module: images -> logits
    result = rs.evaluate(model, x, y, suite="clean,pgd-20,autoattack", eps=0.1)
    print(result.table())
"""
from ._version import __version__  # noqa: E402  (one place: _version.py, read by pyproject too)
from .api import load, load_meta  # noqa: E402
from .attacks import FGSM, PGD, Attack, TradesKL, attack_mode  # noqa: E402
from .config import RunConfig, load_config  # noqa: E402
from .data import list_datasets, load_dataset  # noqa: E402
from .errors import UserError  # noqa: E402
from .eval import EvalResult, evaluate, evaluate_external  # noqa: E402
from .models import build_model, list_models  # noqa: E402
from .train import train  # noqa: E402
from .posttrain import PosttrainResult, posttrain  # noqa: E402
from .pipelines.sweep import sweep  # noqa: E402

__all__ = ["load", "load_meta", "load_dataset", "list_datasets", "build_model", "list_models", "evaluate",
           "evaluate_external",
           "EvalResult", "train", "posttrain", "PosttrainResult", "RunConfig", "load_config", "Attack", "FGSM",
           "PGD", "TradesKL", "attack_mode", "UserError", "sweep", "__version__"]
