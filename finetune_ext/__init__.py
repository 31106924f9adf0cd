"""finetune_ext: fused C++/CUDA kernels and methods for controlled transformer fine-tuning."""

from finetune_ext import ops  # defines the schemas before the kernels register against them
from finetune_ext._loader import build_info, has_cuda_kernels, load_extension

load_extension()

from finetune_ext import nn  # noqa: E402

__version__ = "0.1.0"
__all__ = ["build_info", "has_cuda_kernels", "nn", "ops"]
