"""Cases for the curvature layer, ``hvp_block``: 16 products w.r.t. one GPT-2 block (GPT-2 small at batch
8 x 512 on GPU; a 2-layer, 128-wide GPT-2 at 2 x 64 on CPU), fp32. ``gradient`` is one plain gradient (the
unit of the targets: exact HVPs <= 5x, GGN <= 3x of it), ``reference`` a double-backward loop over the vectors,
``exact`` batched forward-over-reverse, ``ggn`` the batched Gauss-Newton product with the fused kernel.
``sizes`` is unused.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from finetune_ext import curvature
from finetune_ext.bench.harness import Case, select_providers

HVP_VECTORS = 16


def hvp_cases(
    device: torch.device, dtype: torch.dtype, sizes: list[int], providers: list[str] | None
) -> Iterator[Case]:
    """16 HVP/GGN products for one block against one gradient and a double-backward loop."""
    if device.type == "cuda":
        config, shape, block = GPT2Config(), (8, 512), "transformer.h.5."
    else:
        config, shape, block = GPT2Config(n_layer=2, n_head=2, n_embd=128, n_positions=64), (2, 64), "transformer.h.0."
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    batch = {"input_ids": torch.randint(0, config.vocab_size, shape, device=device)}
    with curvature.for_model(model, batch, [block]) as fns:
        V = tuple(torch.randn(HVP_VECTORS, *p.shape, device=device) for p in fns.params)
        params = tuple(p.clone().requires_grad_(True) for p in fns.params)

        def gradient():
            return torch.autograd.grad(fns.loss_fn(params), params)

        available = {
            "gradient": gradient,
            "reference": lambda: curvature.hvp(fns.loss_fn, fns.params, V, mode="double_backward"),
            "exact": lambda: curvature.hvp(fns.loss_fn, fns.params, V),
            "ggn": lambda: curvature.ggn_vp(fns.output_fn, fns.params, V, labels=fns.labels),
        }
        for name, fn in select_providers(available, providers).items():
            yield Case("hvp_block", f"{HVP_VECTORS}vec", name, shape, torch.float32, device, 0, fn)
