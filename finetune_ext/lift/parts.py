"""The stepper ``--optimizer lift``: AdamW warm-up rounds on selected blocks with per-block L2 strengths λ, each
round closed by one LP step on weights and λ jointly (methods.md §1.4).

Lower level ``f(w, λ) = L_train(w) + Σ_b λ_b ‖W_b‖² / N_b`` over each selected block's matrices (explicit in
the gradient, not decoupled decay); upper level ``F = L_val(w)``. Every ``warmup_steps`` AdamW steps on f
(SR1 pairs recorded on a fixed schedule), the round: ``g_val = ∇_w F`` on ``val_batches`` validation batches;
``rows`` constraint rows sampled among regularized coordinates; ``columns`` coordinates with the largest
``|g_val|``; the LP ``min g_valᵀ d_J`` s.t. ``|H_S[:, J] d_J + C u| <= delta``, ``|d_J|, |u| <= box``
(HiGHS); then ``d /= ‖d‖``, a golden-section search for ``t`` on F (on the same validation batches),
``w += t d_w`` and ``log λ += clamp(t · unit · u, ±lambda_step)``.

λ is moved in log space through balanced columns (``rows.log_lambda_columns``): ``C[:, b]`` is
``∂(∇_w f)/∂ log λ_b`` scaled so that its largest entry equals the largest of ``H_S[:, J]``, and one unit of
``u_b`` is ``unit[b]`` in ``log λ_b``. In the raw formulation the λ columns were ``2 w / N_b`` (about 1e-7)
beside rows of order 1, λ had no cost, and after ``d /= ‖d‖`` over thousands of weight coordinates its share of
the step was negligible: λ moved by under 3 % in every run. On a ridge regression whose validation-optimal λ
has a closed form, λ now reaches it from 100x too small and 100x too large (``tests/lift/test_parts.py``).
An LP without a usable point skips the update and logs the status.

Choices where the public material is silent (all options): λ starts at ``lambda_init`` for every block; the
warm-up uses ``--lr`` with the run's linear schedule; the SR1 pairs of a round are differences of consecutive
(weights, ∇f) records within that round (B₀ = I); exact rows (``curvature=hvp``) are of f on one training
batch of ``hvp_batch`` examples, in eval mode.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from finetune_ext import curvature
from finetune_ext.data.splits import make_batch
from finetune_ext.errors import UserError
from finetune_ext.lift.lp import LPSolver
from finetune_ext.lift.rows import (
    CompactSR1,
    FlatParams,
    hvp_rows,
    log_lambda_columns,
    step_log_lambda,
    successive_differences,
)
from finetune_ext.lift.search import golden_section
from finetune_ext.nn import keys
from finetune_ext.optim.blocks import check_layer_spec, select_layers, train_only
from finetune_ext.optim.parts import AdamW
from finetune_ext.parts import RunContext, StepContext, Stepper, option


@dataclass
class LiFTOptions:
    blocks: str = option("last:2", "trainable transformer layers, 'last:K' or indices '10,11'; the rest is frozen")
    warmup_steps: int = option(50, "AdamW steps on f per round; each round ends with one LP step")
    lambda_init: float = option(1e-2, "initial L2 strength of every selected block (> 0)")
    lambda_step: float = option(2.302585, "largest change of log λ per round (ln 10: a decade)")
    rows: int = option(256, "constraint rows k sampled among the regularized coordinates")
    columns: int = option(20000, "coordinates with the largest |validation gradient| in the LP (others: d_w = 0)")
    delta: float = option(1e-4, "half-width of the training-optimality tube |H d| <= delta")
    box: float = option(1.0, "box |d_i| <= box of the LP")
    curvature: Literal["sr1", "hvp"] = option("sr1", "H_ww rows: compact SR1 from the warm-up, or exact HVPs")
    pairs: int = option(50, "SR1 pairs recorded per round (at most 50)")
    pair_gradients: Literal["step", "mean"] = option(
        "step", "an SR1 record's (w, ∇f): one step's, or the mean over the steps since the last record"
    )
    hvp_batch: int = option(8, "training examples of the exact Hessian rows (curvature=hvp)")
    val_batches: int | None = option(None, "validation batches for F and its gradient (null: all)")
    val_batch_size: int = option(8, "examples per validation batch")
    val_skip: int = option(0, "validation examples skipped before F's batches (keep F apart from model selection)")
    line_first: float = option(0.1, "first trial step of the line search")
    line_tol: float = option(1e-4, "golden-section tolerance, relative to line_first")
    line_evals: int = option(25, "validation evaluations per line search, at most")
    lp_time_limit: float | None = option(None, "HiGHS time limit per LP in seconds (null: none)")
    lp_formulation: Literal["sifted", "direct"] = option(
        "sifted", "'sifted': a growing working set of columns, certified by reduced costs; 'direct': the whole LP"
    )
    direction: Literal["lp", "sign"] = option(
        "lp", "'lp': the LP's step on w and λ; 'sign': -sign(g_val) on the same columns, λ fixed (a control)"
    )

    def __post_init__(self) -> None:
        check_layer_spec(self.blocks, "blocks")
        for name in ("warmup_steps", "rows", "columns", "hvp_batch", "val_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if not 1 <= self.pairs <= 50:
            raise ValueError(f"pairs: expected 1..50, got {self.pairs}")
        for name in ("delta", "box", "line_first", "line_tol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        if not self.lambda_init > 0:
            raise ValueError(f"lambda_init: expected > 0 (LiFT moves log λ), got {self.lambda_init}")
        if not self.lambda_step > 0:
            raise ValueError(f"lambda_step: expected > 0, got {self.lambda_step}")
        if self.val_batches is not None and self.val_batches < 1:
            raise ValueError(f"val_batches: expected an integer >= 1 or null (all), got {self.val_batches}")
        if self.lp_time_limit is not None and not self.lp_time_limit > 0:
            raise ValueError(f"lp_time_limit: expected seconds > 0 or null (none), got {self.lp_time_limit}")
        if self.val_skip < 0:
            raise ValueError(f"val_skip: expected >= 0, got {self.val_skip}")
        if self.line_evals < 3:
            raise ValueError(f"line_evals: expected >= 3, got {self.line_evals}")


class LiFT(Stepper):
    """LiFT: AdamW warm-up on selected blocks, then an LP (HiGHS) step on weights and per-block L2 strengths."""

    name = "lift"
    Options = LiFTOptions
    unshardable_because = "its LP and line search move the flattened weights of whole blocks, a global decision"

    def freeze(self, model: nn.Module, run: RunContext) -> None:
        train_only(model, self.options.blocks, "optimizer-option (lift): blocks")

    def setup(self, model: nn.Module, run: RunContext) -> None:
        o = self.options
        if len(run.val["input_ids"]) <= o.val_skip:
            raise UserError(
                f"optimizer-option (lift): val_skip: the validation split has {len(run.val['input_ids'])} examples, "
                f"LiFT needs more than val_skip = {o.val_skip}"
            )
        layers = select_layers(model, o.blocks, "optimizer-option (lift): blocks")
        self.names = [n for params in layers.values() for n, _ in params]
        self.flat = FlatParams([[p for _, p in params] for params in layers.values()])
        candidates = int((self.flat.block >= 0).sum())
        if o.columns > self.flat.numel:
            raise UserError(
                f"optimizer-option (lift): columns: expected <= {self.flat.numel} (trainable), got {o.columns}"
            )
        if o.rows > candidates:
            raise UserError(f"optimizer-option (lift): rows: expected <= {candidates} (regularized), got {o.rows}")
        self.model, self.run = model, run
        self.lam = torch.full((len(layers),), o.lambda_init, dtype=torch.float64)
        # The warm-up is the AdamW stepper over the selected blocks; the L2 penalty is in f, not decoupled decay.
        self.adamw = AdamW()
        self.adamw.setup(model, dataclasses.replace(run, optim=dataclasses.replace(run.optim, weight_decay=0.0)))
        self.solver = LPSolver(formulation=o.lp_formulation)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []  # (w, ∇f) of this round
        self.pending: tuple[torch.Tensor, torch.Tensor, int] | None = None  # pair_gradients=mean: sums since a record
        self.history: list[dict[str, Any]] = []  # one entry per round

    # ---- the warm-up step --------------------------------------------------------------------------------
    keeps_momentum = True
    needs_validation = True

    def step(self, ctx: StepContext) -> dict[str, float]:
        o = self.options
        out: dict[str, Any] = self.adamw.backward(ctx)
        penalty = self._add_penalty_grad()
        out |= {"loss": out["loss"] + penalty, "penalty": penalty}
        self._record(ctx.step % o.warmup_steps)
        out = self.adamw.update(out)
        if (ctx.step + 1) % o.warmup_steps == 0:
            out |= self._round()
            self.records, self.pending = [], None
        return out

    def momentum(self, param: torch.Tensor) -> torch.Tensor | None:
        return self.adamw.momentum(param)

    def _record(self, offset: int) -> None:
        """Keep this step's ``(w, ∇f)`` as an SR1 record on the round's fixed schedule (``step``), or add it to the
        mean that becomes the next record (``mean``: each pair's y is then a difference of averaged gradients,
        not of two mini-batches' noise). float32 like the parameters: 2·(pairs+1)·n·4 bytes."""
        every = max(1, self.options.warmup_steps // (self.options.pairs + 1))
        w, g = self.flat.values().float(), self.flat.grads().float()
        if self.options.pair_gradients == "step":
            record = (w, g) if offset % every == 0 else None
        else:
            sw, sg, n = self.pending if self.pending is not None else (torch.zeros_like(w), torch.zeros_like(g), 0)
            self.pending = (sw.add_(w), sg.add_(g), n + 1)
            record = None
            if (offset + 1) % every == 0:
                record, self.pending = (sw / (n + 1), sg / (n + 1)), None
        if record is not None:
            self.records = [*self.records, record][-(self.options.pairs + 1) :]

    @torch.no_grad()
    def _add_penalty_grad(self) -> float:
        """Add ``∇ Σ λ_b ‖W_b‖²/N_b`` to the gradients; return the penalty's value."""
        total, offset = 0.0, 0
        for p in self.flat.params:
            b = int(self.flat.block[offset])
            offset += p.numel()
            if b < 0:
                continue
            scale = float(self.lam[b] / self.flat.sizes[b])
            total += scale * float(p.double().pow(2).sum())
            if p.grad is not None:
                p.grad.add_(p, alpha=2 * scale)
        return total

    # ---- the LP round ------------------------------------------------------------------------------------
    def _round(self) -> dict[str, Any]:
        o, r = self.options, len(self.history)
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        batches = self._val_batches()  # F and its gradient: the same batches, moved to the device once
        g_val = self._val_gradient(batches)
        J = torch.topk(g_val.abs(), o.columns).indices.sort().values
        regularized = (self.flat.block >= 0).nonzero().squeeze(1)
        pick = torch.randperm(len(regularized), generator=torch.Generator().manual_seed(keys.mix(self.run.seed, r)))
        S = regularized[pick[: o.rows]].sort().values
        w0 = self.flat.values()
        entry: dict[str, Any] = {"lift_round": r + 1}
        if o.direction == "sign":
            d = torch.cat([-g_val[J].sign(), torch.zeros(len(self.lam), dtype=torch.float64)])
            self.unit = torch.zeros(len(self.lam), dtype=torch.float64)
        else:
            d = self._lp_direction(g_val, S, J, w0, entry)
        if d is not None and float(d.norm()) > 0:
            entry |= self._move(d, J, w0, batches)
        entry |= {f"lift_lambda_{b}": float(v) for b, v in enumerate(self.lam)}
        entry["lift_round_seconds"] = time.perf_counter() - start
        self.model.train(was_training)
        self.history.append(entry)
        return entry

    def _lp_direction(
        self, g_val: torch.Tensor, S: torch.Tensor, J: torch.Tensor, w0: torch.Tensor, entry: dict[str, Any]
    ) -> torch.Tensor | None:
        """The LP's direction on ``(d_J, u)`` (``None`` without a usable point); its status into ``entry``."""
        rows = self._h_rows(S, J)
        lam_columns, self.unit = log_lambda_columns(self.flat, w0, S, self.lam, float(rows.abs().max()))
        A = torch.cat([rows, lam_columns], dim=1)
        c = torch.cat([g_val[J], torch.zeros(len(self.lam), dtype=torch.float64)])
        result = self._solve(c, A)
        entry |= {"lift_lp_status": result.status, "lift_lp_seconds": result.seconds, "lift_rows": len(S),
                  "lift_cols": len(c)}  # fmt: skip
        return torch.as_tensor(result.d) if result.usable else None

    def _val_batches(self) -> list[dict[str, torch.Tensor]]:
        """The first ``val_batches`` validation batches: where F and its gradient are evaluated."""
        o, val = self.options, self.run.val
        n = len(val["input_ids"])
        starts = list(range(o.val_skip, n, o.val_batch_size))[: o.val_batches]
        device = self.flat.params[0].device
        return [make_batch(val, torch.arange(s, min(s + o.val_batch_size, n)), self.run.task, device) for s in starts]

    def _val_gradient(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """``∇_w F`` (unregularized, eval mode) over ``batches``, averaged over ranks."""
        self.adamw.optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            (self.model(**batch).loss / len(batches)).backward()
        g = self.flat.grads()
        self.adamw.optimizer.zero_grad(set_to_none=True)
        return self.run.dist.mean(g.to(self.flat.params[0].device)).cpu()

    @torch.no_grad()
    def _val_loss(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """F: the mean validation loss over ``batches`` (the same on every rank)."""
        return sum(float(self.model(**b).loss) for b in batches) / len(batches)

    def _h_rows(self, S: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
        """Rows ``S`` of ``H_ww`` of f on the columns ``J``."""
        if self.options.curvature == "sr1":
            if len(self.records) < 2:
                return (S[:, None] == J[None, :]).double()  # no pair yet: B = I
            ws, gs = zip(*self.records, strict=True)
            return CompactSR1(successive_differences(ws), successive_differences(gs)).rows(S, J)
        n = min(self.options.hvp_batch, len(self.run.train["input_ids"]))
        batch = make_batch(self.run.train, torch.arange(n), self.run.task, self.flat.params[0].device)
        model, names = self.model, self.names

        def loss_fn(ps):
            return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), kwargs=batch).loss

        with curvature.eager_attention(model):
            rows = hvp_rows(loss_fn, tuple(p.detach() for p in self.flat.params), self.flat, S)[:, J]
        diagonal = S[:, None] == J[None, :]  # the penalty's Hessian: 2 λ_b / N_b on regularized coordinates
        b = self.flat.block[S]
        return rows + diagonal.double() * (2 * self.lam[b] / self.flat.sizes[b])[:, None]

    def _solve(self, c: torch.Tensor, A: torch.Tensor):
        """The LP on rank 0; every rank gets its direction (or none)."""
        o = self.options
        result = self.solver.solve(c, A, o.delta, o.box, o.lp_time_limit) if self.run.dist.main else None
        return self.run.dist.broadcast(result)

    def _move(self, d: torch.Tensor, J: torch.Tensor, w0: torch.Tensor, batches: list[dict]) -> dict[str, Any]:
        """Normalise ``d``, search the step on F, apply it to w and λ."""
        o = self.options
        d = d / d.norm()
        direction = torch.zeros(self.flat.numel, dtype=torch.float64)
        direction[J] = d[: len(J)]

        def F(t: float) -> float:
            self.flat.set_(w0 + t * direction)
            return self._val_loss(batches)

        search = golden_section(F, first=o.line_first, tol=o.line_tol, max_evals=o.line_evals)
        self.flat.set_(w0 + search.t * direction)
        self.lam = step_log_lambda(self.lam, search.t * d[len(J) :], self.unit, o.lambda_step)
        return {"lift_t": search.t, "lift_val_before": search.start, "lift_val_after": search.value,
                "lift_evals": search.evaluations}  # fmt: skip

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "lambda": self.lam.clone(), "records": list(self.records),
                "pending": self.pending, "history": list(self.history), "lp": self.solver.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adamw.load_state_dict(state["adamw"])
        self.lam = state["lambda"].clone()
        self.records, self.history = list(state["records"]), list(state["history"])
        self.pending = state.get("pending")
        self.solver.load_state_dict(state["lp"])
