"""Perturbation transforms ``--perturbation flat-lora|ggpo|mgpo``: the weights each step's gradient is taken at.

* ``flat-lora`` (Li et al., ICML 2025): ``W + eps``, ``eps_ij ~ N(0, std_i^2)`` with
  ``std_i = f(t) rho / sqrt(in) ||W'_i||``, ``W' = W + s B A``, ``f(t) = (1 - cos(pi t / T)) / 2``.
* ``ggpo`` (LoRA-GGPO, arXiv 2502.14538 v1): the same noise with the row stds also guided by the gradient proxy
  ``G = s (grad_B A + B grad_A)`` of the last backward; ``formula=default`` or ``kohya`` (see ``GGPOOptions``).
* ``mgpo`` (LoRA-MGPO, v2): a deterministic shift ``eps = -rho v / ||v|| min(1 / gbar, 10)`` along Adam's
  momentum in weight space, ``v = s (m_B A + B m_A)``, with ``gbar`` an EMA of ``||G||_F``; the minus sign is the
  released code's (a descent-direction look-ahead, unlike SAM's ascent).

One noise draw serves every micro-batch and rank of a step: its Philox key is ``(run seed, step // refresh,
layer)``. The stds come from ``perturb.stats`` (no ``B A``, no full-weight gradient). For LinChain ``A`` is the
chain's ``M A`` and ``grad_A`` enters as ``M grad_A`` (the mixers held fixed).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from finetune_ext.errors import UserError
from finetune_ext.nn import keys
from finetune_ext.nn.perturbation import PerturbableLayer, WeightPerturbation
from finetune_ext.parts import RunContext, Stepper, Transform, option
from finetune_ext.perturb import stats

_NOISE_STREAM = 0x6E6F697365  # separates the noise keys from the dropout keys


@dataclass
class FlatLoRAOptions:
    rho: float = option(0.05, "noise scale: row std = f(t) rho / sqrt(in) ||W'_i||")
    ramp: Literal["cosine", "constant"] = option("cosine", "f(t): (1 - cos(pi t / T)) / 2 rising 0 -> 1, or 1")
    refresh: int = option(1, "steps between noise redraws (stds and key fixed in between)")

    def __post_init__(self) -> None:
        if not (isinstance(self.rho, (int, float)) and self.rho >= 0):
            raise ValueError(f"rho: expected a number >= 0, got {self.rho!r}")
        if self.ramp not in ("cosine", "constant"):
            raise ValueError(f"ramp: expected 'cosine' or 'constant', got {self.ramp!r}")
        if isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 1:
            raise ValueError(f"refresh: expected an integer >= 1, got {self.refresh!r}")


@dataclass
class GGPOOptions(FlatLoRAOptions):
    """``default``: ``std_i = f(t) rho / sqrt(in) (||W'_i|| + beta g_i) / (1 + beta)`` with ``g_i = ||G_i||`` rescaled
    to the layer's mean ``||W'_i||`` (so beta is unit-free and the mean std equals Flat-LoRA's: the gradient
    only moves noise to the rows it is large on). ``kohya``: sd-scripts' literal
    ``std_i = f(t) (rho sqrt(mean_j ||W_j||^2 + ||(B A)_i||^2) + beta ||G_i||^2) / sqrt(out)`` (its ``B A`` without
    the scale; the mean over every row instead of 1,000 sampled ones; ``ramp=constant`` for its fixed scale)."""

    beta: float = option(1.0, "weight of the gradient term (kohya's default is 0.01, with rho 0.03)")
    formula: Literal["default", "kohya"] = option("default", "row-std formula: ours or sd-scripts' literal one")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0):
            raise ValueError(f"beta: expected a number >= 0, got {self.beta!r}")
        if self.formula not in ("default", "kohya"):
            raise ValueError(f"formula: expected 'default' or 'kohya', got {self.formula!r}")


@dataclass
class MGPOOptions:
    rho: float = option(0.05, "shift size: ||eps||_F = f(t) rho min(1 / gbar, 10)")
    beta: float = option(0.9, "EMA decay of the gradient norm gbar")
    ramp: Literal["cosine", "constant"] = option("constant", "f(t), as for flat-lora (the released code: constant)")

    def __post_init__(self) -> None:
        if not (isinstance(self.rho, (int, float)) and self.rho >= 0):
            raise ValueError(f"rho: expected a number >= 0, got {self.rho!r}")
        if not (isinstance(self.beta, (int, float)) and 0 <= self.beta < 1):
            raise ValueError(f"beta: expected a value in [0, 1), got {self.beta!r}")
        if self.ramp not in ("cosine", "constant"):
            raise ValueError(f"ramp: expected 'cosine' or 'constant', got {self.ramp!r}")


class _Perturbation(Transform):
    """Finds the adapted layers, attaches a hook to each, groups them; the ramp."""

    requires = ("adapter",)
    unshardable_because = "it reads whole weight rows between steps, where FSDP holds a shard of each"

    def apply(self, model: nn.Module, run: RunContext) -> None:
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, PerturbableLayer)}
        if not self.layers:
            raise UserError(f"perturbation: {self.name} perturbs adapted layers; add --adapter lora or linchain")
        packed = [n for n, m in self.layers.items() if not m.base_weight().is_floating_point()]
        if packed:
            raise UserError(f"perturbation: {self.name} perturbs the base weight, and {packed[0]!r} has a packed "
                            "(4-bit or 8-bit) one; use a dense base")  # fmt: skip
        self.hooks = {name: WeightPerturbation() for name in self.layers}
        for name, layer in self.layers.items():
            layer.attach_perturbation(self.hooks[name])
        self.groups = _groups(self.layers, self.hooks)
        self.seed, self.total_steps = run.seed, run.total_steps

    def ramp(self, step: int) -> float:
        if self.options.ramp == "constant":
            return 1.0
        return 0.5 * (1.0 - math.cos(math.pi * step / max(1, self.total_steps)))


@dataclass
class _Group:
    """Adapted layers whose row statistics are computed stacked (one weight shape and dtype, rank, device, scale
    and adapter kind): a few batched kernels per group and step instead of a few dozen small ones per layer (on a
    GPU each is a launch, and a GPT-2 step is bound by the host). Its results stay stacked: the noise's row stds
    are written in place into ``std``, whose row views go into the layers' hooks. Methods run under ``no_grad``."""

    names: list[str]
    layers: list[PerturbableLayer]
    hooks: list[WeightPerturbation]
    sites: list[int]  # keys.site_id of each layer's module name: keys its noise draws
    weights_t: list[torch.Tensor]  # each layer's frozen W^T, [in, out] (views: the base weights are never replaced)
    drawn: bool = False  # whether std holds a draw (not before the first step or load)
    grad_norms: torch.Tensor | None = None  # [L, out]: ||G_i|| of the last backward, float64 (ggpo)
    ema: torch.Tensor | None = None  # [L]: EMA of ||G||_F (mgpo)

    @property
    def scale(self) -> float:
        return self.layers[0].scale

    @functools.cached_property
    def w_sq(self) -> torch.Tensor:
        """``[L, out]``: ``||W_i||^2`` of each layer's frozen weight, float64 (made on first use: mgpo needs none)."""
        return torch.stack([stats.row_sq_norms(W_t.t()) for W_t in self.weights_t])

    @functools.cached_property
    def std(self) -> torch.Tensor:
        """``[L, out]`` float32: the noise's row stds of the current draw (made on first use, outside inference
        mode even from a ``load_state_dict`` inside it: the layers' forwards save its rows for their backward)."""
        W_t = self.weights_t[0]
        with torch.inference_mode(False):
            return torch.zeros(len(self.weights_t), W_t.shape[1], dtype=torch.float32, device=W_t.device)

    @functools.cached_property
    def std_rows(self) -> tuple[torch.Tensor, ...]:
        """``std``'s row views, one per layer (made once: the layers hold them)."""
        return self.std.unbind()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(A', M, B)`` stacked over the layers, ``A' = M A`` (``M`` is ``None`` for LoRA)."""
        return self.layers[0].stacked_factors(self.layers)

    def merged_norms(self) -> torch.Tensor:
        """``||W'_i||`` of every row of ``W' = W + s B A'``, ``[L, out]``."""
        A, M, B = self.factors()
        rows = [layer.adapter_params()[0] for layer in self.layers] if M is None else A.unbind()  # LoRA: no views
        AW = torch.stack([stats.weight_product(w_t, a) for w_t, a in zip(self.weights_t, rows, strict=True)])
        return stats.merged_row_norms(self.w_sq, AW, A, B, self.scale)

    def pair(self, d_A: list[torch.Tensor | None], d_B: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        """``(P, Q)`` stacked, ``P Q = s (d_B A' + B M d_A)`` for the directions ``d_A``, ``d_B`` of each layer's
        factors (gradients, momenta); ``()`` while a layer has none."""
        if any(d is None for d in d_A + d_B):
            return ()
        A, M, B = self.factors()
        return stats.gradient_factors(A, B, torch.stack(d_A), torch.stack(d_B), self.scale, M)

    def gradient_pair(self) -> tuple[torch.Tensor, ...]:
        """``pair`` of the last backward's gradients: ``P Q = G``, the gradient proxy; ``()`` while a layer has none."""
        params = [ly.adapter_params() for ly in self.layers]
        return self.pair([A.grad for A, _ in params], [B.grad for _, B in params])

    def gradient_norms(self) -> torch.Tensor | None:
        """``||G_i||`` of the gradient proxy of the last backward, ``[L, out]``; ``None`` while a layer has none."""
        P_Q = self.gradient_pair()
        return stats.product_row_norms(*P_Q) if P_Q else None


@torch.no_grad()
def _groups(layers: dict[str, PerturbableLayer], hooks: dict[str, WeightPerturbation]) -> list[_Group]:
    """The layers in groups of stackable ones, in model order."""
    by_key: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        W, (A, _) = layer.base_weight(), layer.adapter_params()
        chained = getattr(layer, "mixer_weight", None) is not None
        key = (W.shape, W.dtype, W.device, A.shape, A.dtype, layer.scale, type(layer), chained)
        by_key.setdefault(key, []).append(name)
    groups = []
    for names in by_key.values():
        members = [layers[n] for n in names]
        weights_t = [layer.base_weight().detach().t() for layer in members]
        sites = [keys.site_id(n) for n in names]
        groups.append(_Group(names, members, [hooks[n] for n in names], sites, weights_t))
    return groups


class FlatLoRA(_Perturbation):
    """Flat-LoRA: Gaussian noise on the full weight, row std f(t)·rho/sqrt(in)·||W + sBA||_i, one draw a step."""

    name = "flat-lora"
    Options = FlatLoRAOptions

    def row_std(self, group: _Group, step: int) -> torch.Tensor:
        """The noise's row stds of every layer of ``group``, ``[L, out]``."""
        fan_in = group.weights_t[0].shape[0]
        return self.ramp(step) * self.options.rho / math.sqrt(fan_in) * group.merged_norms()

    @torch.no_grad()
    def before_step(self, step: int, stepper: Stepper) -> None:
        refresh = self.options.refresh
        for group in self.groups:
            if step % refresh == 0 or not group.drawn:
                group.std.copy_(self.row_std(group, step))
                group.drawn = True
            seeds = keys.mix_each((self.seed, _NOISE_STREAM, step // refresh), group.sites)
            for hook, std, seed in zip(group.hooks, group.std_rows, seeds, strict=True):
                hook.noise = (std, seed)

    def after_step(self, step: int, stepper: Stepper) -> None:
        for hook in self.hooks.values():
            hook.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"std": _rows(self.groups, lambda g: g.std if g.drawn else None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for group in self.groups:
            rows = _stacked(group, state["std"])
            if rows is not None:
                group.std.copy_(rows)
            group.drawn = rows is not None


def _rows(groups: list[_Group], stacked: Callable[[_Group], torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """A per-group ``[L, out]`` statistic as ``{layer name: row}`` (copies; groups without one left out)."""
    out = {}
    for group in groups:
        value = stacked(group)
        if value is not None:
            out.update(zip(group.names, value.clone().unbind(), strict=True))
    return out


def _stacked(group: _Group, rows: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``group``'s rows of a ``{layer name: row}`` statistic stacked, ``None`` unless every layer has one."""
    if not all(name in rows for name in group.names):
        return None
    return torch.stack([rows[name] for name in group.names]).to(group.weights_t[0].device)


class GGPO(FlatLoRA):
    """LoRA-GGPO: Flat-LoRA's noise with row stds guided by weight and gradient norms (formula default|kohya)."""

    name = "ggpo"
    Options = GGPOOptions

    def row_std(self, group: _Group, step: int) -> torch.Tensor:
        o = self.options
        fan_in, fan_out = group.weights_t[0].shape
        g = group.grad_norms
        if o.formula == "kohya":
            w_mean = group.w_sq.sqrt().mean(-1, keepdim=True)
            A, _, B = group.factors()
            ba = stats.product_row_norms(B, A)
            g2 = g.square() if g is not None else torch.zeros_like(ba)
            return self.ramp(step) * (o.rho * (w_mean**2 + ba**2).sqrt() + o.beta * g2) / math.sqrt(fan_out)
        norms = guided = group.merged_norms()
        if g is not None:  # g rescaled to each layer's mean ||W'_i||; an all-zero g leaves Flat-LoRA's stds. No sync.
            g_sum = g.sum(-1, keepdim=True)
            guided = torch.where(g_sum > 0, g * (norms.sum(-1, keepdim=True) / g_sum), norms)
        return torch.add(norms, guided, alpha=o.beta).mul_(self.ramp(step) * o.rho / math.sqrt(fan_in) / (1.0 + o.beta))

    @torch.no_grad()
    def after_step(self, step: int, stepper: Stepper) -> None:
        super().after_step(step, stepper)
        for group in self.groups:  # a step without gradients (a stepper that cleared them) keeps the last norms
            g = group.gradient_norms()
            if g is not None:
                group.grad_norms = g

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "grad_norms": _rows(self.groups, lambda g: g.grad_norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for group in self.groups:
            group.grad_norms = _stacked(group, state["grad_norms"])


class MGPO(_Perturbation):
    """LoRA-MGPO: shift W by -rho·v/||v||·min(1/gbar, 10) along Adam's momentum v (the released code's sign)."""

    name = "mgpo"
    Options = MGPOOptions

    def check_stepper(self, stepper: Stepper) -> None:
        if not stepper.keeps_momentum:
            raise UserError(f"perturbation: mgpo reads the optimizer's momentum; optimizer {stepper.name!r} keeps none")

    @torch.no_grad()
    def before_step(self, step: int, stepper: Stepper) -> None:
        o = self.options
        for group in self.groups:
            momenta = [[stepper.momentum(p) for p in ly.adapter_params()] for ly in group.layers]
            P_Q = group.pair([m for m, _ in momenta], [m for _, m in momenta])
            shifts = [None] * len(group.layers)  # a group shifts once every layer has a momentum
            if P_Q:
                P, Q = P_Q
                norm = stats.product_norm(P, Q)  # [L]
                adaptive = 1.0 if group.ema is None else torch.clamp(1.0 / (group.ema + 1e-12), max=10.0)
                # A vanishing momentum shifts by zero, decided on the device (bool(norm > 1e-12) would wait).
                coef = torch.where(norm > 1e-12, -o.rho * self.ramp(step) * adaptive / (norm + 1e-12), 0.0)
                scaled = (P.double() * coef[:, None, None]).to(P.dtype)
                shifts = list(zip(scaled.unbind(), Q.unbind(), strict=True))
            for hook, shift in zip(group.hooks, shifts, strict=True):
                hook.shift = shift

    @torch.no_grad()
    def after_step(self, step: int, stepper: Stepper) -> None:
        beta = self.options.beta
        for hook in self.hooks.values():
            hook.clear()
        for group in self.groups:
            P_Q = group.gradient_pair()
            if not P_Q:
                continue
            norm = stats.product_norm(*P_Q)
            group.ema = norm if group.ema is None else beta * group.ema + (1.0 - beta) * norm

    def state_dict(self) -> dict[str, Any]:
        return {"ema": _rows(self.groups, lambda g: g.ema)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for group in self.groups:
            group.ema = _stacked(group, state["ema"])
