"""Modules built on the fused ops."""

from finetune_ext.nn.dropout import FisherDropout, GaussianDropout

__all__ = ["FisherDropout", "GaussianDropout"]
