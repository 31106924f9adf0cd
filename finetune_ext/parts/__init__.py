"""The contracts every training part is written against: ``Transform`` and ``Stepper``, what a run tells them
(``RunContext``, ``StepContext``), typed options (``option``) and the process layout (``Dist``).

A method package (``adapters``, ``guided``, ``perturb``, ``optim``, ``lift``) implements these; the run
(``finetune_ext.train``) and the Hugging Face integration drive them. Nothing here imports either.
"""

from finetune_ext.parts.contracts import (
    NoOptions,
    OptimSettings,
    Part,
    RunContext,
    StepContext,
    Stepper,
    Transform,
    unshardable,
)
from finetune_ext.parts.distributed import Dist
from finetune_ext.parts.options import option

__all__ = [
    "Dist",
    "NoOptions",
    "OptimSettings",
    "Part",
    "RunContext",
    "StepContext",
    "Stepper",
    "Transform",
    "option",
    "unshardable",
]
