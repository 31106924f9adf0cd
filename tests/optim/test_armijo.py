"""BlockArmijo: kernels against the reference loops, the Armijo condition on a quadratic, identical
re-evaluations, state round trip, identical decisions across gloo ranks, bad input, the training method."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finetune_ext import ops, reference
from finetune_ext.optim import BlockArmijo, blocks_from_model
from finetune_ext.testing import assert_within_2x_reference, tolerance
from finetune_ext.train import TrainConfig, train
from tests.conftest import DEVICES

SHAPES = [(70_001,), (3, 5), (64, 129), (1,), (2, 3, 4)]  # 70,001 spans two chunks


def _lists(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(fn):
        return [fn(s).to(device=device, dtype=dtype) for s in SHAPES]

    grads = make(lambda s: torch.randn(s, generator=g))
    m = make(lambda s: 0.1 * torch.randn(s, generator=g))
    v = make(lambda s: 0.01 * torch.rand(s, generator=g) + 1e-6)
    w = make(lambda s: torch.randn(s, generator=g))
    return w, grads, m, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("adam", [True, False])
def test_moments_match_reference(device, dtype, adam) -> None:
    _, grads, m, v = _lists(device, dtype)
    block_of = [0, 2, 2, 1, 0]
    kw = dict(betas=(0.9, 0.999), bias_correction2=1 - 0.999**3, eps=1e-8, adam=adam)
    m_ref, v_ref = [t.clone() for t in m], [t.clone() for t in v]
    m64, v64 = ([t.to(torch.float64, copy=True) for t in ts] for ts in (m, v))
    sums = ops.armijo_moments_(grads, m, v, block_of, 3, backend="ext", **kw)
    sums_ref = ops.armijo_moments_(grads, m_ref, v_ref, block_of, 3, backend="reference", **kw)
    exact = reference.armijo_moments_([g.double() for g in grads], m64, v64, block_of, 3, 0.9, 0.999,
                                      kw["bias_correction2"], 1e-8, adam)  # fmt: skip
    assert sums.dtype == torch.float64 and sums.shape == (3, 2) and sums.device.type == device
    if dtype == torch.float64:  # the reference is the exact sum here: the table's float64 tolerance
        torch.testing.assert_close(sums, exact, **tolerance(torch.float64))
    else:  # float32 sums of the kernel against the reference's, both against float64
        assert_within_2x_reference(sums.float(), sums_ref.float(), exact)
    for a, b, e in zip(m + v, m_ref + v_ref, m64 + v64, strict=True):
        if dtype == torch.bfloat16:  # the reference rounds twice (mul_, then add_), the kernel once
            assert_within_2x_reference(a, b, e)
        else:
            torch.testing.assert_close(a, b, **tolerance(dtype))
    if not adam:
        torch.testing.assert_close(sums[:, 0], sums[:, 1], **tolerance(torch.float64))  # P = 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("adam", [True, False])
def test_update_matches_reference_and_foreach(device, dtype, adam) -> None:
    w, grads, m, v = _lists(device, dtype)
    alpha_g = [0.1, -0.2, 0.0, 0.3, -1.0]
    alpha_m = [-0.01, 0.0, -0.02, 0.5, 0.1]
    kw = dict(bias_correction1=1 - 0.9**3, bias_correction2=1 - 0.999**3, eps=1e-8, adam=adam)
    w_ref, w_each = [t.clone() for t in w], [t.clone() for t in w]
    ops.armijo_update_(w, grads, m, v, alpha_g, alpha_m, backend="ext", **kw)
    ops.armijo_update_(w_ref, grads, m, v, alpha_g, alpha_m, backend="reference", **kw)
    reference.armijo_update_foreach_(w_each, grads, m, v, alpha_g, alpha_m, *kw.values())
    if dtype == torch.bfloat16:  # the references round every intermediate to bfloat16, the kernel only w
        w64 = [t.double() for t in _lists(device, dtype)[0]]  # the starting point again
        lists64 = [[t.double() for t in ts] for ts in (grads, m, v)]
        reference.armijo_update_(w64, *lists64, alpha_g, alpha_m, *kw.values())
        for a, b, c, e in zip(w, w_ref, w_each, w64, strict=True):
            assert_within_2x_reference(a, b, e)
            assert_within_2x_reference(a, c, e)
        return
    for a, b, c in zip(w, w_ref, w_each, strict=True):
        torch.testing.assert_close(a, b, **tolerance(dtype))
        torch.testing.assert_close(c, b, **tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_opcheck_and_bad_input(device) -> None:
    w, grads, m, v = _lists(device, torch.float32)
    args = (grads, m, v, [0] * 5, 1, 0.9, 0.999, 0.5, 1e-8, True)
    torch.library.opcheck(torch.ops.finetune_ext.armijo_moments_, args, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match=r"armijo_moments_: block_of\[1\] = 3 is outside \[0, 2\)"):
        torch.ops.finetune_ext.armijo_moments_(grads, m, v, [0, 3, 0, 0, 0], 2, 0.9, 0.999, 0.5, 1e-8, True)
    with pytest.raises(RuntimeError, match=r"armijo_update_: expected exp_avg\[1\] of shape \[3, 5\], got \[64, 129\]"):
        torch.ops.finetune_ext.armijo_update_(w, grads, [m[0], m[2], m[1], m[3], m[4]], v, [0.0] * 5, [0.0] * 5,
                                              1.0, 1.0, 1e-8, True)  # fmt: skip
    with pytest.raises(ValueError, match="block_of: expected 5 entries"):
        ops.armijo_moments_(grads, m, v, [0], 1)


def _quadratic(n=12, seed=0, coupled=True):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = Q @ Q.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    if not coupled:  # block-diagonal: the blocks do not interact
        h = n // 2
        A[:h, h:] = 0
        A[h:, :h] = 0
    w_star = torch.randn(n, generator=g, dtype=torch.float64)
    blocks = [torch.zeros(n // 2, dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def f(*ws):
        d = torch.cat(ws) - w_star
        return 0.5 * d @ A @ d

    return f, blocks, w_star


@pytest.mark.parametrize(
    ("strategy", "direction", "coupled"),
    [("cycle", "adam", True), ("all", "adam", True), ("joint", "adam", True), ("joint", "sgd", True),
     ("cycle", "sgd", False), ("all", "sgd", False)],
)  # fmt: skip
def test_quadratic_armijo_condition_and_minimiser(strategy, direction, coupled) -> None:
    f, blocks, w_star = _quadratic(coupled=coupled)
    opt = BlockArmijo([[b] for b in blocks], strategy=strategy, direction=direction, init_step_size=1.0)
    c = opt.options["c"]
    for _ in range(400):
        w0 = [b.detach().clone() for b in blocks]
        opt.step(lambda: f(*blocks))
        # Recompute each accepted trial independently: f(w0) - f(w0 - eta P g) >= c eta gᵀPg on its blocks.
        step = opt.param_groups[0]["step"]
        for acc in opt.last["accepted"]:
            trial, rhs = [x.clone() for x in w0], 0.0
            for i in acc["blocks"]:
                g = blocks[i].grad
                if direction == "adam":
                    v = opt.state[blocks[i]]["exp_avg_sq"]
                    P = 1 / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
                else:
                    P = torch.ones_like(g)
                trial[i] = w0[i] - acc["eta"] * P * g
                rhs += float((g * g * P).sum())
            decrease = float(f(*w0) - f(*trial))
            assert decrease >= c * acc["eta"] * rhs * (1 - 1e-9), (acc, decrease)
    torch.testing.assert_close(torch.cat([b.detach() for b in blocks]), w_star, atol=1e-4, rtol=0)


def test_reevaluations_see_identical_randomness() -> None:
    f, blocks, _ = _quadratic()
    draws: list[torch.Tensor] = []

    def closure():
        draws.append(torch.rand(4))  # stands for dropout masks
        return f(*blocks) * (1 + 0.01 * draws[-1].sum())

    opt = BlockArmijo([[b] for b in blocks], init_step_size=10.0)  # forces backtracking
    opt.step(closure)
    assert len(draws) > 2 and all(torch.equal(d, draws[0]) for d in draws)
    opt.step(closure)
    assert not torch.equal(draws[-1], draws[0])  # a new step draws anew


def test_state_dict_round_trip_is_exact() -> None:
    f, blocks, _ = _quadratic()
    opt = BlockArmijo([[b] for b in blocks])
    for _ in range(7):
        opt.step(lambda: f(*blocks))
    saved = opt.state_dict()
    twin_blocks = [b.detach().clone().requires_grad_(True) for b in blocks]
    twin = BlockArmijo([[b] for b in twin_blocks])
    twin.load_state_dict(saved)
    for _ in range(5):
        opt.step(lambda: f(*blocks))
        twin.step(lambda: f(*twin_blocks))
    for a, b in zip(blocks, twin_blocks, strict=True):
        assert torch.equal(a, b)
    assert opt.last["step_sizes"] == twin.last["step_sizes"]


def test_ext_and_reference_backends_agree() -> None:
    runs = []
    for backend in ("ext", "reference"):
        f, blocks, _ = _quadratic()
        opt = BlockArmijo([[b] for b in blocks], backend=backend)
        for _ in range(20):
            opt.step(lambda f=f, blocks=blocks: f(*blocks))
        runs.append(torch.cat([b.detach() for b in blocks]))
    torch.testing.assert_close(runs[0], runs[1], **tolerance(torch.float64))


def _rank_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    f, blocks, _ = _quadratic()
    noise = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))
    opt = BlockArmijo([[b] for b in blocks], init_step_size=5.0)
    decisions = []

    def closure():  # each rank sees a different mini-batch: local losses and gradients differ
        loss = f(*blocks) + (torch.cat(blocks) * noise).sum()
        if torch.is_grad_enabled():  # what DDP does in backward: average the gradients
            loss.backward()
            for b in blocks:
                dist.all_reduce(b.grad)
                b.grad /= world
        return loss.detach()

    for _ in range(15):
        opt.step(closure)
        decisions.append({"accepted": [a["eta"] for a in opt.last["accepted"]], "bt": opt.last["backtracks"]})
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(decisions, fh)
    dist.destroy_process_group()


def test_two_gloo_ranks_take_identical_decisions(tmp_path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "decisions")
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    a, b = (json.loads((tmp_path / f"decisions.{r}").read_text()) for r in (0, 1))
    assert a == b and sum(d["bt"] for d in a) > 0


def test_bad_input_leaves_parameters_unchanged() -> None:
    f, blocks, _ = _quadratic()
    for kw, msg in [
        ({"c": 1.0}, r"c: expected a value in \(0, 1\), got 1.0"),
        ({"c": 0.0}, r"c: expected a value in \(0, 1\), got 0.0"),
        ({"beta_b": 1.5}, r"beta_b: expected a value in \(0, 1\), got 1.5"),
        ({"strategy": "random"}, "strategy: expected one of"),
    ]:
        with pytest.raises(ValueError, match=msg):
            BlockArmijo([[b] for b in blocks], **kw)
    with pytest.raises(ValueError, match="blocks: expected at least one block"):
        BlockArmijo([])
    with pytest.raises(ValueError, match="blocks: block 'block1' is empty"):
        BlockArmijo([[blocks[0]], []])
    with pytest.raises(ValueError, match="appears in more than one block"):
        BlockArmijo([[blocks[0]], [blocks[0]]])
    opt = BlockArmijo([[b] for b in blocks])
    opt.step(lambda: f(*blocks))
    before = [b.detach().clone() for b in blocks]
    state = {k: v.clone() for k, v in opt.state[blocks[0]].items()}
    with pytest.raises(ValueError, match=r"closure: expected a scalar loss tensor, got \[2\]"):
        opt.step(lambda: torch.stack([f(*blocks), f(*blocks)]))
    with pytest.raises(ValueError, match="closure: the loss is nan; parameters left unchanged"):
        opt.step(lambda: f(*blocks) * float("nan"))
    assert all(torch.equal(a, b) for a, b in zip(blocks, before, strict=True))
    assert all(torch.equal(opt.state[blocks[0]][k], v) for k, v in state.items())


def test_blocks_from_model_and_method(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=16, n_positions=16, vocab_size=30))
    names = [b["name"] for b in blocks_from_model(model)]
    assert names == ["embeddings", "layers 0-0", "layers 1-1", "layers 2-2", "head"]
    assert [b["name"] for b in blocks_from_model(model, 2)] == ["embeddings", "layers 0-1", "layers 2-2", "head"]
    total = sum(p.numel() for b in blocks_from_model(model) for p in b["params"])
    assert total == sum(p.numel() for p in model.parameters())
    cfg = dict(
        model="config:gpt2-tiny", tokenizer=gpt2_tokenizer, data=str(wikitext_slice), steps=16, batch_size=4,
        block_size=32, eval_every=16, max_eval_batches=2, progress=False, method="armijo",
    )  # fmt: skip
    train(TrainConfig(**cfg, output_dir=str(tmp_path / "a"), method_options={"init_step_size": 0.01}))
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert sum(losses[-4:]) < sum(losses[:4]) and all("backtracks" in r for r in rows if r["split"] == "train")
    single = train(TrainConfig(**cfg, output_dir=str(tmp_path / "b"), method_options={"blocks": "single"}))
    assert single["steps"] == 16
    with pytest.raises(ValueError, match=r"c: expected a value in \(0, 1\)"):
        train(TrainConfig(**cfg, output_dir=str(tmp_path / "c"), method_options={"c": 2.0}))
