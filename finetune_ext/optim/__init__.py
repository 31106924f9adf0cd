"""Optimizers: ``BlockArmijo`` (per-block Armijo line search, PLASLS / AdamSLS) and its block builder."""

from finetune_ext.optim.block_armijo import BlockArmijo
from finetune_ext.optim.blocks import blocks_from_model

__all__ = ["BlockArmijo", "blocks_from_model"]
