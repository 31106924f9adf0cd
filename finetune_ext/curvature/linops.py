"""Linear-operator helpers on top of ``hvp``/``ggn_vp``: sketches, Hutchinson trace, Lanczos eigenvalues.

Each takes ``matvec``: a function from a batch of vectors (tuple of ``[m, *p.shape]`` tensors) to the
operator applied to them, e.g. ``functools.partial(hvp, loss_fn, params)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from finetune_ext.curvature.products import Tensors

MatVec = Callable[[Tensors], Tensors]


def flatten(vectors: Tensors) -> torch.Tensor:
    """``[m, n]`` from a tuple of ``[m, *shape]`` tensors."""
    return torch.cat([v.reshape(v.shape[0], -1) for v in vectors], dim=1)


def unflatten(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> Tensors:
    """Inverse of ``flatten`` for the shapes of ``params``."""
    sizes = [p.numel() for p in params]
    return tuple(c.reshape(flat.shape[0], *p.shape) for c, p in zip(flat.split(sizes, dim=1), params, strict=True))


def random_vectors(
    params: Sequence[torch.Tensor], k: int, *, seed: int = 0, distribution: str = "rademacher"
) -> torch.Tensor:
    """``[k, n]`` random vectors (Rademacher ±1 or standard Gaussian), seeded, on the parameters' device."""
    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    n = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(seed)
    if distribution == "rademacher":
        s = torch.randint(0, 2, (k, n), generator=gen).mul_(2).sub_(1)
    elif distribution == "gaussian":
        s = torch.randn(k, n, generator=gen)
    else:
        raise ValueError(f"distribution: expected 'rademacher' or 'gaussian', got {distribution!r}")
    return s.to(device=params[0].device, dtype=params[0].dtype)


def sketch(
    matvec: MatVec, params: Sequence[torch.Tensor], k: int, *, seed: int = 0, vectors: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S H)`` for ``k`` sketch vectors ``S`` (``[k, n]``, given or Rademacher). ``H`` is symmetric, so the
    rows of ``S H`` are ``H s_i``: one batched product."""
    s = random_vectors(params, k, seed=seed) if vectors is None else vectors
    return s, flatten(matvec(unflatten(s, params)))


def hutchinson_trace(
    matvec: MatVec, params: Sequence[torch.Tensor], num_samples: int, *, seed: int = 0
) -> tuple[float, float]:
    """Hutchinson's estimate of ``tr(H)`` from Rademacher probes, and its standard error."""
    s, hs = sketch(matvec, params, num_samples, seed=seed)
    samples = (s * hs).sum(1).double()
    stderr = float(samples.std() / num_samples**0.5) if num_samples > 1 else float("inf")
    return float(samples.mean()), stderr


def lanczos(
    matvec: MatVec, params: Sequence[torch.Tensor], k: int = 1, *, iters: int = 30, seed: int = 0
) -> torch.Tensor:
    """The ``k`` largest eigenvalues (descending) from ``iters`` Lanczos steps with full reorthogonalisation."""
    n = sum(p.numel() for p in params)
    iters = min(iters, n)
    if not 1 <= k <= iters:
        raise ValueError(f"k: expected 1 <= k <= iters ({iters}), got {k}")
    q = random_vectors(params, 1, seed=seed, distribution="gaussian")[0].double()
    q /= q.norm()
    basis, alphas, betas = [q], [], []
    for j in range(iters):
        w = flatten(matvec(unflatten(basis[j].to(params[0].dtype)[None], params)))[0].double()
        alphas.append(torch.dot(w, basis[j]))
        Q = torch.stack(basis)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)  # twice is enough (Kahan-Parlett)
        beta = w.norm()
        if j == iters - 1 or beta < 1e-10 * max(1.0, float(abs(alphas[-1]))):
            break
        betas.append(beta)
        basis.append(w / beta)
    t = torch.diag(torch.stack(alphas))
    if betas:
        b = torch.stack(betas[: len(alphas) - 1])
        t += torch.diag(b, 1) + torch.diag(b, -1)
    return torch.linalg.eigvalsh(t).flip(0)[:k].to(params[0].dtype)
