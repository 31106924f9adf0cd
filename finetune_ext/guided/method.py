"""Training-loop methods: ``guided-dropout`` (Fisher-guided rates) and the ``gaussian-dropout`` baseline.

Guided dropout, faithful mode: diagonal empirical Fisher of the pre-training objective (masked LM for
BERT-family encoders, causal LM for GPT-2) on ``fisher_samples`` training examples, per-site scores,
rates linear from ``p_max`` (lowest Fisher) to 0, then AdamW. Offline there is no pre-training corpus, so
the Fisher sample is drawn from the fine-tuning training split (a documented departure: the paper uses 1% of
the pre-training corpus). A classifier's Fisher is computed on an LM-head twin that shares its encoder
weights (BERT: ``BertForMaskedLM`` with a fresh transform layer and the decoder tied to the word embeddings,
as the checkpoint of e.g. all-MiniLM-L6-v2 has no MLM head). ``per_unit=True`` (beyond the paper) gives each
unit of the attention-output and FFN-output sites its own rate from the row-wise Fisher of the weight
feeding it, with the site's rate as the mean.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from finetune_ext.guided.fisher import FisherCache, empirical_fisher, mask_tokens
from finetune_ext.guided.sites import (
    P_MAX_OFFICIAL,
    apply_rates,
    find_sites,
    linear_schedule,
    row_fisher,
    site_scores,
    unit_rates,
)
from finetune_ext.nn import GaussianDropout
from finetune_ext.train.methods import AdamW, MethodConfig, RunInfo, register_method

DEFAULT_CACHE = "~/.cache/finetune_ext/fisher"


def lm_twin(model: nn.Module) -> tuple[nn.Module, bool]:
    """(a model with the pre-training head sharing ``model``'s body, causal?) for the Fisher objective."""
    family = model.config.model_type
    causal = family == "gpt2"
    if causal and hasattr(model, "lm_head"):
        return model, True
    twin = (AutoModelForCausalLM if causal else AutoModelForMaskedLM).from_config(model.config)
    twin.to(next(model.parameters()).device)
    body = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("bert", "transformer")}
    missing, _ = twin.load_state_dict(body, strict=False)
    head = ("cls.", "lm_head.")
    if any(not k.startswith(head) for k in missing):
        body_missing = [k for k in missing if not k.startswith(head)]
        raise ValueError(f"model: cannot build an LM twin; body weights missing: {body_missing[:3]}")
    twin.tie_weights()
    return twin, causal


def fisher_samples(
    run: RunInfo, causal: bool, n: int, seed: int, vocab: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` seeded training examples as (inputs, labels) for the causal-LM or masked-LM objective."""
    ids = run.train["input_ids"]
    mask = run.train.get("attention_mask", torch.ones_like(ids))
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(ids), generator=g)[: min(n, len(ids))]
    out = []
    for i in pick.tolist():
        x, keep = ids[i], mask[i].bool()
        if causal:
            out.append((x, torch.where(keep, x, torch.full_like(x, -100))))
        else:
            tok = run.tokenizer
            if tok.mask_token_id is None:
                raise ValueError("tokenizer: the masked-LM Fisher needs a mask token; this tokenizer has none")
            inputs, labels = mask_tokens(x, tok.mask_token_id, vocab, g)
            special = torch.tensor(
                tok.get_special_tokens_mask(x.tolist(), already_has_special_tokens=True), dtype=torch.bool
            )
            labels[~keep | special] = -100
            out.append((torch.where(keep, inputs, x), labels))
    return out


@register_method
class GuidedDropout(AdamW):
    """AdamW with dropout rates set from the Fisher information (Sharma et al., 2024)."""

    name = "guided-dropout"

    def __init__(
        self,
        p_max: float = P_MAX_OFFICIAL,
        fisher_samples: int = 256,
        per_unit: bool = False,
        fisher_cache: str | None = DEFAULT_CACHE,
        fisher_memory_mb: float = 1024,
    ) -> None:
        if not 0.0 <= p_max < 1.0:
            raise ValueError(f"p_max: expected a value in [0, 1), got {p_max}")
        if fisher_samples < 1:
            raise ValueError(f"fisher_samples: expected >= 1, got {fisher_samples}")
        if fisher_memory_mb <= 0:
            raise ValueError(f"fisher_memory_mb: expected > 0, got {fisher_memory_mb}")
        self.p_max, self.n, self.per_unit, self.cache = p_max, fisher_samples, per_unit, fisher_cache
        self.memory_mb = fisher_memory_mb
        self.rates: dict[str, Any] = {}

    def fisher(self, model: nn.Module, run: RunInfo) -> dict[str, torch.Tensor]:
        """The Fisher of ``model``'s pre-training objective, from the cache when it holds it."""
        twin, causal = lm_twin(model)
        settings = {
            "objective": "clm" if causal else "mlm",
            "n": self.n,
            "seed": run.seed,
            "data": list(run.train["input_ids"].shape),
        }
        cache = FisherCache(self.cache) if self.cache else None
        key = FisherCache.key(twin, **settings) if cache else ""
        if cache and (hit := cache.load(key)) is not None:
            return {k: v.to(next(model.parameters()).device) for k, v in hit.items()}
        samples = fisher_samples(run, causal, self.n, run.seed, twin.config.vocab_size)
        device = next(twin.parameters()).device
        # Per-sample gradients dominate the memory of a chunk: one fp32 copy of the parameters per sample.
        grad_bytes = 4 * sum(p.numel() for p in twin.parameters() if p.requires_grad)
        chunk = max(1, int(self.memory_mb * 2**20 // grad_bytes))
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        pairs = [(x.to(device), y.to(device)) for x, y in samples[rank::world]]  # sums are all-reduced
        fisher = empirical_fisher(twin, pairs, causal=causal, chunk_size=chunk, progress=run.progress)
        if cache and rank == 0:
            cache.save(key, fisher)
        return fisher

    def setup(self, model: nn.Module, config: MethodConfig, total_steps: int, run: RunInfo | None = None) -> None:
        if run is None:
            raise ValueError("guided-dropout: needs the run's training data (use finetune_ext.train.train)")
        sites = find_sites(model)
        fisher = self.fisher(model, run)
        site_p = linear_schedule(site_scores(sites, fisher), self.p_max)
        conv1d = model.config.model_type == "gpt2"
        rates: list[float | torch.Tensor] = []
        for site, p in zip(sites, site_p.tolist(), strict=True):
            if self.per_unit and site.unit_weight is not None:
                rates.append(unit_rates(p, row_fisher(fisher[site.unit_weight], conv1d)).float())
            else:
                rates.append(p)
        apply_rates(model, sites, rates)
        self.rates = {
            s.name: (r.tolist() if isinstance(r, torch.Tensor) else r) for s, r in zip(sites, rates, strict=True)
        }
        super().setup(model, config, total_steps, run)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rates": self.rates}


@register_method
class GaussianDropoutMethod(AdamW):
    """Baseline: multiplicative Gaussian noise N(1, p/(1-p)) at the hidden-state sites (off at evaluation)."""

    name = "gaussian-dropout"

    def __init__(self, p: float = 0.1) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p: expected a value in [0, 1), got {p}")
        self.p = p

    def setup(self, model: nn.Module, config: MethodConfig, total_steps: int, run: RunInfo | None = None) -> None:
        for site in find_sites(model):
            if site.kind != "attn_probs":
                parent, _, child = site.name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, GaussianDropout(self.p))
        super().setup(model, config, total_steps, run)
