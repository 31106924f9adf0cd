"""Op microbenchmarks: ``finetune-ext bench`` or ``python -m finetune_ext.cli bench``."""

from finetune_ext.bench import fisher_dropout
from finetune_ext.bench.harness import Case, Row, append_csv, format_table, plot_speedup, run

OPS = {"fisher_dropout": fisher_dropout.cases}
DEFAULT_SIZES = {"cpu": [1 << 16, 1 << 18, 1 << 20, 1 << 22], "cuda": [1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28]}

__all__ = ["DEFAULT_SIZES", "OPS", "Case", "Row", "append_csv", "format_table", "plot_speedup", "run"]
