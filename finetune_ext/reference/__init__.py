"""Pure-PyTorch references: the oracles of the tests and the baselines of the benchmarks."""

from finetune_ext.reference.armijo import armijo_moments_, armijo_update_, armijo_update_foreach_
from finetune_ext.reference.fisher_dropout import dropout_mask, fisher_dropout, fisher_dropout_eager
from finetune_ext.reference.gaussian_perturb import gaussian_perturb, philox_normal
from finetune_ext.reference.linchain import linchain_chain, linchain_compose, linchain_linear, lora_linear
from finetune_ext.reference.philox import philox4x32_10, philox_uniform
from finetune_ext.reference.softmax_ce_hessian_vp import softmax_ce_hessian_vp

__all__ = [
    "armijo_moments_",
    "armijo_update_",
    "armijo_update_foreach_",
    "dropout_mask",
    "fisher_dropout",
    "fisher_dropout_eager",
    "gaussian_perturb",
    "linchain_chain",
    "linchain_compose",
    "linchain_linear",
    "lora_linear",
    "philox4x32_10",
    "philox_normal",
    "philox_uniform",
    "softmax_ce_hessian_vp",
]
