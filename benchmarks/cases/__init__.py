"""Step-level benchmark cases: the same ``Case`` generators as ``finetune_ext.bench``, over methods and models."""
