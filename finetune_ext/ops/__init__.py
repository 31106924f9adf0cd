"""Public fused ops. Importing this package defines every schema (``_library``) and its autograd."""

from finetune_ext.ops import _library  # noqa: F401  (schemas first: kernels register against them)
from finetune_ext.ops.armijo import armijo_moments_, armijo_update_
from finetune_ext.ops.fisher_dropout import fisher_dropout
from finetune_ext.ops.gaussian_perturb import gaussian_perturb
from finetune_ext.ops.linchain import linchain_compose, linchain_linear, lora_linear
from finetune_ext.ops.softmax_ce_hessian_vp import softmax_ce_hessian_vp

__all__ = [
    "armijo_moments_",
    "armijo_update_",
    "fisher_dropout",
    "gaussian_perturb",
    "linchain_compose",
    "linchain_linear",
    "lora_linear",
    "softmax_ce_hessian_vp",
]
