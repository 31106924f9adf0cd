"""Training loop, data loading, training parts and checkpoints (``finetune-ext train``)."""

from finetune_ext.train.errors import UserError
from finetune_ext.train.parts import RunContext, StepContext, Stepper, Transform
from finetune_ext.train.trainer import TrainConfig, build_parts, check_config, train

__all__ = [
    "RunContext",
    "StepContext",
    "Stepper",
    "TrainConfig",
    "Transform",
    "UserError",
    "build_parts",
    "check_config",
    "train",
]
