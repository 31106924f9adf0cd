"""Every schema of the ``finetune_ext`` namespace and its fake (meta) kernel: the one place ops are declared.

Kernels register against these schemas from C++ (``TORCH_LIBRARY_IMPL(finetune_ext, CPU|CUDA, m)`` in
``csrc/``), so an op exists, with its fake kernel for ``torch.compile``, even when the compiled library is
missing. Autograd is registered next to each public function in ``finetune_ext/ops/<op>.py``, but for
``lora_linear``, ``linchain_linear`` and ``linchain_compose``, whose autograd is C++ (``csrc/lora_linear.cpp``,
``csrc/linchain_linear.cpp``, ``csrc/linchain_compose_autograd.cpp``): Python's wrapper cost more host time than
the ops at adapter sizes.
"""

from __future__ import annotations

import functools
from array import array
from typing import Literal

import torch

from finetune_ext import _devices

LIB = torch.library.Library("finetune_ext", "DEF")
Backend = Literal["auto", "ext", "reference"]  # every public op's backend= argument
_SEED_MAX = 2**63 - 1


def philox_key(seed: int | None, offset: int, generator: torch.Generator | None) -> torch.Tensor:
    """The CPU int64 tensor ``[seed, offset]`` that keys the kernels' Philox streams; ``seed=None`` draws one
    from ``generator`` (default: the CPU default generator)."""
    if not 0 <= offset <= _SEED_MAX:
        raise ValueError(f"offset: expected an integer in [0, 2**63), got {offset}")
    if seed is not None and not 0 <= seed <= _SEED_MAX:
        raise ValueError(f"seed: expected an integer in [0, 2**63), got {seed}")
    if torch.compiler.is_compiling():  # traced: tensor ops only (dynamo knows neither array nor int(tensor))
        drawn = torch.tensor([seed]) if seed is not None else torch.randint(0, _SEED_MAX, (1,), generator=generator)
        return torch.cat([drawn, torch.tensor([offset])])
    if seed is None:
        seed = int(torch.randint(0, _SEED_MAX, (1,), dtype=torch.int64, generator=generator))
    # frombuffer: a third of torch.tensor's host time, and this runs for every random op's call
    return torch.frombuffer(array("q", [seed, offset]), dtype=torch.int64)


@functools.lru_cache(maxsize=64)
def _keep_scalar(keep: float, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a tensor made under inference mode could not be saved for a backward
        return torch.full((), keep, dtype=torch.float32, device=device)


def keep_tensor(keep: float, device: torch.device) -> torch.Tensor:
    """The float32 scalar tensor ``keep`` on ``device`` that the dropout kernels read, made once per value and
    device (never written): a new one per call was an allocation and, on a GPU, a fill kernel per layer call."""
    if torch.compiler.is_compiling():
        return torch.full((), keep, dtype=torch.float32, device=device)
    return _keep_scalar(keep, device)


# y = residual + x * m / keep, m ~ Bernoulli(keep) from Philox keyed by seed = (seed, offset), a CPU int64[2].
# keep: float32 of shape [] / [1] (one site) or [x.size(-1)] (per feature). Output is contiguous.
LIB.define("fisher_dropout(Tensor x, Tensor keep, Tensor? residual, Tensor seed) -> Tensor")


@torch.library.register_fake("finetune_ext::fisher_dropout")
def _fisher_dropout_fake(
    x: torch.Tensor, keep: torch.Tensor, residual: torch.Tensor | None, seed: torch.Tensor
) -> torch.Tensor:
    # The fake kernel lets torch.compile trace the op without running it (shapes, dtypes, strides only).
    torch._check(keep.dtype == torch.float32, lambda: f"keep must be float32, got {keep.dtype}")
    return x.new_empty(x.shape)


def check_backend(backend: str) -> None:
    """``backend`` of a public op: ``"auto"``, ``"ext"`` or ``"reference"``."""
    if backend not in ("auto", "ext", "reference"):
        raise ValueError(f"backend: expected 'auto', 'ext' or 'reference', got {backend!r}")


def use_kernel(op: str, backend: str, device: torch.device) -> bool:
    """Whether a call with ``backend`` runs the compiled kernel of ``op`` on ``device`` (else the reference).
    ``auto`` also falls back on a GPU the compiled kernels have no image for (``finetune_ext._devices``)."""
    if backend == "reference":
        return False
    if backend == "auto":
        return has_kernel(op, device) and _image_for(device)
    if not has_kernel(op, device):
        raise RuntimeError(f"backend='ext': no compiled {op} kernel for {device.type} (see finetune_ext.build_info())")
    if not _image_for(device):
        raise RuntimeError(
            f"backend='ext': the compiled CUDA kernels have no image for {device} (built for "
            f"{_devices.built_archs()}); rebuild with TORCH_CUDA_ARCH_LIST set to its compute capability"
        )
    return True


def _image_for(device: torch.device) -> bool:
    return device.type != "cuda" or _devices.kernels_run_on(_devices.device_index(device))


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether a compiled kernel of ``finetune_ext::<op>`` is registered for ``device``'s type."""
    return _has_kernel(op, device.type)


_REGISTERED: set[tuple[str, str]] = set()  # (op, device type) pairs found to have a kernel: they keep it


@_devices.constant_for_compile  # fixed once the library is loaded; lets torch.compile fold the branch
def _has_kernel(op: str, device_type: str) -> bool:
    # The lookup by name costs about 15 us, and lora_linear asks once per adapted layer and step.
    if (op, device_type) in _REGISTERED:
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    found = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"finetune_ext::{op}", key)
    if found:
        _REGISTERED.add((op, device_type))
    return found


# (diag(p) - p p^T) v per row, p = softmax(logits[n]), for m vectors: V [m, N, C] -> [m, N, C] in V's dtype.
# Rows whose label equals ignore_index give zeros. Accumulates in float32 (float64 for float64 inputs). The result
# is multiplied by scale (a 0-dim tensor on the logits' device, read there: no host sync) when given.
LIB.define(
    "softmax_ce_hessian_vp(Tensor logits, Tensor V, Tensor? labels, int ignore_index, Tensor? scale=None) -> Tensor"
)


@torch.library.register_fake("finetune_ext::softmax_ce_hessian_vp")
def _softmax_ce_hessian_vp_fake(
    logits: torch.Tensor, V: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, scale=None
) -> torch.Tensor:
    torch._check(logits.dim() == 2 and V.dim() == 3, lambda: "expected logits [N, C] and V [m, N, C]")
    torch._check(V.shape[1:] == logits.shape, lambda: f"V {tuple(V.shape)} does not match logits {tuple(logits.shape)}")
    return V.new_empty(V.shape)


@torch.library.register_vmap("finetune_ext::softmax_ce_hessian_vp")
def _softmax_ce_hessian_vp_vmap(info, in_dims, logits, V, labels, ignore_index, scale=None):
    """Batched vectors over shared logits (Hessian products under ``vmap``) join the m vectors: one call."""
    logits_dim, v_dim, labels_dim = in_dims[:3]
    scale_dim = in_dims[4] if len(in_dims) > 4 else None
    op = torch.ops.finetune_ext.softmax_ce_hessian_vp
    if logits_dim is None and labels_dim is None and scale_dim is None:
        V = V.movedim(v_dim, 0)
        return op(logits, V.flatten(0, 1).contiguous(), labels, ignore_index, scale).view(V.shape), 0
    at = lambda t, dim, i: t if dim is None else t.select(dim, i)  # noqa: E731
    outs = [op(at(logits, logits_dim, i), at(V, v_dim, i), at(labels, labels_dim, i), ignore_index,
               at(scale, scale_dim, i)) for i in range(info.batch_size)]  # fmt: skip
    return torch.stack(outs), 0


# LinChain: every chain of one shape in one call. W [N, k, r, r] (mixer i of chain n at W[n, i]), b [N, k, r] or
# None -> (M [N, r, r] = W[:, k-1] @ ... @ W[:, 0], beff [N, r] = sum_i W[:, k-1] ... W[:, i+1] @ b[:, i]).
LIB.define("linchain_compose(Tensor W, Tensor? b) -> (Tensor, Tensor)")
# Gradients w.r.t. W and b (an empty [0] tensor for b when b is None).
LIB.define("linchain_compose_backward(Tensor grad_M, Tensor grad_beff, Tensor W, Tensor? b) -> (Tensor, Tensor)")


@torch.library.register_fake("finetune_ext::linchain_compose")
def _linchain_compose_fake(W: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(W.dim() == 4, lambda: f"expected W [N, k, r, r], got {tuple(W.shape)}")
    n, _, r, _ = W.shape
    return W.new_empty(n, r, r), W.new_empty(n, r)


@torch.library.register_fake("finetune_ext::linchain_compose_backward")
def _linchain_compose_backward_fake(
    grad_M: torch.Tensor, grad_beff: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return W.new_empty(W.shape), W.new_empty(b.shape if b is not None else (0,))


# Adapted linear layer: y = x @ W.T + bias + scale * u @ B.T with u = dropout(x) @ A.T + c, returns (y, u).
# x [..., in], weight [out, in] (frozen; None: no base term, the caller runs its base, e.g. a 4-bit one), A [r, in],
# B [out, r], c [r]; keep: the dropout keep probability as
# for fisher_dropout (None: no dropout), seed the fisher_dropout key. u [tokens, r] is what backward needs.
# noise_std [out] float32 (None: no noise): W is replaced by gaussian_perturb(weight, noise_std, noise_seed),
# formed as a temporary in the forward and again in the backward; weight itself is never written.
LIB.define(
    "lora_linear(Tensor x, Tensor? weight, Tensor? bias, Tensor A, Tensor B, Tensor? c, float scale, Tensor? keep, "
    "Tensor seed, Tensor? noise_std, Tensor noise_seed) -> (Tensor, Tensor)"
)
# Gradients w.r.t. (x, A, B, c) for output_mask's True entries; the others are empty [0] tensors.
LIB.define(
    "lora_linear_backward(Tensor grad, Tensor x, Tensor? weight, Tensor A, Tensor B, Tensor u, float scale, "
    "Tensor? keep, Tensor seed, Tensor? noise_std, Tensor noise_seed, bool[4] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("finetune_ext::lora_linear")
def _lora_linear_fake(x, weight, bias, A, B, c, scale, keep, seed, noise_std, noise_seed):
    torch._check(x.shape[-1] == A.shape[1], lambda: f"x {tuple(x.shape)} does not match A {tuple(A.shape)}")
    return x.new_empty(*x.shape[:-1], B.shape[0]), x.new_empty(x.numel() // x.shape[-1], A.shape[0])


@torch.library.register_fake("finetune_ext::lora_linear_backward")
def _lora_linear_backward_fake(grad, x, weight, A, B, u, scale, keep, seed, noise_std, noise_seed, output_mask):
    shapes = (x.shape, A.shape, B.shape, (A.shape[0],))
    return tuple(x.new_empty(s if need else (0,)) for s, need in zip(shapes, output_mask, strict=True))


# A LinChain layer in one call: lora_linear(x, weight, bias, M A, B, beff, ...) with (M, beff) =
# linchain_compose(mixer_weight[None], mixer_bias[None]) for one chain, mixer_weight [k, r, r], mixer_bias [k, r]
# or None (then c = None). One autograd node (csrc/linchain_linear.cpp) with gradients for x, A, B and the mixers.
LIB.define(
    "linchain_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor mixer_weight, "
    "Tensor? mixer_bias, float scale, Tensor? keep, Tensor seed, Tensor? noise_std, Tensor noise_seed) -> Tensor"
)


@torch.library.register_fake("finetune_ext::linchain_linear")
def _linchain_linear_fake(x, weight, bias, A, B, mixer_weight, mixer_bias, scale, keep, seed, noise_std, noise_seed):
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"x {tuple(x.shape)} does not match weight {weight.shape}")
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# out = weight + std[:, None] * z, z ~ N(0, 1) i.i.d. from Philox (Box-Muller, four normals per group of
# elements in memory order: row-major, column-major for a transposed view) keyed by seed = (seed, offset), a CPU
# int64[2]. weight [out, in]; std float32 [out]. Returns a new tensor in weight's dtype and layout.
LIB.define("gaussian_perturb(Tensor weight, Tensor std, Tensor seed) -> Tensor")


@torch.library.register_fake("finetune_ext::gaussian_perturb")
def _gaussian_perturb_fake(weight: torch.Tensor, std: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    torch._check(weight.dim() == 2, lambda: f"expected weight [out, in], got {tuple(weight.shape)}")
    if not weight.is_contiguous() and weight.t().is_contiguous():
        return weight.new_empty(weight.shape[::-1]).t()
    return weight.new_empty(weight.shape)


# Block Armijo line search, multi-tensor: every tensor of the lists in one launch. Moments (Adam):
# m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2 in place, then per parameter block (block_of[i] for tensor i)
# the sums (g^2 P, g^2) with P = 1 / (sqrt(v / bc2) + eps) (P = 1 and moments untouched when adam is false;
# exp_avg lists may then be empty). Returns float64 [num_blocks, 2] on the tensors' device.
LIB.define(
    "armijo_moments_(Tensor[] grads, Tensor(a!)[] exp_avg, Tensor(b!)[] exp_avg_sq, int[] block_of, int num_blocks, "
    "float beta1, float beta2, float bias_correction2, float eps, bool adam) -> Tensor"
)
# w_i <- w_i + (alpha_g[i] g_i + alpha_m[i] m_i / bc1) P_i in place (P = 1 and no m term when adam is false):
# the trial step, a move between trials and the final momentum step are all this one update.
LIB.define(
    "armijo_update_(Tensor(a!)[] params, Tensor[] grads, Tensor[] exp_avg, Tensor[] exp_avg_sq, float[] alpha_g, "
    "float[] alpha_m, float bias_correction1, float bias_correction2, float eps, bool adam) -> ()"
)


@torch.library.register_fake("finetune_ext::armijo_moments_")
def _armijo_moments_fake(grads, exp_avg, exp_avg_sq, block_of, num_blocks, beta1, beta2, bc2, eps, adam):
    return grads[0].new_empty(num_blocks, 2, dtype=torch.float64)


@torch.library.register_fake("finetune_ext::armijo_update_")
def _armijo_update_fake(params, grads, exp_avg, exp_avg_sq, alpha_g, alpha_m, bc1, bc2, eps, adam) -> None:
    return None
