"""Every benchmark: the op microbenchmarks of ``finetune-ext bench`` and the step-level cases of
``benchmarks/cases/`` (a training step with GGPO, LiFT's rows and LP, HVPs of a GPT-2 block, a BlockArmijo step),
with ``finetune-ext bench``'s options.

    python benchmarks/bench.py [--ops ggpo_step lp_direction] [--device cuda] [--out bench-out]
"""

from __future__ import annotations

import sys

from cases import armijo_step, curvature, ggpo_step, lift_rows, lp_direction

from finetune_ext import bench, cli

STEPS = {
    "armijo_step": armijo_step.step_cases,
    "hvp_block": curvature.hvp_cases,
    "lp_direction": lp_direction.cases,
    "lift_rows": lift_rows.cases,
    "ggpo_step": ggpo_step.cases,
}
CASES = {**bench.OPS, **STEPS}


def main(argv: list[str] | None = None) -> int:
    """``finetune-ext bench`` over the op and the step-level cases."""
    return cli.main(["bench", *(sys.argv[1:] if argv is None else argv)], bench_cases=CASES)


if __name__ == "__main__":
    sys.exit(main())
