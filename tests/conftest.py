"""Shared fixtures. Tests marked ``cuda`` skip, with the reason, where no GPU or no CUDA kernels exist."""

from __future__ import annotations

import pytest
import torch

import finetune_ext


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if not finetune_ext.has_cuda_kernels():
        return f"CUDA kernels not built ({finetune_ext.build_info()['cuda_build_reason']})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _cuda_skip_reason()
    if reason is None:
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]


def shared_data(*parts: str):
    """A path under the shared data folder (``$FINETUNE_EXT_DATA`` or ``../shared/data``); skips if absent."""
    from finetune_ext.train.data import shared_data_dir

    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (set FINETUNE_EXT_DATA to the folder of WikiText-2/SST-2)")
    return path
