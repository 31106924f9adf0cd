"""Cases for the curvature layer.

``softmax_ce_hessian_vp``: m = 8 vectors over a GPT-2 vocabulary (C = 50257), rows = size // C; providers
``reference`` (pure PyTorch: softmax materialised), ``compile``, ``ext``. Useful bytes: logits and V read
once, the output written once.

``hvp_block``: 16 products w.r.t. one GPT-2 block (GPT-2 small at batch 8 x 512 on GPU; a 2-layer, 128-wide
GPT-2 at 2 x 64 on CPU), fp32. ``gradient`` is one plain gradient (the unit of the targets: exact HVPs
<= 5x, GGN <= 3x of it), ``reference`` a double-backward loop over the vectors, ``exact`` batched
forward-over-reverse, ``ggn`` the batched Gauss-Newton product with the fused kernel. ``sizes`` is unused.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from finetune_ext import curvature, ops, reference
from finetune_ext.bench.harness import Case, select_providers

VOCAB, VECTORS, HVP_VECTORS = 50257, 8, 16


def softmax_cases(
    device: torch.device, dtype: torch.dtype, sizes: list[int], providers: list[str] | None
) -> Iterator[Case]:
    """Fused Hessian-vector kernel against the pure-PyTorch and compiled versions."""
    compiled = torch.compile(reference.softmax_ce_hessian_vp)
    fns = select_providers(
        {
            "reference": reference.softmax_ce_hessian_vp,
            "compile": compiled,
            "ext": lambda z, v: ops.softmax_ce_hessian_vp(z, v, backend="ext"),
        },
        providers,
    )
    for size in sizes:
        rows = max(1, size // VOCAB)
        logits = torch.randn(rows, VOCAB, device=device, dtype=dtype)
        V = torch.randn(VECTORS, rows, VOCAB, device=device, dtype=dtype)
        moved = logits.nbytes + 2 * V.nbytes
        for name, fn in fns.items():
            run = lambda fn=fn, z=logits, v=V: fn(z, v)  # noqa: E731
            yield Case("softmax_ce_hessian_vp", "fwd", name, tuple(V.shape), dtype, device, moved, run)


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
