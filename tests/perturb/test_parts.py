"""The perturbation transforms: where their noise comes from, what they never touch, their sign, their errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from finetune_ext import ops
from finetune_ext.adapters import LinChainConfig, apply_linchain
from finetune_ext.errors import UserError
from finetune_ext.optim.parts import AdamW
from finetune_ext.parts import OptimSettings, RunContext
from finetune_ext.perturb import GGPO, MGPO, FlatLoRA
from finetune_ext.perturb.parts import FlatLoRAOptions, GGPOOptions, MGPOOptions
from finetune_ext.testing import tolerance
from finetune_ext.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]


def _run_context(total_steps: int = 100) -> RunContext:
    optim = OptimSettings(lr=1e-2, weight_decay=0.0, warmup_steps=0, max_grad_norm=0.0)
    return RunContext("classification", None, {}, {}, lambda m: {}, 0, total_steps, optim, "")


def _adapted(dtype: torch.dtype = torch.float32, chain: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).to(dtype)
    layers = apply_linchain(model, LinChainConfig(r=4, alpha=8.0, dropout=0.0, chain_length=chain))
    for layer in layers.values():
        nn.init.normal_(layer.lora_B, std=0.1)
    return model, layers


def _digest(model: nn.Module) -> str:
    frozen = [p for n, p in model.named_parameters() if "base_layer" in n]
    return hashlib.sha256(b"".join(p.detach().float().numpy().tobytes() for p in frozen)).hexdigest()


def _train(model: nn.Module, transform, steps: int) -> AdamW:
    stepper = AdamW()
    stepper.setup(model, _run_context())
    transform.apply(model, _run_context())
    x = torch.randn(32, 16, dtype=next(model.parameters()).dtype)
    for step in range(steps):
        transform.before_step(step, stepper)
        stepper.optimizer.zero_grad()
        model(x).float().square().mean().backward()
        stepper.optimizer.step()
        transform.after_step(step, stepper)
    return stepper


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", [FlatLoRA, GGPO, MGPO])
def test_base_weight_is_bit_identical_after_100_steps(dtype, transform) -> None:
    model, _ = _adapted(dtype)
    before = _digest(model)
    options = {"ramp": "constant"} if transform is not MGPO else {}
    _train(model, transform(transform.Options(**options)), 100)
    assert _digest(model) == before


def test_noise_is_on_in_training_and_off_in_eval() -> None:
    model, _ = _adapted()
    t = FlatLoRA(FlatLoRAOptions(rho=0.5, ramp="constant"))
    t.apply(model, _run_context())
    x = torch.randn(4, 16)
    clean = model(x)
    t.before_step(3, None)
    noisy = model(x)
    assert not torch.equal(noisy, clean) and torch.equal(model(x), noisy)  # one draw for the whole step
    model.eval()
    assert torch.equal(model(x), clean)
    model.train()
    t.after_step(3, None)
    assert torch.equal(model(x), clean)


@pytest.mark.parametrize("chain", [0, 2])
def test_flat_lora_std_and_key(chain) -> None:
    model, layers = _adapted(chain=chain)
    t = FlatLoRA(FlatLoRAOptions(rho=0.1, refresh=2))
    t.apply(model, _run_context(total_steps=10))
    t.before_step(5, None)  # f(5/10) = 1/2
    layer = layers["0"]
    merged = layer.base_weight().double() + layer.delta()[0]  # W + s B M A
    expected = 0.5 * 0.1 / 4.0 * torch.linalg.vector_norm(merged, dim=1)
    torch.testing.assert_close(layer.perturbation.noise[0].double(), expected, **tolerance(torch.float32))
    seed_5 = layer.perturbation.noise[1]
    t.before_step(4, None)
    assert layer.perturbation.noise[1] == seed_5  # steps 4 and 5 share a draw with refresh=2
    t.before_step(6, None)
    assert layer.perturbation.noise[1] != seed_5 and layers["2"].perturbation.noise[1] != layer.perturbation.noise[1]


def test_state_carries_a_draw_between_refreshes() -> None:
    """Resumed mid-period (refresh=3), a fresh transform uses the saved stds and gradient norms, not new ones."""
    model, layers = _adapted(chain=2)
    saved = GGPO(GGPOOptions(refresh=3))
    _train(model, saved, 2)  # step 0 drew; steps 1 and 2 reuse it
    saved.before_step(2, None)
    expected = {name: layer.perturbation.noise for name, layer in layers.items()}
    state = saved.state_dict()
    for layer in layers.values():
        nn.init.normal_(layer.lora_B, std=1.0)  # the weights moved on: a new draw would differ
    resumed = GGPO(GGPOOptions(refresh=3))
    resumed.apply(model, _run_context())
    resumed.load_state_dict(state)
    resumed.before_step(2, None)
    for name, layer in layers.items():
        std, seed = layer.perturbation.noise
        assert torch.equal(std, expected[name][0]) and seed == expected[name][1]
    assert state["grad_norms"].keys() == layers.keys()
    for name, row in resumed.state_dict()["grad_norms"].items():
        assert torch.equal(row, state["grad_norms"][name])
    resumed.before_step(3, None)  # the next period draws from the current weights
    assert not torch.equal(layers["0"].perturbation.noise[0], expected["0"][0])


def test_state_loaded_in_inference_mode_still_trains() -> None:
    """The stds' buffer made by a load under ``torch.inference_mode`` can still be saved by a training forward."""
    model, layers = _adapted()
    saved = GGPO(GGPOOptions())
    _train(model, saved, 1)
    resumed = GGPO(GGPOOptions())
    resumed.apply(model, _run_context())
    with torch.inference_mode():
        resumed.load_state_dict(saved.state_dict())
    resumed.before_step(1, None)
    model(torch.randn(4, 16)).square().mean().backward()
    assert layers["0"].lora_A.grad is not None


def test_ggpo_default_keeps_flat_lora_mean_and_follows_the_gradient() -> None:
    model, layers = _adapted()
    _train(model, GGPO(GGPOOptions(ramp="constant")), 2)  # leaves grad norms of the last backward
    flat, ggpo = FlatLoRA(FlatLoRAOptions(ramp="constant")), GGPO(GGPOOptions(ramp="constant", beta=1.0))
    for t in (flat, ggpo):
        t.apply(model, _run_context())
    _train(model, ggpo, 1)
    flat.before_step(0, None)
    std_flat = flat.hooks["0"].noise[0].double()  # each transform has its own hooks; the last applied is attached
    ggpo.before_step(0, None)
    std_ggpo = layers["0"].perturbation.noise[0].double()
    torch.testing.assert_close(std_ggpo.mean(), std_flat.mean(), **tolerance(torch.float32))
    g = ggpo.state_dict()["grad_norms"]["0"]
    assert torch.corrcoef(torch.stack([std_ggpo - std_flat, g - g.mean()]))[0, 1] > 0.5


def test_ggpo_kohya_formula() -> None:
    model, layers = _adapted()
    t = GGPO(GGPOOptions(formula="kohya", rho=0.03, beta=0.01, ramp="constant"))
    _train(model, t, 1)
    t.before_step(1, None)
    layer = layers["0"]
    W, A, B = layer.base_weight().double(), layer.lora_A.double(), layer.lora_B.double()
    G = layer.scale * (layer.lora_B.grad.double() @ A + B @ layer.lora_A.grad.double())
    wn = (torch.linalg.vector_norm(W, dim=1).mean() ** 2 + torch.linalg.vector_norm(B @ A, dim=1) ** 2).sqrt()
    expected = (0.03 * wn + 0.01 * torch.linalg.vector_norm(G, dim=1) ** 2) / W.shape[0] ** 0.5
    torch.testing.assert_close(layer.perturbation.noise[0].double(), expected, **tolerance(torch.float32))


@pytest.mark.parametrize("chain", [0, 2])
def test_mgpo_shifts_against_the_momentum(chain) -> None:
    """eps = -rho v/||v|| min(1/gbar, 10): opposite to v = s(m_B A' + B M m_A), the released code's sign."""
    model, layers = _adapted(torch.float64, chain)
    t = MGPO(MGPOOptions(rho=0.05, beta=0.9))
    stepper = _train(model, t, 3)
    t.before_step(3, stepper)
    layer = layers["0"]
    P, Q = layer.perturbation.shift
    eps = P @ Q
    A = layer.factors()[0].detach()  # A' = M A
    M = ops.linchain_compose(layer.mixer_weight.detach()[None])[0][0] if chain else None
    m_A, m_B = (stepper.optimizer.state[p]["exp_avg"] for p in (layer.lora_A, layer.lora_B))
    v = layer.scale * (m_B @ A + layer.lora_B.detach() @ (M @ m_A if M is not None else m_A))
    cos = (eps * v).sum() / (eps.norm() * v.norm())
    assert cos == pytest.approx(-1.0, abs=1e-9)
    expected = 0.05 * min(1.0 / float(t.state_dict()["ema"]["0"]), 10.0)
    assert float(eps.norm()) == pytest.approx(expected, rel=1e-9)
    x = torch.randn(5, 16, dtype=torch.float64)
    A_eff, c = layer.factors()
    bias = layer.base_layer.bias + (layer.scale * layer.lora_B @ c if c is not None else 0.0)
    dense = x @ (layer.base_weight() + eps + layer.scale * layer.lora_B @ A_eff).t() + bias
    torch.testing.assert_close(layer(x), dense, **tolerance(torch.float64))


def test_mgpo_vanishing_momentum_shifts_by_zero() -> None:
    model, layers = _adapted(torch.float64)
    t = MGPO(MGPOOptions(rho=0.05))
    stepper = _train(model, t, 2)
    for layer in layers.values():
        for p in (layer.lora_A, layer.lora_B):
            stepper.optimizer.state[p]["exp_avg"].zero_()
    t.before_step(2, stepper)
    for layer in layers.values():
        P, _ = layer.perturbation.shift
        assert not P.any()
        x = torch.randn(5, layer.base_weight().shape[1], dtype=torch.float64)
        shifted = layer(x)
        layer.perturbation.shift = None
        assert torch.equal(layer(x), shifted)


def test_mgpo_first_step_has_no_shift() -> None:
    model, layers = _adapted()
    t = MGPO()
    stepper = AdamW()
    stepper.setup(model, _run_context())
    t.apply(model, _run_context())
    t.before_step(0, stepper)
    assert all(layer.perturbation.shift is None for layer in layers.values())


def _config(tmp_path: Path, data, tokenizer, **extra) -> TrainConfig:
    base = dict(model="config:gpt2-tiny", tokenizer=tokenizer, data=str(data), output_dir=str(tmp_path / "run"),
                steps=2, batch_size=4, block_size=32, eval_every=2, max_eval_batches=1, progress=False)  # fmt: skip
    return TrainConfig(**{**base, **extra})


@pytest.mark.parametrize(
    "extra, match",
    [
        (dict(perturbation="ggpo"), "perturbation: ggpo does not run with --adapter none; add --adapter lora or"),
        (dict(adapter="lora", perturbation="ggpo", perturbation_options={"rho": "-1"}), "rho: expected a number >= 0"),
        (dict(adapter="lora", perturbation="ggpo", perturbation_options={"beta": "-0.5"}), "beta: expected"),
        (dict(adapter="lora", perturbation="mgpo", perturbation_options={"beta": "1"}), r"beta: expected a value in"),
        (dict(adapter="lora", perturbation="ggpo", perturbation_options={"formula": "paper"}), "formula"),
        (dict(adapter="lora", perturbation="flat-lora", perturbation_options={"refresh": "0"}), "refresh"),
        (dict(adapter="lora", perturbation="flat-lora", perturbation_options={"beta": "1"}), "beta"),
        (dict(adapter="lora", perturbation="sam"), "perturbation: unknown 'sam'"),
    ],
)
def test_bad_input_is_a_user_error(extra, match, tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    with pytest.raises(UserError, match=match):
        train(_config(tmp_path, wikitext_slice, gpt2_tokenizer, **extra))


def test_cli_error_is_one_line(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    args = ["train", "--model", "config:gpt2-tiny", "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
            "--perturbation", "ggpo", "--output-dir", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "finetune_ext.cli", *args], env=env, capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].endswith("add --adapter lora or linchain")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "run").exists()  # refused before any folder or data is touched


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / (run / "latest").read_text().strip() / "model.safetensors"))


def test_one_draw_serves_every_micro_batch(tmp_path, wikitext_slice, gpt2_tokenizer, gpt2_no_dropout) -> None:
    """Accumulating 4 micro-batches equals one big batch only if all four saw the same noise."""
    base = dict(model=gpt2_no_dropout, adapter="lora", adapter_options={"r": 2, "dropout": 0.0}, lr=1e-2,
                perturbation="ggpo", perturbation_options={"rho": 0.5, "ramp": "constant"}, batch_size=8,
                steps=3)  # fmt: skip
    train(_config(tmp_path / "a", wikitext_slice, gpt2_tokenizer, **base, grad_accum=1))
    train(_config(tmp_path / "b", wikitext_slice, gpt2_tokenizer, **base, grad_accum=4))
    a, b = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    for key in a:
        torch.testing.assert_close(b[key], a[key], **tolerance(torch.float32), msg=key)


def test_two_gloo_ranks_draw_the_same_noise(tmp_path, wikitext_slice, gpt2_tokenizer, gpt2_no_dropout) -> None:
    args = [
        "train", "--model", gpt2_no_dropout, "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
        "--adapter", "lora", "--adapter-option", "r=2", "--adapter-option", "dropout=0", "--perturbation", "ggpo",
        "--perturbation-option", "rho=0.5", "--perturbation-option", "ramp=constant", "--steps", "3",
        "--batch-size", "8", "--lr", "1e-2", "--block-size", "32", "--eval-every", "3", "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = {"one": [sys.executable], "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node", "2"]}  # fmt: skip
    for name, prefix in launch.items():
        res = subprocess.run([*prefix, "-m", "finetune_ext.cli", *args, "--output-dir", str(tmp_path / name)],
                             env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
        assert res.returncode == 0, res.stderr[-6000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(b[key], a[key], **tolerance(torch.float32), msg=key)
