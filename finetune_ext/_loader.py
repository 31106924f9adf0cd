"""Loads the compiled kernels (``finetune_ext._C``) without ever failing the import of the package."""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from typing import Any

import torch

from finetune_ext.ops._library import has_kernel

_STATE: dict[str, Any] = {"loaded": False, "error": None}


def load_extension() -> None:
    """Import ``finetune_ext._C`` (its static initialisers register the kernels); warn once on failure."""
    try:
        importlib.import_module("finetune_ext._C")
        _STATE["loaded"] = True
    except (ImportError, OSError) as err:
        _STATE["error"] = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"finetune_ext: compiled kernels not loaded ({_STATE['error']}); falling back to the pure-PyTorch "
            "reference ops. Build them with `make build` or `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def _build_meta() -> dict[str, Any]:
    try:
        from finetune_ext._build_meta import BUILD_META
    except ImportError:
        return {}
    return dict(BUILD_META)


def has_cuda_kernels() -> bool:
    """True when the compiled library holds CUDA kernels (whether or not a GPU is present)."""
    return _STATE["loaded"] and has_kernel("fisher_dropout", torch.device("cuda"))


def build_info() -> dict[str, Any]:
    """What was built and loaded: package version, compiled library, the ops with a kernel per device type,
    CUDA archs, the torch it was built against."""
    meta = _build_meta()
    schemas = sorted({s.name.split("::")[1].split(".")[0] for s in torch._C._jit_get_all_schemas()
                      if s.name.startswith("finetune_ext::")})  # fmt: skip
    return {
        "version": _version(),
        "extension_loaded": _STATE["loaded"],
        "kernels": {dev: [op for op in schemas if has_kernel(op, torch.device(dev))] for dev in ("cpu", "cuda")},
        "load_error": _STATE["error"],
        "cuda_kernels": has_cuda_kernels(),
        "cuda_archs": meta.get("cuda_archs", ""),
        "cuda_build_reason": meta.get("reason", "not built"),
        "built_against_torch": meta.get("torch", ""),
        "built_against_cuda": meta.get("torch_cuda", ""),
        "runtime_torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }


def _version() -> str:
    try:
        return importlib.metadata.version("finetune_ext")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
