"""The run: ``train(TrainConfig(...))`` (``finetune-ext train``), the part registry, checkpoints, the run folder,
launch, metrics, models and export."""

from finetune_ext.train.trainer import TrainConfig, build_parts, check_config, preflight, train

__all__ = ["TrainConfig", "build_parts", "check_config", "preflight", "train"]
