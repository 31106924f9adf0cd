"""Training loop, data loading, methods and checkpoints (``finetune-ext train``)."""

from finetune_ext.train.errors import UserError
from finetune_ext.train.methods import METHODS, Method, MethodConfig, StepContext, register_method
from finetune_ext.train.trainer import TrainConfig, evaluate, train

__all__ = [
    "METHODS",
    "Method",
    "MethodConfig",
    "StepContext",
    "TrainConfig",
    "UserError",
    "evaluate",
    "register_method",
    "train",
]
