"""Modules built on the fused ops."""

from finetune_ext.nn.dropout import FisherDropout

__all__ = ["FisherDropout"]
