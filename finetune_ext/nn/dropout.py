"""``FisherDropout``: a drop-in for ``nn.Dropout`` with per-site or per-feature rates on the fused kernel."""

from __future__ import annotations

import torch
from torch import nn

from finetune_ext.nn import keys
from finetune_ext.ops.fisher_dropout import fisher_dropout


class FisherDropout(nn.Module):
    """Dropout whose drop probability is one number (a site) or one per feature (last dimension).

    ``p`` is the drop probability, as in ``nn.Dropout``: a float in [0, 1) or a 1-D tensor of them. The
    module stores ``keep = 1 - p`` as a float32 buffer (it follows ``.to()`` and ``state_dict``) and checks
    it once, here, so the forward pass needs no host sync. ``forward(x, residual)`` fuses
    ``residual + dropout(x)``. In eval mode it is the identity. ``site`` keys the mask under
    ``finetune_ext.nn.keys.keyed`` (modules placed by a training part get ``site_id(their name)``).
    """

    keep: torch.Tensor

    def __init__(self, p: float | torch.Tensor = 0.5, site: int = 0) -> None:
        super().__init__()
        self.site = site
        self.register_buffer("keep", torch.ones(()), persistent=True)
        self.set_p(p)

    def set_p(self, p: float | torch.Tensor) -> None:
        """Replace the drop probabilities (a float, or a 1-D tensor for per-feature rates)."""
        p_t = torch.as_tensor(p, dtype=torch.float32).detach()
        if p_t.dim() > 1:
            raise ValueError(f"p: expected a float or a 1-D tensor, got shape {list(p_t.shape)}")
        bad = ~((p_t >= 0) & (p_t < 1))
        if bool(bad.any()):
            raise ValueError(f"p: expected drop probabilities in [0, 1), got {p_t[bad].reshape(-1)[0].item()}")
        self.keep = (1.0 - p_t).to(self.keep.device)

    @property
    def p(self) -> torch.Tensor:
        """Drop probabilities, ``1 - keep``."""
        return 1.0 - self.keep

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint may switch between one rate and per-feature rates: adopt its shape, validated.
        key = prefix + "keep"
        if key in state_dict and state_dict[key].shape != self.keep.shape:
            self.set_p(1.0 - state_dict[key].float())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        seed = keys.site_seed(self.site)
        return fisher_dropout(x, self.keep, residual=residual, training=self.training, seed=seed, check_keep=False)

    def extra_repr(self) -> str:
        if self.keep.dim() == 0:
            return f"p={1.0 - self.keep.item():.4g}"
        return f"p=per-feature[{self.keep.numel()}] (mean {1.0 - self.keep.mean().item():.4g})"


class GaussianDropout(nn.Module):
    """Multiplicative Gaussian noise ``x * N(1, p / (1 - p))`` in training, the identity in eval mode.

    The variance matches Bernoulli dropout at rate ``p`` (Srivastava et al., 2014). Unlike the official
    guided-dropout baseline, the noise is off at evaluation. Under ``keys.keyed`` the noise is drawn from a
    generator seeded by ``keys.site_seed(site)``, otherwise from the default generator.
    """

    def __init__(self, p: float = 0.1, site: int = 0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p: expected a value in [0, 1), got {p}")
        self.p, self.site = p, site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        std = (self.p / (1 - self.p)) ** 0.5
        seed = keys.site_seed(self.site)
        gen = torch.Generator(x.device).manual_seed(seed) if seed is not None else None
        return x * (1 + std * torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=gen))

    def extra_repr(self) -> str:
        return f"p={self.p}"
