"""Guided dropout: Fisher against a float64 loop, sites, schedule, rates in effect, cache, methods."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from finetune_ext import guided
from finetune_ext.data.splits import load_splits
from finetune_ext.errors import RunWarning
from finetune_ext.guided import sites as site_mod
from finetune_ext.guided.parts import fisher_samples
from finetune_ext.nn import FisherDropout, GaussianDropout
from finetune_ext.testing import tolerance
from finetune_ext.train import TrainConfig, train
from finetune_ext.train.models import load_tokenizer

# Fisher entries are ~1e-8: the table's float32 atol (1e-6) would accept anything, so the absolute part is
# scaled by each tensor's largest entry (squared gradients near 0 are float32 denormals).


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, **tolerance(torch.float32, scale), msg=msg or None)


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=8, n_positions=16, vocab_size=17))


def test_fisher_equals_float64_loop_over_per_sample_gradients() -> None:
    """Samples of different lengths (batched by length, two at a time) against one backward per sample."""
    model = _tiny_gpt2().double()
    g = torch.Generator().manual_seed(1)
    samples = [(x, x) for n in (7, 5, 7, 3, 5, 7) for x in torch.randint(0, 17, (1, n), generator=g)]
    fisher = guided.empirical_fisher(model, samples, causal=True, chunk_size=2, progress=False)
    loop = guided.empirical_fisher(model, samples, causal=True, chunk_size=2, progress=False, use_vmap=False)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for x, _ in samples:
        model.zero_grad()
        logits = model(input_ids=x[None]).logits[0]
        F.cross_entropy(logits[:-1], x[1:]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.pow(2) / len(samples)
    for name, value in expected.items():
        _close(fisher[name].double(), value)
        _close(loop[name].double(), value)


def test_samples_without_a_target_are_skipped_and_the_fisher_is_finite() -> None:
    """An MLM sample whose masking picked no token (all labels -100, common for short sentences) has a 0/0 loss:
    it carries no information and is left out of the mean, so the estimate equals the one without it."""

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=23, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=16, max_position_embeddings=16))  # fmt: skip
    g = torch.Generator().manual_seed(2)
    with_targets = []
    for n in (5, 3, 5):
        ids = torch.randint(0, 23, (n,), generator=g)
        labels = torch.full((n,), -100)
        labels[1] = ids[1]
        with_targets.append((ids, labels))
    without = [(torch.randint(0, 23, (n,), generator=g), torch.full((n,), -100)) for n in (5, 2)]
    mixed = guided.empirical_fisher(model, with_targets + without, causal=False, chunk_size=2, progress=False)
    clean = guided.empirical_fisher(model, with_targets, causal=False, chunk_size=2, progress=False)
    assert all(torch.isfinite(f).all() for f in mixed.values())
    for name, value in clean.items():
        _close(mixed[name], value, name)
    one_token = [(torch.tensor([3]), torch.tensor([3]))]  # a causal LM predicts nothing from one token
    with pytest.raises(ValueError, match="samples: expected at least one sample with a token to predict"):
        guided.empirical_fisher(_tiny_gpt2(), one_token, causal=True, progress=False)
    with pytest.raises(ValueError, match="samples: expected at least one sample with a token to predict"):
        guided.empirical_fisher(model, without, causal=False, progress=False)


def test_masked_lm_fisher_samples_are_the_examples_tokens(sst2_slice, bert_tokenizer) -> None:
    """Training examples stored padded: each Fisher sample is its example's tokens (MLM-masked, special tokens
    not targets), and its Fisher is that of the padded example under its attention mask (the official
    script's padded batches), which a mask-free model call on the padded example would not give."""
    tok = load_tokenizer(bert_tokenizer)
    splits = load_splits(str(sst2_slice), tok, block_size=8, max_length=40, train_samples=None, val_size=8, seed=0)
    run = SimpleNamespace(train=splits.train, tokenizer=tok)
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        vocab_size=len(tok), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = BertForMaskedLM(config).double()
    samples = fisher_samples(run, False, 4, 0, len(tok))
    padded = []
    width = splits.train["input_ids"].shape[1]
    for x, labels in samples:
        assert len(x) < width and x.ne(tok.pad_token_id).all()
        assert (x[0], x[-1]) == (tok.cls_token_id, tok.sep_token_id) and labels[0] == labels[-1] == -100
        ids = torch.full((width,), tok.pad_token_id)
        ids[: len(x)] = x
        padded.append((ids, F.pad(labels, (0, width - len(x)), value=-100), (ids != tok.pad_token_id).long()))
    fisher = guided.empirical_fisher(model, samples, causal=False, chunk_size=2, progress=False)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    unmasked = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for ids, labels, mask in padded:
        for sums, kwargs in ((expected, {"attention_mask": mask[None]}), (unmasked, {})):
            model.zero_grad()
            F.cross_entropy(model(input_ids=ids[None], **kwargs).logits[0], labels).backward()
            for n, p in model.named_parameters():
                sums[n] += p.grad.pow(2) / len(padded)
    # The key bias cannot change a softmax over keys: its gradient is rounding noise (~1e-30), left out.
    expected = {n: e for n, e in expected.items() if not n.endswith("key.bias")}
    for name, value in expected.items():
        _close(fisher[name].double(), value, msg=name)
    gap = max(float((unmasked[n] - e).abs().max() / e.abs().max()) for n, e in expected.items())
    assert gap > 0.05  # attending the padding changes the estimate


def test_official_schedule_on_a_bert_base_layout() -> None:
    model = BertForSequenceClassification(
        BertConfig(num_hidden_layers=12, hidden_size=8, num_attention_heads=2, intermediate_size=8, vocab_size=30)
    )
    sites = guided.find_sites(model)
    assert len(sites) == 37 and [s.kind for s in sites[:4]] == ["embeddings", "attn_probs", "attn_output", "ffn_output"]
    scores = torch.randperm(37).double()
    p = guided.rates_by_rank(scores, site_mod.P_MAX_OFFICIAL)
    rank = torch.argsort(torch.argsort(scores))
    torch.testing.assert_close(p, 0.099 - 0.00275 * rank.double())
    assert p[scores.argmin()] == pytest.approx(0.099) and p[scores.argmax()] == 0.0


def test_site_scores_are_means_of_tensor_means() -> None:
    model = _tiny_gpt2()
    sites = guided.find_sites(model)
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    scores = guided.site_scores(sites, fisher)
    ffn = next(i for i, s in enumerate(sites) if s.name == "transformer.h.1.mlp.dropout")
    expected = (
        fisher["transformer.h.1.mlp.c_proj.weight"].mean() + fisher["transformer.h.1.mlp.c_proj.bias"].mean()
    ) / 2
    assert scores[ffn].item() == pytest.approx(expected.item())


def test_rates_take_effect_at_every_site() -> None:
    model = _tiny_gpt2()
    sites = guided.find_sites(model)
    rates = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    guided.apply_rates(model, sites, rates)
    for site, p in zip(sites, rates, strict=True):
        module = model.get_submodule(site.name)
        if site.kind == "attn_probs":
            assert isinstance(module, torch.nn.Dropout) and module.p == p  # read by eager and SDPA at each call
        else:
            assert isinstance(module, FisherDropout) and module.p.item() == pytest.approx(p)
    # Measured drop rate of each replaced site, within 4 sigma.
    drops = {}
    hooks = [
        model.get_submodule(s.name).register_forward_hook(
            lambda m, i, o, n=s.name: drops.__setitem__(n, (o == 0).float().mean().item())
        )
        for s in sites
        if s.kind != "attn_probs"
    ]
    model.train()
    model(input_ids=torch.randint(0, 17, (64, 16)))
    for h in hooks:
        h.remove()
    for site, p in zip(sites, rates, strict=True):
        if site.name in drops:
            n = 64 * 16 * 8
            assert abs(drops[site.name] - p) <= 4 * (p * (1 - p) / n) ** 0.5, site.name


def _tiny_decoder(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  hidden_size=32, intermediate_size=64, vocab_size=17)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_decoder_families_get_inserted_sites_that_drop_at_their_rates(family: str) -> None:
    model = _tiny_decoder(family)
    names = [n for n, _ in model.named_parameters()]
    sites = guided.find_sites(model)
    assert [s.kind for s in sites] == ["embeddings"] + ["attn_probs", "attn_output", "ffn_output"] * 2
    rates = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    guided.apply_rates(model, sites, rates)
    assert [n for n, _ in model.named_parameters()] == names  # released names: checkpoints and adapters still fit
    drops = {}
    for site, p in zip(sites, rates, strict=True):
        if site.kind == "attn_probs":
            assert model.get_submodule(site.name).attention_dropout == p  # read by eager and SDPA at each call
            continue
        module = model.get_submodule(site.name)
        assert isinstance(module, FisherDropout) and module.p.item() == pytest.approx(p)
        module.register_forward_hook(lambda m, i, o, n=site.name: drops.__setitem__(n, (o == 0).float().mean().item()))
    ids = torch.randint(0, 17, (64, 16))
    model.eval()
    clean = model(input_ids=ids).logits
    model.train()
    assert not torch.allclose(model(input_ids=ids).logits, clean)
    assert len(drops) == 5
    for site, p in zip(sites, rates, strict=True):
        if site.name in drops:
            n = 64 * 16 * 32
            assert abs(drops[site.name] - p) <= 4 * (p * (1 - p) / n) ** 0.5, site.name
    guided.apply_rates(model, sites, [0.0] * len(sites))  # placed again: the module is updated, no second hook
    model.train()
    torch.testing.assert_close(model(input_ids=ids).logits, clean, **tolerance(torch.float32))


def test_a_decoder_classifier_takes_guided_and_gaussian_dropout(tmp_path, sst2_slice, gpt2_tokenizer) -> None:
    for dropout in ("guided", "gaussian"):
        cfg = TrainConfig(model="config:llama-tiny", tokenizer=gpt2_tokenizer, data=str(sst2_slice), steps=2,
                          batch_size=4, max_length=24, val_size=24, dropout=dropout, output_dir=str(tmp_path / dropout),
                          dropout_options={"fisher_samples": 4, "fisher_cache": None} if dropout == "guided" else {},
                          eval_every=2, max_eval_batches=1, progress=False)  # fmt: skip
        summary = train(cfg)
        assert summary["steps"] == 2 and summary["config"]["parts"]["dropout"]["name"] == dropout


def test_unit_rates_keep_the_site_mean_and_order() -> None:
    fisher = torch.tensor([0.3, 0.1, 0.2, 0.4])
    rates = guided.unit_rates(0.08, fisher)
    assert rates.mean().item() == pytest.approx(0.08)
    assert torch.equal(torch.argsort(rates), torch.argsort(-fisher))  # lowest Fisher drops most


def test_guided_dropout_method_on_gpt2_with_cache(tmp_path, wikitext_slice, gpt2_tokenizer, monkeypatch) -> None:
    cfg = dict(
        model="config:gpt2-tiny", tokenizer=gpt2_tokenizer, data=str(wikitext_slice), method="guided-dropout",
        steps=3, batch_size=4, block_size=32, eval_every=3, max_eval_batches=1, progress=False,
    )  # fmt: skip
    options = {"fisher_samples": 6, "fisher_cache": str(tmp_path / "cache"), "per_unit": True}
    train(TrainConfig(**cfg, output_dir=str(tmp_path / "a"), method_options=options))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    calls = []
    monkeypatch.setattr("finetune_ext.guided.parts.empirical_fisher", lambda *a, **k: calls.append(1))
    train(TrainConfig(**cfg, output_dir=str(tmp_path / "b"), method_options=options))
    assert calls == []  # the second run reused the cached Fisher
    state = torch.load(tmp_path / "b" / "checkpoint-0000003" / "state.pt", weights_only=False)
    rates = state["parts"]["dropout"]["rates"]
    assert len(rates) == 7 and max(v for v in rates.values() if isinstance(v, float)) == pytest.approx(0.099)
    assert isinstance(rates["transformer.h.0.mlp.dropout"], list)  # per-unit


def test_fisher_cache_damaged_or_unwritable_warns_and_the_run_goes_on(tmp_path, wikitext_slice, gpt2_tokenizer):
    cfg = dict(
        model="config:gpt2-tiny", tokenizer=gpt2_tokenizer, data=str(wikitext_slice), method="guided-dropout",
        steps=1, batch_size=4, block_size=32, eval_every=1, max_eval_batches=1, progress=False,
    )  # fmt: skip
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    options = {"fisher_samples": 4, "fisher_cache": str(blocked / "cache")}
    with pytest.warns(RunWarning, match=rf"fisher_cache: cannot write {blocked / 'cache'}/.*going on without caching"):
        assert train(TrainConfig(**cfg, output_dir=str(tmp_path / "a"), method_options=options))["steps"] == 1

    options["fisher_cache"] = str(tmp_path / "cache")
    first = train(TrainConfig(**cfg, output_dir=str(tmp_path / "b"), method_options=options))
    (file,) = (tmp_path / "cache").glob("*.safetensors")
    raw = bytearray(file.read_bytes())
    raw[-3] ^= 0x40
    file.write_bytes(bytes(raw))
    with pytest.warns(RunWarning, match=rf"fisher_cache: {file} does not match its digest .*estimating again"):
        again = train(TrainConfig(**cfg, output_dir=str(tmp_path / "c"), method_options=options))
    assert again["test"] == first["test"]  # the same estimate, recomputed
    assert file.exists()  # and cached again


def test_control_rankings_reverse_or_flatten_the_schedule(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    cfg = dict(
        model="config:gpt2-tiny", tokenizer=gpt2_tokenizer, data=str(wikitext_slice), dropout="guided",
        steps=1, batch_size=4, block_size=32, eval_every=1, max_eval_batches=1, progress=False,
    )  # fmt: skip
    rates = {}
    for ranking in ("fisher", "reversed", "uniform"):
        options = {"fisher_samples": 4, "fisher_cache": None, "ranking": ranking}
        train(TrainConfig(**cfg, output_dir=str(tmp_path / ranking), dropout_options=options))
        state = torch.load(tmp_path / ranking / "checkpoint-0000001" / "state.pt", weights_only=False)
        rates[ranking] = state["parts"]["dropout"]["rates"]
    names = list(rates["fisher"])
    fisher, reversed_ = (torch.tensor([rates[k][n] for n in names]) for k in ("fisher", "reversed"))
    p_max = site_mod.P_MAX_OFFICIAL
    torch.testing.assert_close(reversed_, p_max - fisher, **tolerance(torch.float32))  # ranks reversed: p -> p_max - p
    assert set(rates["uniform"].values()) == {p_max / 2} and rates["uniform"].keys() == rates["fisher"].keys()
    assert fisher.mean().item() == pytest.approx(p_max / 2)  # the uniform control has the schedule's mean rate


def test_guided_and_gaussian_on_bert_classifier(tmp_path, sst2_slice, bert_tokenizer) -> None:
    cfg = dict(
        model="config:bert-tiny", tokenizer=bert_tokenizer, data=str(sst2_slice), steps=2, batch_size=4,
        max_length=24, val_size=50, eval_every=2, progress=False,
    )  # fmt: skip
    summary = train(
        TrainConfig(
            **cfg,
            method="guided-dropout",
            output_dir=str(tmp_path / "g"),
            method_options={"fisher_samples": 4, "fisher_cache": None},
        )
    )
    assert summary["steps"] == 2
    summary = train(TrainConfig(**cfg, method="gaussian-dropout", output_dir=str(tmp_path / "n")))
    assert summary["steps"] == 2


def test_gaussian_dropout_module() -> None:
    m = GaussianDropout(0.2)
    x = torch.ones(20000)
    y = m(x)
    assert abs(y.mean().item() - 1) < 4 * 0.5 / 20000**0.5 and abs(y.var().item() - 0.25) < 0.02
    assert torch.equal(m.eval()(x), x)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"p_max: expected a value in \[0, 1\), got 1.0"):
        guided.GuidedOptions(p_max=1.0)
    with pytest.raises(ValueError, match="fisher_samples: expected >= 1, got 0"):
        guided.GuidedOptions(fisher_samples=0)
    with pytest.raises(
        ValueError, match="site maps for 'bert', 'gpt2', 'llama', 'mistral', 'qwen2' models, got model_type None"
    ):
        guided.find_sites(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="samples: expected at least one sample"):
        guided.empirical_fisher(_tiny_gpt2(), [], causal=True, progress=False)


def test_fisher_under_two_gloo_processes_equals_one_process(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    root = Path(__file__).resolve().parents[2]
    args = [
        "train", "--model", "config:gpt2-tiny", "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
        "--method", "guided-dropout", "--method-option", "fisher_samples=6", "--steps", "1", "--batch-size", "4",
        "--block-size", "32", "--eval-every", "1", "--max-eval-batches", "1", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    launch = {
        "one": [sys.executable, "-m", "finetune_ext.cli"],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "finetune_ext.cli",
        ],
    }
    rates, fisher = {}, {}
    for name, prefix in launch.items():
        out = tmp_path / name
        cache = ["--method-option", f"fisher_cache={out / 'cache'}", "--output-dir", str(out)]
        res = subprocess.run([*prefix, *args, *cache], env=env, capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr[-6000:]
        state = torch.load(out / "checkpoint-0000001" / "state.pt", weights_only=False)
        rates[name] = state["parts"]["dropout"]["rates"]
        (file,) = (out / "cache").glob("*.safetensors")  # written by rank 0 after the all-reduce
        fisher[name] = load_file(str(file))
        assert json.loads((out / "summary.json").read_text())["processes"] == (1 if name == "one" else 2)
    assert rates["one"] == pytest.approx(rates["two"])
    for key, value in fisher["one"].items():
        _close(fisher["two"][key], value, msg=key)
