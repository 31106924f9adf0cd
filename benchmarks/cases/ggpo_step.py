"""Cases for ``ggpo_step``: one LoRA training step (forward, backward, AdamW) of a GPT-2 with adapters (r = 8 on
every attention and MLP linear), plain and with a weight perturbation.

Providers: ``lora`` (no perturbation), ``ggpo`` (our transform: row stds from ``perturb.stats``, the noise formed
inside ``lora_linear`` by ``gaussian_perturb`` and regenerated in the backward), ``flat-lora`` (the same path
without the gradient term) and ``naive`` (what the released Flat-LoRA code does, with GGPO's stds: ``B A``, the
weight gradient proxy and ``eps`` materialised, ``W += eps`` before the forward, ``W -= eps`` after the backward).
GPU: GPT-2 small at batch 8 x 256 in bf16 autocast; CPU: a 2-layer, 128-wide GPT-2 at 2 x 64 unless ``config``
and ``shape`` are given (``benchmarks/ggpo_step.py`` runs GPT-2 small). The target: ``ggpo`` within 1.05x of
``lora``. ``sizes`` is unused; GB/s is not meaningful here (0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from finetune_ext.adapters import LinChainConfig, LinChainLinear, apply_linchain
from finetune_ext.bench.harness import Case, select_providers
from finetune_ext.optim.parts import AdamW
from finetune_ext.parts import OptimSettings, RunContext
from finetune_ext.perturb import GGPO, FlatLoRA
from finetune_ext.perturb.parts import FlatLoRAOptions, GGPOOptions

RANK = 8
SMALL = {"n_layer": 2, "n_head": 2, "n_embd": 128, "n_positions": 64, "vocab_size": 1024, "bos_token_id": 0}


def adapted_gpt2(config: GPT2Config, device: torch.device) -> tuple[GPT2LMHeadModel, dict[str, LinChainLinear]]:
    """A randomly initialised GPT-2 with LoRA on every Conv1D (attention and MLP), B non-zero."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device).train()
    layers = apply_linchain(model, LinChainConfig(r=RANK, alpha=2.0 * RANK, chain_length=0))
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.02)
    return model, layers


class NaiveGGPO:
    """GGPO as the released Flat-LoRA code applies noise: dense ``B A``, dense gradient proxy, dense ``eps``
    added to the weight in place and subtracted after the backward; the same default row-std formula."""

    def __init__(self, layers: dict[str, LinChainLinear], rho: float = 0.05, beta: float = 1.0) -> None:
        self.layers, self.rho, self.beta = layers, rho, beta
        self.eps: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def add(self) -> None:
        for name, layer in self.layers.items():
            W, A, B, s = layer.base_weight(), layer.lora_A, layer.lora_B, layer.scale
            norms = torch.linalg.vector_norm(W + s * (B @ A), dim=1)
            guided = norms
            if A.grad is not None:
                g = torch.linalg.vector_norm(s * (B.grad @ A + B @ A.grad), dim=1)
                guided = g * (norms.mean() / g.mean())
            std = self.rho / math.sqrt(W.shape[1]) * (norms + self.beta * guided) / (1.0 + self.beta)
            self.eps[name] = std[:, None] * torch.randn_like(W)
            W.add_(self.eps[name])

    @torch.no_grad()
    def subtract(self) -> None:
        for name, layer in self.layers.items():
            layer.base_weight().sub_(self.eps.pop(name))


def _step_fn(model, batch, transform, naive: NaiveGGPO | None, autocast: Callable) -> Callable[[], float]:
    run = RunContext("lm", None, {}, {}, lambda m: {}, 0, 1000, OptimSettings(1e-4, 0.0, 0, 0.0), "")
    stepper = AdamW()
    stepper.setup(model, run)
    if transform is not None:
        transform.apply(model, run)
    state = {"step": 500}  # mid-run: the ramp f(t) is 1/2

    def step() -> float:
        if transform is not None:
            transform.before_step(state["step"], stepper)
        if naive is not None:
            naive.add()
        stepper.optimizer.zero_grad(set_to_none=False)
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        if naive is not None:
            naive.subtract()
        stepper.optimizer.step()
        if transform is not None:
            transform.after_step(state["step"], stepper)
        state["step"] += 1
        return float(loss.detach())

    return step


# provider -> (the transform, the naive in-place version) for a model's adapted layers
PROVIDERS: dict[str, Callable[[dict[str, LinChainLinear]], tuple]] = {
    "lora": lambda layers: (None, None),
    "ggpo": lambda layers: (GGPO(GGPOOptions()), None),
    "flat-lora": lambda layers: (FlatLoRA(FlatLoRAOptions()), None),
    "naive": lambda layers: (None, NaiveGGPO(layers)),
}


def cases(
    device: torch.device,
    dtype: torch.dtype,
    sizes: list[int],
    providers: list[str] | None,
    config: GPT2Config | None = None,
    shape: tuple[int, int] = (2, 64),
) -> Iterator[Case]:
    """One training step per provider, each on its own copy of the same model."""
    if config is None and device.type == "cuda":
        config, shape = GPT2Config(), (8, 256)
    config = config or GPT2Config(**SMALL, eos_token_id=0)
    ids = torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "labels": ids}
    low = dtype if dtype != torch.float32 else None
    autocast = lambda: torch.autocast(device.type, dtype=low, enabled=low is not None)  # noqa: E731
    for name in select_providers(PROVIDERS, providers):
        model, layers = adapted_gpt2(config, device)
        transform, naive = PROVIDERS[name](layers)
        fn = _step_fn(model, batch, transform, naive, autocast)
        yield Case("ggpo_step", "train-step", name, tuple(ids.shape), dtype, device, 0, fn)
        del model, layers, fn
