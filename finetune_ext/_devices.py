"""Which GPUs the compiled CUDA kernels run on: the build's architecture list against a device's compute
capability, decided once per device.

A cubin built for ``sm_XY`` runs on devices of the same major version and minor >= Y; PTX built for
``compute_XY`` (``X.Y+PTX``) is compiled by the driver for any device >= X.Y. A device that neither covers has no
kernel image: its ops run the pure-PyTorch references (``backend="auto"``) after one warning, and
``backend="ext"`` is an error, instead of CUDA's "no kernel image is available" at the first launch.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from functools import cache
from typing import ParamSpec, TypeVar

import torch

P, R = ParamSpec("P"), TypeVar("R")
_ARCH = re.compile(r"(\d+)\.(\d+)[a-z]?(\+PTX)?")


def parse_archs(text: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``TORCH_CUDA_ARCH_LIST`` syntax (``"7.5;8.0;12.0+PTX"``) -> (cubin capabilities, PTX capabilities)."""
    cubins, ptx = [], []
    for item in re.split(r"[;\s,]+", text.strip()):
        match = _ARCH.fullmatch(item)
        if match:
            capability = (int(match[1]), int(match[2]))
            cubins.append(capability)
            if match[3]:
                ptx.append(capability)
    return cubins, ptx


def runs_on(capability: tuple[int, int], archs: str) -> bool:
    """Whether a build for ``archs`` has a kernel image for a device of compute ``capability``."""
    cubins, ptx = parse_archs(archs)
    major, minor = capability
    return any(m == major and n <= minor for m, n in cubins) or any(p <= capability for p in ptx)


def constant_for_compile(fn: Callable[P, R]) -> Callable[P, R]:
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (1.8 s) at our import: that
    decorator only sets this attribute (tests/test_package.py checks it still does)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


def built_archs() -> str:
    try:
        from finetune_ext._build_meta import BUILD_META
    except ImportError:
        return ""
    return BUILD_META.get("cuda_archs", "")


@constant_for_compile  # fixed per device for the life of the process
def kernels_run_on(index: int) -> bool:
    """Whether the compiled kernels have an image for CUDA device ``index`` (warns once if not)."""
    return _cuda_supported(index)


@cache
def _cuda_supported(index: int) -> bool:
    capability, archs = torch.cuda.get_device_capability(index), built_archs()
    if runs_on(capability, archs):
        return True
    warnings.warn(
        f"finetune_ext: {torch.cuda.get_device_name(index)} (sm_{capability[0]}{capability[1]}) is not covered by "
        f"the compiled CUDA kernels (built for {archs or 'no architecture'}); its ops run the pure-PyTorch "
        f'references. Rebuild with TORCH_CUDA_ARCH_LIST="{capability[0]}.{capability[1]}" make build.',
        RuntimeWarning,
        stacklevel=4,
    )
    return False


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
