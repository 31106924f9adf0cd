"""Cases for ``armijo_step``: a whole training step of ``finetune_ext.bench.armijo.gpt2_model`` (batch 4 x 64 on
CPU, 8 x 512 on GPU): forward,
backward and the optimizer, for ``AdamW(fused=True)`` and ``BlockArmijo`` (cycle) with the kernels (``ext``)
or the reference loops; the line search adds one forward per trial, so this is the overhead a user pays.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from finetune_ext.bench.armijo import gpt2_model
from finetune_ext.bench.harness import Case, select_providers
from finetune_ext.optim import BlockArmijo, blocks_from_model


def step_cases(
    device: torch.device, dtype: torch.dtype, sizes: list[int], providers: list[str] | None
) -> Iterator[Case]:
    """One whole training step: AdamW(fused=True) against BlockArmijo with kernels and with loops."""
    model, shape = gpt2_model(device)
    batch = torch.randint(0, model.config.vocab_size, shape, device=device)

    def closure():
        return model(batch, labels=batch).loss

    adamw = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def adamw_step():
        adamw.zero_grad(set_to_none=True)
        closure().backward()
        adamw.step()

    armijo = {b: BlockArmijo(blocks_from_model(model), init_step_size=1e-5, backend=b) for b in ("ext", "reference")}
    fns = {
        "adamw-fused": adamw_step,
        "reference": lambda: armijo["reference"].step(closure),
        "ext": lambda: armijo["ext"].step(closure),
    }
    for name, fn in select_providers(fns, providers).items():
        yield Case("armijo_step", "fwdbwd", name, shape, torch.float32, device, 0, fn)
