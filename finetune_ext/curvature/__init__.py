"""Curvature: batched Hessian- and Gauss-Newton-vector products, and operators built on them."""

import warnings

from finetune_ext.curvature.linops import flatten, hutchinson_trace, lanczos, random_vectors, sketch, unflatten
from finetune_ext.curvature.models import ModelFunctions, eager_attention, for_model
from finetune_ext.curvature.products import ggn_vp, hvp

# torch's forward-mode AD loads its decompositions through torch.jit.script on first use and warns that
# jit.script is deprecated: torch's own internals, nothing a caller of ours can act on.
warnings.filterwarnings("ignore", r"`torch.jit.script` is deprecated", FutureWarning, r"torch\.jit\._script")

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
