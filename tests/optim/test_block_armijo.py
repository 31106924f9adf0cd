"""BlockArmijo: the Armijo condition on a quadratic, identical re-evaluations under a key, state round trip,
identical decisions across gloo ranks, bad input, the training stepper."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finetune_ext.nn import keys
from finetune_ext.optim import BlockArmijo, blocks_from_model
from finetune_ext.parts.distributed import mean_across_ranks
from finetune_ext.testing import tolerance
from finetune_ext.train import TrainConfig, train


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
    c = opt.param_groups[0]["c"]
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
    torch.testing.assert_close(torch.cat([b.detach() for b in blocks]), w_star, **tolerance("quadratic_minimiser"))


def test_reevaluations_under_a_key_see_identical_randomness() -> None:
    f, blocks, _ = _quadratic()
    draws: list[torch.Tensor] = []

    def closure():
        with keys.keyed(0, opt.param_groups[0]["step"]):  # (seed, step), as the trainer keys each evaluation
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
    twin = BlockArmijo([[b] for b in twin_blocks], c=0.3, strategy="all")  # the state brings its hyperparameters
    twin.load_state_dict(saved)
    assert (twin.param_groups[0]["c"], twin.param_groups[1]["strategy"]) == (0.5, "cycle")
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
        return torch.tensor(mean_across_ranks(loss))  # all ranks test the same loss

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

    def torch_style():  # torch.optim's convention: backward inside, the loss returned attached
        loss = f(*blocks)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="closure: it called backward and returned a loss that requires grad"):
        opt.step(torch_style)
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
