"""Cases for the block Armijo line search.

``armijo_update`` / ``armijo_moments``: one multi-tensor pass over a GPT-2's parameter list (GPT-2 small's
148 tensors, 124M parameters on GPU; a 4-layer, 256-wide GPT-2 with an 8192-token vocabulary on CPU), fp32.
Modes: ``trial`` (``w += eta P g``: reads w, g, v, writes w), ``step`` (adds momentum: also reads m) and
``moments`` (reads g, m, v, writes m, v, reduces per block). Providers ``reference`` (a Python loop over
tensors), ``foreach`` (``torch._foreach_*``), ``ext`` (the kernel). Useful bytes count each of those tensors
once. ``sizes`` is unused.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from finetune_ext import ops, reference
from finetune_ext.bench.harness import Case, select_providers


def gpt2_model(device: torch.device) -> tuple[GPT2LMHeadModel, tuple[int, int]]:
    torch.manual_seed(0)
    if device.type == "cuda":
        return GPT2LMHeadModel(GPT2Config()).to(device), (8, 512)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, bos_token_id=0, eos_token_id=0)
    ).to(device), (4, 64)


def update_cases(
    device: torch.device, dtype: torch.dtype, sizes: list[int], providers: list[str] | None
) -> Iterator[Case]:
    """Trial step, momentum step and moments over every parameter tensor of a GPT-2, in one call."""
    model, _ = gpt2_model(device)
    w = [p.detach().to(torch.float32) for p in model.parameters()]
    g, m = [torch.randn_like(t) for t in w], [torch.randn_like(t) for t in w]
    v = [torch.rand_like(t) for t in w]
    n = len(w)
    shape = (sum(t.numel() for t in w),)  # all tensors together; the table counts elements, not tensors
    nbytes = 4 * shape[0]
    bc = {"bias_correction1": 0.5, "bias_correction2": 0.1, "eps": 1e-8, "adam": True}
    blocks = [0] * n

    def update(fn, am):
        return lambda: fn(w, g, m, v, [1e-9] * n, [am] * n, *bc.values())

    def ext_update(am):
        return lambda: ops.armijo_update_(w, g, m, v, [1e-9] * n, [am] * n, backend="ext", **bc)

    def moments(backend):
        return lambda: ops.armijo_moments_(g, m, v, blocks, 1, bias_correction2=0.1, backend=backend)

    modes = {
        "trial": (4 * nbytes, {"reference": update(reference.armijo_update_, 0.0),
                               "foreach": update(reference.armijo_update_foreach_, 0.0), "ext": ext_update(0.0)}),
        "step": (5 * nbytes, {"reference": update(reference.armijo_update_, -1e-9),
                              "foreach": update(reference.armijo_update_foreach_, -1e-9), "ext": ext_update(-1e-9)}),
        "moments": (5 * nbytes, {"reference": moments("reference"), "ext": moments("ext")}),
    }  # fmt: skip
    for mode, (moved, fns) in modes.items():
        wanted = [p for p in providers if p in fns] if providers else None
        for name, fn in select_providers(fns, wanted).items():
            yield Case("armijo_update", mode, name, shape, torch.float32, device, moved, fn)
