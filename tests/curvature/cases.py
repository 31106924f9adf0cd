"""Declarative float64 cases: tiny models whose dense Hessian is cheap to form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from finetune_ext import curvature


@dataclass
class Case:
    name: str
    loss_fn: Callable
    output_fn: Callable
    labels: torch.Tensor
    params: tuple[torch.Tensor, ...]
    context: object = None  # keeps a for_model block open (its exit would restore train mode)


def mlp_case() -> Case:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 3, 2, 0])
    params = (
        torch.randn(7, 5, generator=g, dtype=torch.float64) * 0.7,
        torch.randn(7, generator=g, dtype=torch.float64) * 0.1,
        torch.randn(4, 7, generator=g, dtype=torch.float64) * 0.7,
    )

    def output_fn(ps):
        w1, b1, w2 = ps
        return torch.tanh(x @ w1.T + b1) @ w2.T

    def loss_fn(ps):
        return F.cross_entropy(output_fn(ps), y)

    return Case("mlp", loss_fn, output_fn, y, params)


def gpt2_block_case():
    """A 2-layer, 8-wide GPT-2 in float64; the parameters of block 0's attention projection and second norm."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=8, n_positions=16, vocab_size=11)
    model = GPT2LMHeadModel(config).double()
    model.set_attn_implementation("sdpa")  # for_model must switch it to eager and back
    batch = {"input_ids": torch.randint(0, 11, (3, 6))}
    return model, batch, ["transformer.h.0.attn.c_proj.", "transformer.h.0.ln_2."]


def gpt2_case() -> Case:
    model, batch, prefixes = gpt2_block_case()
    ctx = curvature.for_model(model, batch, prefixes)
    fns = ctx.__enter__()  # kept open for the test session: the model is private to this case
    return Case("gpt2-block", fns.loss_fn, fns.output_fn, fns.labels, fns.params, context=ctx)


def bert_case() -> Case:
    """A 2-layer, 8-wide BERT classifier in float64; the last layer's output projection and the classifier."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=13, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12, num_labels=3
    )
    model = BertForSequenceClassification(config).double()
    batch = {"input_ids": torch.randint(0, 13, (4, 5)), "labels": torch.tensor([0, 2, 1, 2])}
    ctx = curvature.for_model(model, batch, ["bert.encoder.layer.1.output.dense.", "classifier."])
    fns = ctx.__enter__()
    return Case("bert-cls", fns.loss_fn, fns.output_fn, fns.labels, fns.params, context=ctx)


CASES = {"mlp": mlp_case, "gpt2-block": gpt2_case, "bert-cls": bert_case}
