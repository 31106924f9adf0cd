"""PEFT LoRA custom modules: LinChain (``linchain_config``) and plain LoRA that our weight perturbations act on
(``perturbable_config``; LinChain layers are perturbable too).

LinChain as a PEFT LoRA custom module: ``get_peft_model`` trains it, ``save_pretrained`` /
``PeftModel.from_pretrained`` keep the mixers, merge / unmerge are exact (mixer biases included).

    config = linchain_config(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), chain_length=3)
    model = get_peft_model(base, config)              # LoRA with a chain of 3 r x r mixers between A and B
    model.save_pretrained(folder)                     # lora_A, lora_B and lora_mixer tensors
    config = linchain_config(LoraConfig.from_pretrained(folder), chain_length=3)   # register again to load
    model = PeftModel.from_pretrained(base, folder, config=config)

PEFT keeps custom modules out of ``adapter_config.json``, so loading registers the module again with the same
``chain_length`` and ``mixer_bias``. The mixers are ``nn.Linear(r, r)`` layers initialised as the official code
does (Kaiming-uniform weights, ``U(-1/sqrt(r), 1/sqrt(r))`` biases); the layer computes
``base(x) + s · B(M_k(⋯M_1(A(dropout(x)))))``, and ``finetune_ext.adapters.LinChainLinear`` is the same update
through our fused kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from finetune_ext import ops
from finetune_ext.nn.perturbation import WeightPerturbation


class PerturbableLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` that the weight perturbations of ``finetune_ext.perturb`` (flat-lora, ggpo, mgpo) act
    on: it implements ``finetune_ext.nn.PerturbableLayer`` for its one active adapter. In a training forward the
    attached noise adds ``x εᵀ`` (ε drawn by ``ops.gaussian_perturb`` from the hook's row stds and seed: the same
    draw as our fused path) and the shift ``x Qᵀ Pᵀ``; the base weight is never written."""

    perturbation: WeightPerturbation | None = None

    def _adapter(self) -> str:
        if len(self.active_adapters) != 1:
            raise ValueError(f"perturbation: expected one active adapter, got {self.active_adapters}")
        return self.active_adapters[0]

    @property
    def scale(self) -> float:
        return self.scaling[self._adapter()]

    def adapter_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        name = self._adapter()
        return self.lora_A[name].weight, self.lora_B[name].weight

    def base_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def stacked_factors(self, layers: list[PerturbableLoraLinear]):
        """``(A, None, B)`` stacked over ``layers`` (plain LoRA: no mixers)."""
        A, B = zip(*(layer.adapter_params() for layer in layers), strict=True)
        return torch.stack(A), None, torch.stack(B)

    def attach_perturbation(self, perturbation: WeightPerturbation | None) -> None:
        self.perturbation = perturbation

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = super().forward(x, *args, **kwargs)
        return result if self.disable_adapters or self.merged else self._perturbed(result, x)

    def _perturbed(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``result`` plus the attached perturbation's terms (none outside training)."""
        hook = self.perturbation if self.training else None
        if hook is None:
            return result
        weight = self.base_weight()
        if hook.noise is not None:
            std, seed = hook.noise
            eps = ops.gaussian_perturb(torch.zeros_like(weight), std, seed=seed)
            result = result + nn.functional.linear(x.to(eps.dtype), eps).to(result.dtype)
        if hook.shift is not None:
            P, Q = hook.shift
            result = result + ((x.to(P.dtype) @ Q.T) @ P.T).to(result.dtype)
        return result


class LinChainLoraLinear(PerturbableLoraLinear):
    """PEFT's LoRA ``Linear`` with ``chain_length`` r x r mixers between ``lora_A`` and ``lora_B`` (``lora_mixer``);
    perturbable like ``PerturbableLoraLinear``."""

    adapter_layer_names = (*LoraLinear.adapter_layer_names, "lora_mixer")
    chain_length: int = 3
    mixer_bias: bool = True

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        if "lora_mixer" not in self._modules:
            self.lora_mixer = nn.ModuleDict()
        # Made first: PEFT's update_layer moves every adapter layer to the base layer's device and sets which train.
        self.lora_mixer[adapter_name] = nn.Sequential(*[nn.Linear(r, r, bias=self.mixer_bias)
                                                        for _ in range(self.chain_length)])  # fmt: skip
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return LoraLinear.forward(self, x, *args, **kwargs)
        result = self._perturbed(self.base_layer(x, *args, **kwargs), x)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            A = self.lora_A[name]
            h = A(self.lora_dropout[name](x.to(A.weight.dtype)))
            result = result + (self.lora_B[name](self.lora_mixer[name](h)) * self.scaling[name]).to(result.dtype)
        return result

    def stacked_factors(self, layers: list[LinChainLoraLinear]):
        """``(M A, M, B)`` stacked over ``layers`` (the mixers' weights; their biases do not enter the row norms)."""
        out = []
        for layer in layers:
            A, B = layer.adapter_params()
            M = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            for mixer in layer.lora_mixer[layer._adapter()]:
                M = mixer.weight @ M
            out.append((M @ A, M, B))
        MA, M, B = (torch.stack(t) for t in zip(*out, strict=True))
        return MA, M, B

    def _chain(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M [r, r], beff [r])`` of the adapter's chain, float64: ``chain(u) = M u + beff``."""
        r = self.r[adapter]
        M, beff = torch.eye(r, dtype=torch.float64), torch.zeros(r, dtype=torch.float64)
        for layer in self.lora_mixer[adapter]:
            W = layer.weight.detach().double().cpu()
            M, beff = W @ M, W @ beff + (layer.bias.detach().double().cpu() if layer.bias is not None else 0.0)
        return M, beff

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s · B M A``, in the base weight's dtype and device."""
        M, _ = self._chain(adapter)
        A, B = (m.weight.detach().double().cpu() for m in (self.lora_A[adapter], self.lora_B[adapter]))
        weight = self.get_base_layer().weight
        delta = self.scaling[adapter] * (B @ M @ A)
        return (delta.T if self.fan_in_fan_out else delta).to(weight.device, weight.dtype)

    def _bias_delta(self, adapter: str) -> torch.Tensor:
        _, beff = self._chain(adapter)
        return self.scaling[adapter] * (self.lora_B[adapter].weight.detach().double().cpu() @ beff)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """PEFT's merge of ``s · B M A`` into the weight, plus the chain's bias term into the base bias."""
        names = check_adapters_to_merge(self, adapter_names)
        self._require_bias(names)
        super().merge(safe_merge=safe_merge, adapter_names=names)
        self._shift_bias(names, +1.0)

    def unmerge(self) -> None:
        names = list(self.merged_adapters)
        super().unmerge()
        self._shift_bias(names, -1.0)

    def _require_bias(self, names: list[str]) -> None:
        if self.mixer_bias and names and self.get_base_layer().bias is None:
            raise RuntimeError("merge: the mixers have biases and the base layer has none; use mixer_bias=False")

    @torch.no_grad()
    def _shift_bias(self, names: list[str], sign: float) -> None:
        bias = self.get_base_layer().bias
        for name in names if self.mixer_bias else ():
            bias.copy_((bias.double() + sign * self._bias_delta(name).to(bias.device)).to(bias.dtype))


def perturbable_config(config: LoraConfig) -> LoraConfig:
    """``config`` with PEFT's LoRA ``Linear`` replaced by ``PerturbableLoraLinear`` (plain LoRA that
    ``--perturbation flat-lora|ggpo|mgpo`` can act on)."""
    config._register_custom_module({nn.Linear: PerturbableLoraLinear, Conv1D: PerturbableLoraLinear})
    return config


def linchain_config(config: LoraConfig, chain_length: int = 3, mixer_bias: bool = True) -> LoraConfig:
    """``config`` with LinChain registered for every ``nn.Linear`` it targets (``chain_length`` >= 1 mixers)."""
    if isinstance(chain_length, bool) or not isinstance(chain_length, int) or chain_length < 1:
        raise ValueError(f"chain_length: expected an integer >= 1, got {chain_length!r}")
    layer = type(f"LinChainLoraLinear{chain_length}", (LinChainLoraLinear,),
                 {"chain_length": chain_length, "mixer_bias": bool(mixer_bias)})  # fmt: skip
    config._register_custom_module({nn.Linear: layer, Conv1D: layer})
    return config
