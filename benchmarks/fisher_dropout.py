"""Microbenchmark of fisher_dropout: ``python benchmarks/fisher_dropout.py [--device cuda --sizes ...]``.

Same as ``finetune-ext bench --ops fisher_dropout``; see ``finetune-ext bench --help`` for the options.
"""

import sys

from finetune_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", "fisher_dropout", *sys.argv[1:]]))
