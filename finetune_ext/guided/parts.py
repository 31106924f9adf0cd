"""Dropout transforms: ``--dropout guided`` (Fisher-guided rates) and the ``--dropout gaussian`` baseline.

Guided dropout, faithful mode: diagonal empirical Fisher of the pre-training objective (masked LM for
BERT-family encoders; causal LM, next-token loss on the training text, for GPT-2, Llama, Mistral and Qwen2) on
``fisher_samples`` training examples, per-site scores,
rates linear from ``p_max`` (lowest Fisher) to 0. Offline there is no pre-training corpus, so
the Fisher sample is drawn from the fine-tuning training split (a documented departure: the paper uses 1% of
the pre-training corpus). A classifier's Fisher is computed on an LM-head twin that shares its encoder
weights (BERT: ``BertForMaskedLM`` with a fresh transform layer and the decoder tied to the word embeddings,
as the checkpoint of e.g. all-MiniLM-L6-v2 has no MLM head). ``per_unit=True`` (beyond the paper) gives each
unit of the attention-output and FFN-output sites its own rate from the row-wise Fisher of the weight
feeding it, with the site's rate as the mean. The Fisher is that of the model as the run starts: dropout
transforms apply before adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from finetune_ext.guided.fisher import FisherCache, empirical_fisher, mask_tokens
from finetune_ext.guided.sites import (
    CAUSAL_FAMILIES,
    P_MAX_OFFICIAL,
    apply_rates,
    find_sites,
    place_site_module,
    rates_by_rank,
    row_fisher,
    site_scores,
    unit_rates,
)
from finetune_ext.nn import GaussianDropout, keys
from finetune_ext.parts import RunContext, Transform, option
from finetune_ext.parts.distributed import full_tensor, is_sharded

DEFAULT_CACHE = "~/.cache/finetune_ext/fisher"


def lm_twin(model: nn.Module) -> tuple[nn.Module, bool]:
    """(a model with the pre-training head sharing ``model``'s body, causal?) for the Fisher objective. A model
    sharded by FSDP gets a whole copy on every process (gathered: a collective), as the Fisher pass reads
    per-sample gradients of whole weights."""
    family = model.config.model_type
    causal = family in CAUSAL_FAMILIES
    if causal and hasattr(model, "lm_head"):
        return (gathered_copy(model) if is_sharded(model) else model), True
    twin = (AutoModelForCausalLM if causal else AutoModelForMaskedLM).from_config(model.config)
    twin.to(next(model.parameters()).device)
    body = {
        k: full_tensor(v) for k, v in model.state_dict().items() if k.split(".")[0] in ("bert", "transformer", "model")
    }
    missing, _ = twin.load_state_dict(body, strict=False)
    head = ("cls.", "lm_head.")
    if any(not k.startswith(head) for k in missing):
        body_missing = [k for k in missing if not k.startswith(head)]
        raise ValueError(f"model: cannot build an LM twin; body weights missing: {body_missing[:3]}")
    twin.tie_weights()
    return twin, causal


def gathered_copy(model: nn.Module) -> nn.Module:
    """An unsharded copy of an FSDP-sharded causal LM, in its dtype, built without drawing from the torch RNG."""
    with torch.random.fork_rng(devices=[]):
        copy = AutoModelForCausalLM.from_config(model.config)
    copy.to(next(model.parameters()).device, next(model.parameters()).dtype)
    copy.load_state_dict({k: full_tensor(v) for k, v in model.state_dict().items()})
    copy.tie_weights()
    return copy


def fisher_samples(
    run: RunContext, causal: bool, n: int, seed: int, vocab: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded training examples as (inputs, labels) for the causal-LM or masked-LM objective, each cut to
    its own tokens: the Fisher model runs without an attention mask, and padding would be attended."""
    ids = run.train["input_ids"]
    mask = run.train.get("attention_mask", torch.ones_like(ids))
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(ids), generator=g)[: min(n, len(ids))]
    out = []
    for i in pick.tolist():
        x = ids[i][mask[i].bool()]
        if causal:
            out.append((x, x))
        else:
            tok = run.tokenizer
            if tok.mask_token_id is None:
                raise ValueError("tokenizer: the masked-LM Fisher needs a mask token; this tokenizer has none")
            special = torch.tensor(
                tok.get_special_tokens_mask(x.tolist(), already_has_special_tokens=True), dtype=torch.bool
            )
            out.append(mask_tokens(x, tok.mask_token_id, vocab, g, special=special))
    return out


@dataclass
class GuidedOptions:
    p_max: float = option(P_MAX_OFFICIAL, "drop rate of the lowest-Fisher site (0.099 as in the official code)")
    fisher_samples: int = option(256, "training examples in the Fisher estimate")
    per_unit: bool = option(False, "per-unit rates from the row-wise Fisher (beyond the paper)")
    fisher_cache: str | None = option(DEFAULT_CACHE, "folder caching Fisher estimates as safetensors (null: off)")
    fisher_memory_mb: float = option(1024.0, "memory for per-sample gradients per chunk")
    ranking: Literal["fisher", "reversed", "uniform"] = option(
        "fisher",
        "controls: 'reversed' drops high-Fisher sites most; 'uniform' is p_max/2 (the schedule's mean) everywhere",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_max < 1.0:
            raise ValueError(f"p_max: expected a value in [0, 1), got {self.p_max}")
        if self.fisher_samples < 1:
            raise ValueError(f"fisher_samples: expected >= 1, got {self.fisher_samples}")
        if self.fisher_memory_mb <= 0:
            raise ValueError(f"fisher_memory_mb: expected > 0, got {self.fisher_memory_mb}")
        if self.ranking not in ("fisher", "reversed", "uniform"):
            raise ValueError(f"ranking: expected 'fisher', 'reversed' or 'uniform', got {self.ranking!r}")


class GuidedDropout(Transform):
    """Dropout rates from the Fisher information of the pre-training objective (Sharma et al., 2024)."""

    name = "guided"
    shardable = True
    Options = GuidedOptions

    def __init__(self, options: GuidedOptions | None = None) -> None:
        super().__init__(options)
        self.rates: dict[str, Any] = {}

    def fisher(self, model: nn.Module, run: RunContext) -> dict[str, torch.Tensor]:
        """The Fisher of ``model``'s pre-training objective, from the cache when it holds it."""
        o = self.options
        twin, causal = lm_twin(model)
        settings = {
            "objective": "clm" if causal else "mlm",
            "n": o.fisher_samples,
            "seed": run.seed,
            "data": list(run.train["input_ids"].shape),
            "samples": "unpadded",  # estimates from padded samples (before 2026-12-05) attended the padding
        }
        cache = FisherCache(o.fisher_cache) if o.fisher_cache else None
        key = FisherCache.key(twin, **settings) if cache else ""
        if cache and (hit := cache.load(key)) is not None:
            return {k: v.to(next(model.parameters()).device) for k, v in hit.items()}
        samples = fisher_samples(run, causal, o.fisher_samples, run.seed, twin.config.vocab_size)
        device = next(twin.parameters()).device
        # Per-sample gradients dominate the memory of a chunk: one fp32 copy of the parameters per sample.
        grad_bytes = 4 * sum(p.numel() for p in twin.parameters() if p.requires_grad)
        chunk = max(1, int(o.fisher_memory_mb * 2**20 // grad_bytes))
        pairs = [(x.to(device), y.to(device)) for x, y in samples[run.dist.rank :: run.dist.world]]
        fisher = empirical_fisher(twin, pairs, causal=causal, chunk_size=chunk, progress=run.progress, dist=run.dist)
        if cache and run.dist.main:
            cache.save(key, fisher)
        return fisher

    def apply(self, model: nn.Module, run: RunContext) -> None:
        o, sites = self.options, find_sites(model)
        if o.ranking == "uniform":  # the mean of the rank schedule, with no Fisher pass: is the gain less dropout?
            apply_rates(model, sites, [o.p_max / 2] * len(sites))
            self.rates = {s.name: o.p_max / 2 for s in sites}
            return
        fisher = self.fisher(model, run)
        scores = site_scores(sites, fisher)
        site_p = rates_by_rank(scores if o.ranking == "fisher" else -scores, o.p_max)
        conv1d = model.config.model_type == "gpt2"
        rates: list[float | torch.Tensor] = []
        for site, p in zip(sites, site_p.tolist(), strict=True):
            if self.options.per_unit and site.unit_weight is not None:
                rates.append(unit_rates(p, row_fisher(fisher[site.unit_weight], conv1d)).float())
            else:
                rates.append(p)
        apply_rates(model, sites, rates)
        self.rates = {
            s.name: (r.tolist() if isinstance(r, torch.Tensor) else r) for s, r in zip(sites, rates, strict=True)
        }

    def state_dict(self) -> dict[str, Any]:
        return {"rates": self.rates}


@dataclass
class GaussianOptions:
    p: float = option(0.1, "the Bernoulli rate whose variance the noise matches: N(1, p/(1-p))")

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"p: expected a value in [0, 1), got {self.p}")


class GaussianDropoutTransform(Transform):
    """Baseline: multiplicative Gaussian noise N(1, p/(1-p)) at the hidden-state sites (off at evaluation)."""

    name = "gaussian"
    shardable = True
    Options = GaussianOptions

    def apply(self, model: nn.Module, run: RunContext) -> None:
        for site in find_sites(model):
            if site.kind != "attn_probs":
                place_site_module(model, site, GaussianDropout(self.options.p, site=keys.site_id(site.name)))
