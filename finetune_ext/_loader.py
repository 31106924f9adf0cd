"""Loads the compiled kernels (``finetune_ext._C``) without ever failing the import of the package."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import struct
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from finetune_ext.ops._library import has_kernel

_STATE: dict[str, Any] = {"loaded": False, "error": None}


SIMD_LEVELS = ("avx512", "avx2", "scalar")


def check_simd_cap() -> None:
    """``FINETUNE_EXT_SIMD`` caps the CPU kernels' Philox path; a value they would reject at their first call is
    dropped here with one warning, so the widest path the CPU has is used."""
    cap = os.environ.get("FINETUNE_EXT_SIMD")
    if cap is not None and cap not in SIMD_LEVELS:
        del os.environ["FINETUNE_EXT_SIMD"]
        warnings.warn(f"FINETUNE_EXT_SIMD: expected {', '.join(SIMD_LEVELS)}, got {cap!r}; ignored",
                      RuntimeWarning, stacklevel=3)  # fmt: skip


def load_extension() -> None:
    """Import ``finetune_ext._C`` (its static initialisers register the kernels); warn once on failure."""
    check_simd_cap()
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


def linked_libraries(path: str | Path) -> list[str]:
    """The shared libraries an ELF64 little-endian file names as needed (its DT_NEEDED entries); [] for others."""
    data = Path(path).read_bytes()
    if data[:6] != b"\x7fELF\x02\x01":
        return []
    section_offset = struct.unpack_from("<Q", data, 0x28)[0]
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
    needed = []
    for _, kind, _, _, offset, size, link, *_ in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strings = sections[link][4]
        for pos in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                start = strings + value
                needed.append(data[start : data.index(b"\0", start)].decode())
    return needed


def _libstdcxx() -> str:
    """How the compiled library links libstdc++: a copy linked in statically (the H200 image's /opt/gcc did that)
    crashes the process wherever an op formats a number into an error message."""
    module = sys.modules.get("finetune_ext._C")
    if module is None or not getattr(module, "__file__", None):
        return "not loaded"
    if any(name.startswith("libstdc++.so") for name in linked_libraries(module.__file__)):
        return "dynamic"
    return "not linked dynamically: if statically, errors crash the process (README, Building: rebuild with g++)"


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
        "libstdcxx": _libstdcxx(),
        "cuda_available": torch.cuda.is_available(),
    }


def _version() -> str:
    try:
        return importlib.metadata.version("finetune_ext")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
