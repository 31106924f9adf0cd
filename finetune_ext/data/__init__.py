"""Data: text and hub sources, language-modelling blocks, labelled TSV files (GLUE's layouts), splits and the
token cache. ``load_splits`` turns a data argument into tokenized train / validation / test tensors."""

from finetune_ext.data.labelled import read as read_labelled
from finetune_ext.data.sources import HUB_LM, load_hub, read_text, shared_data_dir, tokenize_lines
from finetune_ext.data.splits import Splits, Stream, detect_source, hold_out, load_splits, make_batch, micro_batches

__all__ = [
    "HUB_LM",
    "Splits",
    "Stream",
    "detect_source",
    "hold_out",
    "load_hub",
    "load_splits",
    "make_batch",
    "micro_batches",
    "read_labelled",
    "read_text",
    "shared_data_dir",
    "tokenize_lines",
]
