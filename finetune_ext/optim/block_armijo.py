"""``BlockArmijo``: per-block Armijo line search on Adam-preconditioned directions (PLASLS / AdamSLS).

Faithful to the official ``AdamSLS`` (Kenneweg et al., 2023) with its quirks fixed:

* one closure evaluation with gradients, then Adam's moments (bias-corrected, eps outside the square root);
* every block's step size grows by ``gamma ** (1 / n_batches_per_epoch)`` (the SLS reset);
* the searched block (``cycle``: block ``t mod L``; ``all``: each block in turn; ``joint`` and the first
  ``joint_steps`` steps: all blocks with one shared step size) backtracks ``eta <- beta_b * eta`` until
  ``f(w0) - f(w0 - eta d) >= c * eta * gᵀPg`` with ``d = P g`` (no momentum in the trial);
* then every block takes the real step ``w = w0 - eta_l * m̂ P``.

Fixed quirks: trials see every other block at ``w0`` (the official code had already moved earlier blocks);
the joint test uses the sum of ``gᵀPg`` over all blocks (the code used the last block's); no parameter copy is
kept: backtracking moves the searched block from its last trial by the difference of step sizes, and the final
step undoes the trial in the same update (``armijo_update_``; rounding differs from ``w0 - eta d`` in the
last bits). Every hyperparameter lives in the parameter groups, so ``state_dict`` saves them.

The closure must draw the same randomness at every evaluation (evaluate under
``finetune_ext.nn.keys.keyed(seed, step)``, as the trainer's ``StepContext`` does) and, under DDP, return the
loss averaged over the ranks (``finetune_ext.parts.distributed.mean_across_ranks``), so all ranks decide alike.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from finetune_ext import ops

DIRECTIONS, STRATEGIES, RESETS = ("adam", "sgd"), ("cycle", "all", "joint"), ("sls", "keep", "init")
FALLBACK_STEP = 1e-6  # SLS: the step size when no trial passes within max_backtracks


class BlockArmijo(torch.optim.Optimizer):
    """Per-block Armijo line search optimizer; ``step(closure)`` with ``closure() -> loss``.

    Args:
        blocks: parameter blocks: an iterable of parameter lists, or of dicts with ``"params"`` (and an
            optional ``"name"``), e.g. from ``blocks_from_model``.
        direction: ``"adam"`` (preconditioned by Adam's second moment, momentum in the real step) or ``"sgd"``.
        c: Armijo constant in (0, 1). beta_b: backtracking factor in (0, 1). gamma: SLS reset factor >= 1.
        reset: ``"sls"`` (grow by ``gamma ** (1 / n_batches_per_epoch)``), ``"keep"`` or ``"init"``.
        strategy: ``"cycle"`` (one block per step, in turn), ``"all"`` (each block every step) or ``"joint"``.
        max_backtracks: trials per search before falling back to a step size of 1e-6.
        init_step_size: every block's first step size. joint_steps: steps searched jointly at the start (6).
        betas, eps: Adam's. backend: kernels (``"ext"``), ``"reference"`` loops, or ``"auto"``.

    The closure returns the mini-batch loss as a tensor, the same masks at every call (see the module
    docstring). ``step`` zeroes the gradients first; if the loss requires grad it calls ``backward``, and a
    closure that ran ``backward`` itself (gradient accumulation) returns a detached loss instead, and calls
    ``backward`` only when ``torch.is_grad_enabled()``: trials call the closure under ``torch.no_grad``. A
    torch.optim-style closure (``backward`` always, the loss returned attached) is refused with an error that
    says so, before any parameter moves.
    """

    def __init__(
        self,
        blocks: Iterable,
        direction: str = "adam",
        c: float = 0.5,
        beta_b: float = 0.9,
        gamma: float = 2.0,
        reset: str = "sls",
        strategy: str = "cycle",
        max_backtracks: int = 100,
        init_step_size: float = 0.1,
        n_batches_per_epoch: int = 500,
        joint_steps: int = 6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        backend: str = "auto",
    ) -> None:
        _check_choice("direction", direction, DIRECTIONS)
        _check_choice("strategy", strategy, STRATEGIES)
        _check_choice("reset", reset, RESETS)
        for name, value in (("c", c), ("beta_b", beta_b)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name}: expected a value in (0, 1), got {value}")
        if not gamma >= 1.0:
            raise ValueError(f"gamma: expected a value >= 1, got {gamma}")
        if max_backtracks < 1 or n_batches_per_epoch < 1 or joint_steps < 0:
            raise ValueError(
                "max_backtracks, n_batches_per_epoch: expected >= 1, joint_steps >= 0; got "
                f"{max_backtracks}, {n_batches_per_epoch}, {joint_steps}"
            )
        if not init_step_size > 0:
            raise ValueError(f"init_step_size: expected > 0, got {init_step_size}")
        groups = [_as_group(b, i) for i, b in enumerate(blocks)]
        if not groups:
            raise ValueError("blocks: expected at least one block of parameters, got none")
        _check_params(groups)
        # "step": the global step count, kept in every block; the search options are the same in every block.
        defaults = dict(
            step_size=init_step_size, step=0, direction=direction, c=c, beta_b=beta_b, gamma=gamma, reset=reset,
            strategy=strategy, max_backtracks=max_backtracks, init_step_size=init_step_size,
            n_batches_per_epoch=n_batches_per_epoch, joint_steps=joint_steps, betas=tuple(betas), eps=eps,
            backend=backend,
        )  # fmt: skip
        super().__init__(groups, defaults)
        self.last: dict[str, Any] = {}

    # ---- closure evaluation -------------------------------------------------------------------------
    def _evaluate(self, closure: Callable, grad: bool) -> float:
        if grad:
            self.zero_grad(set_to_none=True)
        with torch.enable_grad() if grad else torch.no_grad():
            loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"closure: expected a scalar loss tensor, got {shape}")
        if grad and loss.requires_grad:
            if any(p.grad is not None for g in self.param_groups for p in g["params"]):
                self.zero_grad(set_to_none=True)
                raise ValueError(
                    "closure: it called backward and returned a loss that requires grad (torch.optim's closure "
                    "convention); BlockArmijo calls backward itself and evaluates trial steps under torch.no_grad: "
                    "return the loss without calling backward, or call backward only when torch.is_grad_enabled() "
                    "and return loss.detach()"
                )
            loss.backward()
        return float(loss.detach())

    # ---- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> float:  # type: ignore[override]
        """One line-search step; returns the loss at the starting point. Parameters are unchanged if the
        closure's first evaluation fails (non-scalar or non-finite loss)."""
        if closure is None:
            raise ValueError("closure: BlockArmijo needs a closure that returns the mini-batch loss")
        o = self.param_groups[0]
        loss0 = self._evaluate(closure, grad=True)
        if not math.isfinite(loss0):
            raise ValueError(f"closure: the loss is {loss0}; parameters left unchanged")
        t = self.param_groups[0]["step"]
        adam = o["direction"] == "adam"
        b1, b2 = o["betas"]
        bc1, bc2 = (1 - b1 ** (t + 1), 1 - b2 ** (t + 1)) if adam else (1.0, 1.0)
        tensors = self._tensors(adam)
        params, grads, m, v, block_of = tensors
        if not params:
            raise ValueError("closure: no parameter of any block received a gradient")
        kw = dict(bias_correction2=bc2, eps=o["eps"], adam=adam, backend=o["backend"])
        sums = ops.armijo_moments_(grads, m, v, block_of, len(self.param_groups), betas=(b1, b2), **kw)
        pp, norms = zip(*sums.tolist(), strict=True)  # the one host sync before the search
        for g in self.param_groups:
            if o["reset"] == "sls":
                g["step_size"] *= o["gamma"] ** (1.0 / o["n_batches_per_epoch"])
            elif o["reset"] == "init":
                g["step_size"] = o["init_step_size"]
        moved = [0.0] * len(self.param_groups)  # current trial offset per block: w = w0 - moved * P g
        update = dict(bias_correction1=bc1, **kw)

        def move(blocks: list[int], eta: float) -> None:
            idx = [i for i, b in enumerate(block_of) if b in blocks]
            alphas = [moved[block_of[i]] - eta for i in idx]
            ops.armijo_update_(*_pick(tensors[:4], idx), alphas, [0.0] * len(idx), **update)
            for b in blocks:
                moved[b] = eta

        def search(blocks: list[int], eta: float) -> tuple[float, int]:
            rhs = sum(pp[b] for b in blocks)
            for k in range(o["max_backtracks"]):
                move(blocks, eta)
                trial = self._evaluate(closure, grad=False)
                if math.isfinite(trial) and loss0 - trial >= o["c"] * eta * rhs:
                    accepted.append({"blocks": blocks, "eta": eta, "loss": trial, "rhs": rhs})
                    return eta, k
                eta *= o["beta_b"]
            return FALLBACK_STEP, o["max_backtracks"]

        searched, accepted, backtracks = [], [], 0
        if sum(norms) >= 1e-16:  # SLS skips the search when the gradient vanishes
            n_blocks = len(self.param_groups)
            if o["strategy"] == "joint" or t < o["joint_steps"]:
                plan = [list(range(n_blocks))]
            elif o["strategy"] == "cycle":
                plan = [[t % n_blocks]]
            else:
                plan = [[b] for b in range(n_blocks)]
            live = set(block_of)  # a block without gradients this step is not searched (its size is kept)
            for blocks in [[b for b in blocks if b in live] for blocks in plan]:
                if not blocks:
                    continue
                eta, k = search(blocks, self.param_groups[blocks[0]]["step_size"])
                for b in blocks:
                    self.param_groups[b]["step_size"] = eta
                searched.append(blocks)
                backtracks += k
                if o["strategy"] == "all":  # the next block's trials start from w0 of this one
                    move(blocks, 0.0)
        # The real step from w0 (undoing any trial): Adam w0 - eta m̂ P; SGD w0 - eta g.
        etas = [self.param_groups[b]["step_size"] for b in block_of]
        if adam:
            ops.armijo_update_(params, grads, m, v, [moved[b] for b in block_of], [-e for e in etas], **update)
        else:
            ops.armijo_update_(params, grads, m, v, [moved[b] - e for b, e in zip(block_of, etas, strict=True)],
                               [0.0] * len(params), **update)  # fmt: skip
        for g in self.param_groups:
            g["step"] = t + 1
        self.last = {"loss": loss0, "searched": searched, "accepted": accepted, "backtracks": backtracks,
                     "step_sizes": [g["step_size"] for g in self.param_groups]}  # fmt: skip
        return loss0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Copied: the kernels update the moments in place, and a state dict taken from a live optimizer would
        # otherwise share its tensors with it.
        super().load_state_dict(copy.deepcopy(state_dict))

    def _tensors(self, adam: bool):
        params, grads, m, v, block_of = [], [], [], [], []
        for b, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if adam and not st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                params.append(p)
                grads.append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
                if adam:
                    m.append(st["exp_avg"])
                    v.append(st["exp_avg_sq"])
                block_of.append(b)
        return params, grads, m, v, block_of


def _pick(lists, idx: list[int]):
    return [[lst[i] for i in idx] if lst else [] for lst in lists]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def _check_params(groups: list[dict[str, Any]]) -> None:
    """Each parameter in one block only; all contiguous, of one dtype and on one device (the kernels update
    them in place, one list per launch)."""
    seen: set[int] = set()
    first = groups[0]["params"][0]
    for g in groups:
        for i, p in enumerate(g["params"]):
            where = f"parameter {i} of block {g['name']!r}"
            if id(p) in seen:
                raise ValueError(f"blocks: {where} appears in more than one block")
            seen.add(id(p))
            if not p.is_contiguous():
                layout = f"shape {list(p.shape)}, strides {p.stride()}"
                raise ValueError(f"blocks: {where} is not contiguous ({layout}); BlockArmijo updates parameters in "
                                 "place: make the module's weight contiguous")  # fmt: skip
            if (p.dtype, p.device) != (first.dtype, first.device):
                expected = f"{first.dtype} on {first.device}"
                raise ValueError(
                    f"blocks: expected every parameter in {expected}, got {where} in {p.dtype} on {p.device}"
                )


def _as_group(block, i: int) -> dict[str, Any]:
    if isinstance(block, dict):
        params, name = list(block["params"]), block.get("name", f"block{i}")
    elif isinstance(block, torch.Tensor):
        raise ValueError("blocks: expected an iterable of blocks (lists of parameters), got a single tensor")
    else:
        params, name = list(block), f"block{i}"
    if not params:
        raise ValueError(f"blocks: block {name!r} is empty")
    if not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
        raise ValueError(f"blocks: block {name!r} must hold tensors that require grad")
    return {"params": params, "name": name}
