"""Curvature: batched Hessian- and Gauss-Newton-vector products, and operators built on them."""

from finetune_ext.curvature.linops import flatten, hutchinson_trace, lanczos, random_vectors, sketch, unflatten
from finetune_ext.curvature.models import ModelFunctions, eager_attention, for_model
from finetune_ext.curvature.products import ggn_vp, hvp

__all__ = [
    "ModelFunctions",
    "eager_attention",
    "flatten",
    "for_model",
    "ggn_vp",
    "hutchinson_trace",
    "hvp",
    "lanczos",
    "random_vectors",
    "sketch",
    "unflatten",
]
