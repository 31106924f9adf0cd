"""``LinChainLinear``: a frozen ``nn.Linear`` or GPT-2 ``Conv1D`` plus a LinChain update, through the fused op."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from finetune_ext import ops
from finetune_ext.adapters.config import LinChainConfig
from finetune_ext.nn import keys
from finetune_ext.nn.perturbation import WeightPerturbation


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype``; no ``to`` call when it already is (a dispatcher call per tensor and layer)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def quantized_base(module: nn.Module) -> bool:
    """A bitsandbytes 4-/8-bit linear layer (``Linear4bit``, ``Linear8bitLt``): its weight is packed, and only its
    own forward may read it."""
    return type(module).__module__.startswith("bitsandbytes.") and not module.weight.is_floating_point()


class LinChainLinear(nn.Module):
    """``y = base(x) + s * B (M dropout(x) A^T... )``: LoRA factors ``A [r, in]``, ``B [out, r]`` and a chain of
    ``k`` mixers stored as ``mixer_weight [k, r, r]`` (``u <- mixer_weight[i] u + mixer_bias[i]``).

    The chain is composed into ``M, beff`` and the layer runs as LoRA with ``A' = M A`` and a rank-space bias
    ``beff`` (``ops.lora_linear``); ``A'`` and ``beff`` are made once per model forward for all adapters (by
    the model-level hook in ``adapters.model``), or inside ``ops.linchain_linear`` when the layer is called on
    its own. ``site`` keys the adapter dropout's mask under ``finetune_ext.nn.keys.keyed``.

    It implements ``finetune_ext.nn.PerturbableLayer``: a weight perturbation (``finetune_ext.perturb``) attaches
    a ``WeightPerturbation`` whose noise is formed inside ``lora_linear`` and whose shift is added as a low-rank
    term; the base weight itself is never written.

    A quantized base (a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``: an ``nn.Linear`` with a packed integer
    weight) runs through its own forward, and the adapter path through ``lora_linear`` without a weight: the
    packed weight is never read as a matrix; merging and weight perturbations need a dense base and are refused.
    The factors are float32 over a bf16, fp16 or packed base (float64 over float64); the forward casts them to
    autocast's dtype, or to the input's without autocast.
    """

    def __init__(self, base: nn.Linear | Conv1D, config: LinChainConfig, site: int = 0) -> None:
        super().__init__()
        self.site = site
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(f"base: expected nn.Linear or Conv1D, got {type(base).__name__}")
        self.base_layer = base
        self.conv1d = isinstance(base, Conv1D)
        self.quantized = quantized_base(base)
        out_f, in_f = (base.out_features, base.in_features) if self.quantized else self.base_weight().shape
        r, k = config.r, config.chain_length
        self.r, self.chain_length, self.scale, self.dropout = r, k, config.scale, config.dropout
        # fp32 over a half-precision or packed base, as the optimizer state (PEFT's autocast_adapter_dtype)
        dtype = torch.float64 if not self.quantized and base.weight.dtype == torch.float64 else torch.float32
        like = {"dtype": dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, in_f, **like))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, **like))
        self.mixer_weight = nn.Parameter(torch.empty(k, r, r, **like)) if k else None
        self.mixer_bias = nn.Parameter(torch.empty(k, r, **like)) if k and config.mixer_bias else None
        self.merged = False
        self._created_bias = False
        self._factors: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (M A, beff) of the model forward
        self.perturbation: WeightPerturbation | None = None
        self.reset_parameters(config.init)
        self.train(base.training)

    def adapter_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A, lora_B)``: the factors a perturbation reads gradients and momenta of."""
        return self.lora_A, self.lora_B

    def attach_perturbation(self, perturbation: WeightPerturbation | None) -> None:
        """Use ``perturbation``'s noise and shift in every training forward (``None``: detach)."""
        self.perturbation = perturbation

    def stacked_factors(self, layers: list[LinChainLinear]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(A', M, B)`` stacked over ``layers``: ``A' = M A`` (``M`` is ``None`` for LoRA)."""
        B = torch.stack([layer.lora_B for layer in layers])
        if self.mixer_weight is None:
            return torch.stack([layer.lora_A for layer in layers]), None, B
        M, _, A = chain_factors(layers)
        return A, M, B

    @torch.no_grad()
    def reset_parameters(self, init: str = "kaiming") -> None:
        """The official initialisation (``kaiming``) or mixers at the identity; B = 0 either way."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.mixer_weight is None:
            return
        for i in range(self.chain_length):
            if init == "identity":
                nn.init.eye_(self.mixer_weight[i])
            else:
                nn.init.kaiming_uniform_(self.mixer_weight[i], a=math.sqrt(5))
        if self.mixer_bias is not None:
            bound = 1.0 / math.sqrt(self.r)
            nn.init.zeros_(self.mixer_bias) if init == "identity" else nn.init.uniform_(self.mixer_bias, -bound, bound)

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a transposed view for ``Conv1D``)."""
        w = self.base_layer.weight
        return w.t() if self.conv1d else w

    def factors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(A', c)``: the effective down-projection ``M A`` and rank-space bias (``None`` without mixer biases),
        as the model hook composed them for this forward, else composed here."""
        if self._factors is not None:
            return self._factors
        if self.mixer_weight is None:
            return self.lora_A, None
        _, beff, A = chain_factors([self])
        return A[0], (beff[0] if beff is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.quantized:
            return self._quantized_forward(x)
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x, weight, bias, B = (_as(t, dtype) for t in (x, self.base_weight(), self.base_layer.bias, self.lora_B))
        hook = self.perturbation if self.training else None
        std, noise_seed = hook.noise if hook is not None and hook.noise is not None else (None, 0)
        stochastic = {"dropout_p": self.dropout, "training": self.training, "seed": keys.site_seed(self.site),
                      "noise_std": std, "noise_seed": noise_seed}  # fmt: skip
        if self._factors is None and self.mixer_weight is not None:  # on its own: the chain composed in the op
            A, mixer_weight, mixer_bias = (_as(t, dtype) for t in (self.lora_A, self.mixer_weight, self.mixer_bias))
            y = ops.linchain_linear(x, weight, bias, A, B, mixer_weight, mixer_bias, scale=self.scale, **stochastic)
        else:
            A, c = (_as(t, dtype) for t in self.factors())
            y = ops.lora_linear(x, weight, bias, A, B, c, scale=self.scale, **stochastic)
        if hook is None or hook.shift is None:
            return y
        P, Q = (_as(t, dtype) for t in hook.shift)
        return y + (x @ Q.t()) @ P.t()

    def _quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base through its own (bitsandbytes) forward plus the adapter path alone through ``lora_linear``."""
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.lora_B.dtype
        A, c = (_as(t, dtype) for t in self.factors())
        xa, B = _as(x, dtype), _as(self.lora_B, dtype)
        y = ops.lora_linear(xa, None, None, A, B, c, scale=self.scale, dropout_p=self.dropout, training=self.training,
                            seed=keys.site_seed(self.site))  # fmt: skip
        return self.base_layer(x).to(y.dtype) + y

    @torch.no_grad()
    def delta(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The update as ``(dW [out, in], db [out] or None)``, computed in float64 for an exact merge."""
        A, c = self.factors()
        B = self.lora_B.double()
        dW = self.scale * (B @ A.double())
        db = self.scale * (B @ c.double()) if c is not None else None
        return dW, db

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base layer (``W += s B M A``, ``bias += s B beff``)."""
        if self.quantized:
            raise ValueError("merge: the base weight is quantized (packed); dequantize the base to merge the update")
        if self.merged:
            return
        self._apply_delta(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``."""
        if not self.merged:
            return
        self._apply_delta(-1.0)
        self.merged = False

    def _apply_delta(self, sign: float) -> None:
        dW, db = self.delta()
        w = self.base_layer.weight
        w.copy_((w.double() + sign * (dW.t() if self.conv1d else dW)).to(w.dtype))
        if db is None:
            return
        if self.base_layer.bias is None:  # a bias-free nn.Linear gets one while merged
            self.base_layer.bias = nn.Parameter(torch.zeros_like(db, dtype=w.dtype), requires_grad=False)
            self._created_bias = True
        bias = self.base_layer.bias
        bias.copy_((bias.double() + sign * db).to(bias.dtype))
        if sign < 0 and self._created_bias:
            self.base_layer.bias = None
            self._created_bias = False

    def extra_repr(self) -> str:
        return f"r={self.r}, chain_length={self.chain_length}, scale={self.scale:g}, dropout={self.dropout:g}"


def chain_factors(layers: list[LinChainLinear]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(M, beff, M A)`` stacked over chained adapters of one shape, from one ``linchain_compose`` and one ``bmm``
    (``beff`` is ``None`` without mixer biases)."""
    W = torch.stack([a.mixer_weight for a in layers])
    b = torch.stack([a.mixer_bias for a in layers]) if layers[0].mixer_bias is not None else None
    M, beff = ops.linchain_compose(W, b)
    return M, (beff if b is not None else None), torch.bmm(M, torch.stack([a.lora_A for a in layers]))
