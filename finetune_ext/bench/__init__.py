"""Op microbenchmarks: ``finetune-ext bench`` or ``python -m finetune_ext.cli bench``. Step-level benchmarks
(a training step with GGPO, LiFT's rows and LP, HVPs of a block, a BlockArmijo step) are in the repository's
``benchmarks/`` (``python benchmarks/bench.py`` runs them and these)."""

from finetune_ext.bench import armijo, fisher_dropout, gaussian_perturb, lora_linear, softmax_ce_hessian_vp
from finetune_ext.bench.harness import Case, Row, append_csv, format_table, plot_speedup, run

OPS = {
    "armijo_update": armijo.update_cases,
    "fisher_dropout": fisher_dropout.cases,
    "softmax_ce_hessian_vp": softmax_ce_hessian_vp.cases,
    "lora_linear": lora_linear.cases,
    "gaussian_perturb": gaussian_perturb.cases,
}
DEFAULT_SIZES = {"cpu": [1 << 16, 1 << 18, 1 << 20, 1 << 22], "cuda": [1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28]}

__all__ = ["DEFAULT_SIZES", "OPS", "Case", "Row", "append_csv", "format_table", "plot_speedup", "run"]
