"""LinChain ops: batched chain composition and the fused adapted linear layer, with or without its chain.

``linchain_compose`` turns every adapter's chain of r x r mixers into one matrix and one rank-space bias in a
single launch, with exact gradients for each mixer. ``lora_linear`` is a frozen linear layer plus a low-rank
update, ``x W^T + bias + scale * (dropout(x) A^T + c) B^T``: with ``A = M A_0`` and ``c = beff`` it is a
LinChain layer at LoRA's cost. Its dropout is ``fisher_dropout``'s seeded mask, redrawn in the backward, so
only the ``[tokens, r]`` rank-space activations are saved. ``linchain_linear`` is one chain composed and its
layer run in one operator call (an adapter called on its own; in a model the chains are composed once per forward).
"""

from __future__ import annotations

import torch

from finetune_ext import reference
from finetune_ext.ops._library import Backend, check_backend, keep_tensor, philox_key, use_kernel
from finetune_ext.ops.gaussian_perturb import check_noise_args

_UNUSED_KEY = torch.zeros(2, dtype=torch.int64)  # the Philox key argument of a call without dropout or noise


def linchain_compose(
    W: torch.Tensor, b: torch.Tensor | None = None, *, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose N chains of k mixers at once.

    Args:
        W: ``[N, k, r, r]`` mixer weights, ``W[n, i]`` applied i-th (``u <- W[n, i] u + b[n, i]``).
        b: ``[N, k, r]`` mixer biases or ``None``.
        backend: ``"ext"``, ``"reference"`` or ``"auto"`` (the kernel when one is registered).

    Returns:
        ``M [N, r, r] = W[:, k-1] ... W[:, 0]`` and ``beff [N, r]`` (zeros without ``b``); differentiable in both.
    """
    check_backend(backend)
    if W.dim() != 4 or W.shape[2] != W.shape[3] or W.shape[1] < 1:
        raise ValueError(f"W: expected shape [N, k, r, r] with k >= 1, got {list(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"W: expected dtype float16, bfloat16, float32 or float64, got {W.dtype}")
    if b is not None and (b.shape != W.shape[:3] or b.dtype != W.dtype or b.device != W.device):
        raise ValueError(
            f"b: expected shape {list(W.shape[:3])}, dtype {W.dtype} on {W.device}, "
            f"got {list(b.shape)}, {b.dtype} on {b.device}"
        )
    if not use_kernel("linchain_compose", backend, W.device):
        return reference.linchain_compose(W, b)
    M, beff = torch.ops.finetune_ext.linchain_compose(W, b)
    return M, beff


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    c: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    noise_std: torch.Tensor | None = None,
    noise_seed: int = 0,
    noise_offset: int = 0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """A frozen linear layer plus a low-rank update, fused.

    Args:
        x: ``[..., in]``.
        weight, bias: the frozen base layer, ``[out, in]`` and ``[out]`` or ``None`` (GPT-2's ``Conv1D``
            weight is ``[in, out]``: pass ``weight.t()``). The kernel computes no gradient for them; when
            they require one, ``"auto"`` takes the reference path and ``"ext"`` raises. ``weight=None``: the
            adapter path alone (plus ``bias``), for a base the caller runs itself, such as a 4-bit layer.
        A, B, c: ``[r, in]``, ``[out, r]`` and the rank-space bias ``[r]`` or ``None``.
        scale: the update's factor (``alpha / r``).
        dropout_p: dropout on the adapter's input (not on the base path), active when ``training``.
        seed, generator: the dropout's Philox key, as for ``fisher_dropout``.
        noise_std, noise_seed, noise_offset: with ``noise_std`` (``[out]``), the base path multiplies by
            ``gaussian_perturb(weight, noise_std, seed=noise_seed, offset=noise_offset)``, a temporary formed in
            the forward and again in the backward; ``weight`` is never written (LoRA-GGPO, Flat-LoRA).

    Returns:
        ``[..., out]`` in x's dtype.
    """
    check_backend(backend)
    _check_lora_args(x, weight, bias, A, B, c)
    keep, key, noise_std, noise_key = _random_args(
        x, weight, bias, dropout_p, training, seed, generator, noise_std, noise_seed, noise_offset, backend
    )
    if not use_kernel("lora_linear", backend, x.device) or _base_needs_grad(weight, bias):
        return reference.lora_linear(
            x, weight, bias, A, B, c, scale, keep, seed=int(key[0]), offset=int(key[1]),
            noise_std=noise_std, noise_key=(noise_seed, noise_offset),
        )  # fmt: skip
    y, _ = torch.ops.finetune_ext.lora_linear(x, weight, bias, A, B, c, float(scale), keep, key, noise_std, noise_key)
    return y


def linchain_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    mixer_weight: torch.Tensor,
    mixer_bias: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    noise_std: torch.Tensor | None = None,
    noise_seed: int = 0,
    noise_offset: int = 0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """A LinChain layer in one call: ``lora_linear`` with ``A' = M A`` and ``c = beff`` of the chain's
    ``linchain_compose``, composed inside the op (one autograd node: a layer called on its own pays the host for
    one operator instead of the chain's half dozen and their backward nodes).

    Args:
        x, weight, bias, A, B: as for ``lora_linear`` (``A`` is the chain's input projection ``A_0``).
        mixer_weight, mixer_bias: the chain, ``[k, r, r]`` (mixer ``i`` applied ``i``-th) and ``[k, r]`` or
            ``None``; gradients flow to both.
        scale, dropout_p, training, seed, generator, noise_std, noise_seed, noise_offset, backend: as for
            ``lora_linear``.

    Returns:
        ``[..., out]`` in x's dtype.
    """
    check_backend(backend)
    if weight is None:
        raise ValueError("weight: linchain_linear needs the base weight; without one, compose the chain "
                         "(linchain_compose) and call lora_linear(x, None, ...)")  # fmt: skip
    _check_lora_args(x, weight, bias, A, B, None)
    _check_mixer_args(x, A, mixer_weight, mixer_bias)
    keep, key, noise_std, noise_key = _random_args(
        x, weight, bias, dropout_p, training, seed, generator, noise_std, noise_seed, noise_offset, backend
    )
    if not use_kernel("linchain_linear", backend, x.device) or _base_needs_grad(weight, bias):
        return reference.linchain_linear(
            x, weight, bias, A, B, mixer_weight, mixer_bias, scale, keep, seed=int(key[0]), offset=int(key[1]),
            noise_std=noise_std, noise_key=(noise_seed, noise_offset),
        )  # fmt: skip
    return torch.ops.finetune_ext.linchain_linear(
        x, weight, bias, A, B, mixer_weight, mixer_bias, float(scale), keep, key, noise_std, noise_key
    )


def _random_args(x, weight, bias, dropout_p, training, seed, generator, noise_std, noise_seed, noise_offset, backend):
    """``(keep, dropout key, noise_std as float32, noise key)`` of an adapted layer's call, checked; raises when
    ``backend="ext"`` meets a base layer that requires grad (the fused ops keep it frozen)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a value in [0, 1), got {dropout_p}")
    drop = training and dropout_p > 0.0
    key = philox_key(seed, 0, generator) if drop else _UNUSED_KEY
    keep = keep_tensor(1.0 - dropout_p, x.device) if drop else None
    noise_key = philox_key(noise_seed, noise_offset, None) if noise_std is not None else _UNUSED_KEY
    if noise_std is not None and weight is None:
        raise ValueError("noise_std: perturbs the base weight; the call has weight=None")
    if noise_std is not None:
        noise_std = check_noise_args(weight, noise_std)
    if backend == "ext" and _base_needs_grad(weight, bias):
        raise RuntimeError("backend='ext': the fused lora_linear keeps weight and bias frozen; they require grad")
    return keep, key, noise_std, noise_key


def _base_needs_grad(weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, bias))


def _check_mixer_args(x, A, mixer_weight, mixer_bias) -> None:
    r = A.shape[0]
    if mixer_weight.dim() != 3 or mixer_weight.shape[0] < 1 or mixer_weight.shape[1:] != (r, r):
        raise ValueError(f"mixer_weight: expected shape [k, {r}, {r}] with k >= 1, got {list(mixer_weight.shape)}")
    if mixer_bias is not None and mixer_bias.shape != (mixer_weight.shape[0], r):
        raise ValueError(f"mixer_bias: expected shape [{mixer_weight.shape[0]}, {r}], got {list(mixer_bias.shape)}")
    for name, t in {"mixer_weight": mixer_weight, "mixer_bias": mixer_bias}.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: expected dtype {x.dtype} on {x.device} (like x), got {t.dtype} on {t.device}")


def _check_lora_args(x, weight, bias, A, B, c) -> None:
    if not x.is_floating_point():
        raise ValueError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if weight is None:
        if A.dim() != 2 or B.dim() != 2:
            raise ValueError(f"A, B: expected 2-d [r, in] and [out, r], got {list(A.shape)} and {list(B.shape)}")
        (out, _), inp = B.shape, A.shape[1]
    elif weight.dim() != 2:
        raise ValueError(f"weight: expected 2-d [out, in], got {list(weight.shape)}")
    else:
        out, inp = weight.shape
    if x.dim() < 1 or x.shape[-1] != inp:
        raise ValueError(f"x: expected last dimension {inp} (weight [out, in] or A [r, in]), got {list(x.shape)}")
    if A.dim() != 2 or A.shape[1] != inp:
        raise ValueError(f"A: expected shape [r, {inp}], got {list(A.shape)}")
    r = A.shape[0]
    expected = {"bias": (bias, (out,)), "B": (B, (out, r)), "c": (c, (r,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    for name, t in {"weight": weight, "bias": bias, "A": A, "B": B, "c": c}.items():
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name}: expected dtype {x.dtype} on {x.device} (like x), got {t.dtype} on {t.device}")
