"""Op microbenchmarks: ``finetune-ext bench`` or ``python -m finetune_ext.cli bench``."""

from finetune_ext.bench import (
    armijo,
    curvature,
    fisher_dropout,
    gaussian_perturb,
    ggpo_step,
    lift_rows,
    lora_linear,
    lp_direction,
    softmax_ce_hessian_vp,
)
from finetune_ext.bench.harness import Case, Row, append_csv, format_table, plot_speedup, run

OPS = {
    "armijo_update": armijo.update_cases,
    "armijo_step": armijo.step_cases,
    "fisher_dropout": fisher_dropout.cases,
    "softmax_ce_hessian_vp": softmax_ce_hessian_vp.cases,
    "hvp_block": curvature.hvp_cases,
    "lora_linear": lora_linear.cases,
    "lp_direction": lp_direction.cases,
    "lift_rows": lift_rows.cases,
    "gaussian_perturb": gaussian_perturb.cases,
    "ggpo_step": ggpo_step.cases,
}
DEFAULT_SIZES = {"cpu": [1 << 16, 1 << 18, 1 << 20, 1 << 22], "cuda": [1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28]}

__all__ = ["DEFAULT_SIZES", "OPS", "Case", "Row", "append_csv", "format_table", "plot_speedup", "run"]
