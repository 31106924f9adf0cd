"""FisherDropout: drop-in behaviour of nn.Dropout with per-site and per-feature rates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune_ext import reference
from finetune_ext.nn import FisherDropout
from finetune_ext.testing import tolerance
from tests.conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_reference_with_per_feature_rates(device) -> None:
    p = torch.linspace(0.0, 0.6, 16)
    drop = FisherDropout(p).to(device)
    x = torch.randn(8, 16, device=device)
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**63 - 1, (1,)))  # the module draws its key the same way
    torch.testing.assert_close(y, reference.fisher_dropout(x, 1 - p.to(device), seed=seed), **tolerance(x.dtype))
    assert (y[:, 0] == x[:, 0]).all()  # p = 0 keeps everything unscaled


def test_drop_in_for_nn_dropout() -> None:
    model = nn.Sequential(nn.Linear(10, 10), FisherDropout(0.25), nn.Linear(10, 2))
    x = torch.randn(4, 10)
    model.eval()
    reference_model = nn.Sequential(model[0], nn.Dropout(0.25), model[2]).eval()
    assert torch.equal(model(x), reference_model(x))
    model.train()
    out = model(x)
    out.sum().backward()
    assert model[0].weight.grad is not None
    assert "p=0.25" in repr(model[1])


def test_residual_and_state_dict() -> None:
    drop = FisherDropout(torch.full((5,), 0.5))
    x, r = torch.randn(3, 5), torch.randn(3, 5)
    torch.manual_seed(0)
    y = drop(x, r)
    torch.manual_seed(0)
    assert torch.equal(y, r + drop(x))
    other = FisherDropout(0.1)
    other.load_state_dict(drop.state_dict())
    assert torch.equal(other.keep, drop.keep)
    assert torch.allclose(other.p, torch.full((5,), 0.5))


@pytest.mark.parametrize("bad", [1.0, -0.2, float("nan"), torch.tensor([0.1, 1.2]), torch.zeros(2, 2)])
def test_bad_rates(bad) -> None:
    with pytest.raises(ValueError, match="p: expected"):
        FisherDropout(bad)
