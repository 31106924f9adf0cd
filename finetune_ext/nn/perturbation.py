"""The interface between weight perturbations (``finetune_ext.perturb``) and the adapted layers they act on.

A perturbation transform gives each adapted layer one ``WeightPerturbation`` (``attach_perturbation``) and
rewrites its fields every step; the layer reads them in each training forward and never writes the base weight.
Any layer that implements ``PerturbableLayer`` can be perturbed: ``adapters.LinChainLinear`` does.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


class WeightPerturbation:
    """What one adapted layer's forward uses instead of its base weight ``W`` in the current step.

    ``noise``: ``(std [out] float32, Philox seed)``: the layer multiplies by ``W + std_i z_ij`` with ``z`` drawn
    by ``ops.gaussian_perturb`` from the seed, inside the fused op. ``shift``: ``(P [out, q], Q [q, in])``: the
    layer adds ``x Q^T P^T``, the output of ``W + P Q``. ``None`` for either: none. Evaluation ignores both.
    """

    __slots__ = ("noise", "shift")

    def __init__(self) -> None:
        self.noise: tuple[torch.Tensor, int] | None = None
        self.shift: tuple[torch.Tensor, torch.Tensor] | None = None

    def clear(self) -> None:
        """No perturbation until the next step sets one."""
        self.noise = self.shift = None


@runtime_checkable
class PerturbableLayer(Protocol):
    """An adapted linear layer ``y = x (W + s B M A)^T``: what a perturbation reads and the hook it sets."""

    scale: float

    def adapter_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable factors ``(A [r, in], B [out, r])`` whose gradients and momenta a perturbation reads."""

    def base_weight(self) -> torch.Tensor:
        """The frozen weight ``W`` as ``[out, in]`` (a view: never written)."""

    def stacked_factors(self, layers: list[PerturbableLayer]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(A', M, B)`` stacked over ``layers`` (same shapes as this one): ``A' = M A`` and ``M`` ``None``
        when the layers have no mixers."""

    def attach_perturbation(self, perturbation: WeightPerturbation | None) -> None:
        """Use ``perturbation`` in every training forward from now on (``None``: detach)."""
