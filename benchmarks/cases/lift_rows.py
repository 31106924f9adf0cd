"""Cases for ``lift_rows``: LiFT's constraint rows for one GPT-2 block on the LP's 20,000 columns. ``gradient``
is one plain gradient w.r.t. the block (the unit), ``hvp`` exact rows ``H e_i`` by batched Hessian-vector
products (``curvature=hvp``), ``sr1-build`` the compact SR1 matrix from 50 pairs (Gram matrices and the skip
rule), ``sr1`` its rows (``curvature=sr1``). GPU: GPT-2 small (block 5) at batch 4 x 256, 256 rows. CPU: a
2-layer, 128-wide GPT-2 with a 1,024-word vocabulary at 2 x 64, 16 rows, unless ``config`` and ``rows`` are
given (``benchmarks/lift_rows.py`` runs GPT-2 small's block). ``chunk``: HVP rows per batched call.
``sizes`` is unused.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from finetune_ext import curvature
from finetune_ext.bench.harness import Case, select_providers
from finetune_ext.lift.rows import CompactSR1, FlatParams, hvp_rows

PAIRS, COLUMNS = 50, 20000


def cases(
    device: torch.device,
    dtype: torch.dtype,
    sizes: list[int],
    providers: list[str] | None,
    config: GPT2Config | None = None,
    shape: tuple[int, int] = (2, 64),
    rows: int = 16,
    chunk: int = 32,
) -> Iterator[Case]:
    """One gradient, exact HVP rows and SR1 rows (50 pairs) for one block."""
    if config is None and device.type == "cuda":
        config, shape, rows = GPT2Config(), (4, 256), 256
    small = {"n_layer": 2, "n_head": 2, "n_embd": 128, "n_positions": 64, "vocab_size": 1024, "bos_token_id": 0}
    config = config or GPT2Config(**small, eos_token_id=0)
    block = f"transformer.h.{min(5, config.n_layer - 1)}."
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    batch = {"input_ids": torch.randint(0, config.vocab_size, shape, device=device)}
    with curvature.for_model(model, batch, [block]) as fns:
        params = tuple(p.detach() for p in fns.params)
        leaves = tuple(p.clone().requires_grad_(True) for p in params)
        flat = FlatParams([list(fns.params)])
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(flat.numel, generator=g)[:rows].sort().values
        cols = torch.randperm(flat.numel, generator=g)[: min(COLUMNS, flat.numel)].sort().values
        S = torch.randn(PAIRS, flat.numel, generator=g, dtype=torch.float64) * 1e-3
        Y = S * (1 + torch.rand(flat.numel, generator=g, dtype=torch.float64))

        def gradient():
            return torch.autograd.grad(fns.loss_fn(leaves), leaves)

        sr1 = CompactSR1(S, Y)
        available = {
            "gradient": gradient,
            "hvp": lambda: hvp_rows(fns.loss_fn, params, flat, idx, chunk_size=chunk),
            "sr1-build": lambda: CompactSR1(S, Y),
            "sr1": lambda: sr1.rows(idx, cols),
        }
        numel = sum(p.numel() for p in params)
        for name, fn in select_providers(available, providers).items():
            yield Case("lift_rows", f"{rows}rows", name, (rows, numel), torch.float32, device, 0, fn)
