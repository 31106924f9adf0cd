"""Dropout sites of Hugging Face BERT-family, GPT-2 and Llama-family models, their Fisher scores and dropout
schedules.

A site is a dropout module plus the parameters of the sub-layer that feeds it (the official code's grouping
for BERT; for GPT-2, our choice: the projection right before each dropout):

=================  ==========================================  ==============================================
site               BERT (``bert.encoder.layer.{i}``)           GPT-2 (``transformer.h.{i}``)
=================  ==========================================  ==============================================
embeddings         word/position/token-type embeddings + LN    ``wte``, ``wpe``
attention probs    ``attention.self`` Q, K, V                  ``attn.c_attn``
attention output   ``attention.output`` dense + LN             ``attn.c_proj``
FFN output         ``output`` dense + LN                       ``mlp.c_proj``
=================  ==========================================  ==============================================

Llama, Mistral and Qwen2 (``model.layers.{i}``) ship with no dropout module, only an attention-dropout rate
(``attention_dropout``, 0 in released configurations). Their sites mirror GPT-2's: the output of ``embed_tokens``,
the attention probabilities (fed by ``q_proj``, ``k_proj``, ``v_proj``), the output of ``self_attn`` (fed by
``o_proj``) and of ``mlp`` (fed by ``down_proj``), each before its residual add. A dropout module is inserted at
each output (``<module>.output_dropout``, applied by a forward hook: ``nn.insert_output_module``), so parameter
names stay as released and adapters inside those modules are covered.

Attention-probability dropout happens inside the attention function (eager or SDPA), which reads the
dropout module's ``p`` (Llama family: the attention module's ``attention_dropout``) at every call, so those sites
get their rate by setting it; the other sites are replaced by (or, Llama family, given) ``FisherDropout``
modules (the fused kernel), per site or per unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finetune_ext.nn import FisherDropout, insert_output_module, keys, replace_module

P_MAX_OFFICIAL = 0.099  # glue_bert_ours.py: p = 0.099 - 0.00275 * rank over BERT-base's 37 sites
DECODER_FAMILIES = ("llama", "mistral", "qwen2")  # model types with the Llama layout and no dropout modules
CAUSAL_FAMILIES = ("gpt2", *DECODER_FAMILIES)


@dataclass
class Site:
    name: str  # dotted path of the dropout module
    kind: str  # "embeddings" | "attn_probs" | "attn_output" | "ffn_output"
    params: tuple[str, ...]  # parameter names of the sub-layer feeding the site
    unit_weight: str | None  # the weight whose rows (output units) feed the site, for per-unit rates
    inserted: bool = False  # a module the model lacks, put at ``name`` by ``insert_output_module``
    probs_attr: str = "p"  # attention-probability sites: the attribute holding the rate


def _projection_site(dropout: str, kind: str, proj: str, norm: str | None = None) -> Site:
    """A site fed by the projection ``proj`` (module path; its output rows are the units) and an optional LayerNorm."""
    norm_params = (f"{norm}.weight", f"{norm}.bias") if norm else ()
    return Site(dropout, kind, (f"{proj}.weight", f"{proj}.bias", *norm_params), f"{proj}.weight")


def _bert_sites(base: str, layers: int) -> list[Site]:
    emb = f"{base}embeddings."
    sites = [
        Site(
            f"{emb}dropout",
            "embeddings",
            tuple(
                f"{emb}{t}"
                for t in (
                    "word_embeddings.weight",
                    "position_embeddings.weight",
                    "token_type_embeddings.weight",
                    "LayerNorm.weight",
                    "LayerNorm.bias",
                )
            ),
            None,
        )
    ]
    for i in range(layers):
        layer = f"{base}encoder.layer.{i}."
        qkv = tuple(f"{layer}attention.self.{m}.{t}" for m in ("query", "key", "value") for t in ("weight", "bias"))
        sites.append(Site(f"{layer}attention.self.dropout", "attn_probs", qkv, None))
        for kind, prefix in (("attn_output", f"{layer}attention.output."), ("ffn_output", f"{layer}output.")):
            sites.append(_projection_site(f"{prefix}dropout", kind, f"{prefix}dense", f"{prefix}LayerNorm"))
    return sites


def _gpt2_sites(base: str, layers: int) -> list[Site]:
    sites = [Site(f"{base}drop", "embeddings", (f"{base}wte.weight", f"{base}wpe.weight"), None)]
    for i in range(layers):
        h = f"{base}h.{i}."
        sites.append(
            Site(f"{h}attn.attn_dropout", "attn_probs", (f"{h}attn.c_attn.weight", f"{h}attn.c_attn.bias"), None)
        )
        sites.append(_projection_site(f"{h}attn.resid_dropout", "attn_output", f"{h}attn.c_proj"))
        sites.append(_projection_site(f"{h}mlp.dropout", "ffn_output", f"{h}mlp.c_proj"))
    return sites


def _decoder_sites(base: str, layers: int, params: set[str]) -> list[Site]:
    def present(*names: str) -> tuple[str, ...]:
        return tuple(n for n in names if n in params or n.endswith(".weight"))

    emb = f"{base}embed_tokens"
    sites = [Site(f"{emb}.output_dropout", "embeddings", (f"{emb}.weight",), None, inserted=True)]
    for i in range(layers):
        attn, mlp = f"{base}layers.{i}.self_attn", f"{base}layers.{i}.mlp"
        qkv = present(*(f"{attn}.{m}_proj.{t}" for m in "qkv" for t in ("weight", "bias")))
        sites.append(Site(attn, "attn_probs", qkv, None, probs_attr="attention_dropout"))
        for kind, owner, proj in (("attn_output", attn, "o_proj"), ("ffn_output", mlp, "down_proj")):
            weights = present(f"{owner}.{proj}.weight", f"{owner}.{proj}.bias")
            sites.append(Site(f"{owner}.output_dropout", kind, weights, f"{owner}.{proj}.weight", inserted=True))
    return sites


def find_sites(model: nn.Module) -> list[Site]:
    """The dropout sites of a BERT-family, GPT-2, Llama, Mistral or Qwen2 model (any head); a clear error for
    other families."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    names = {n for n, _ in model.named_modules()}
    if family == "bert":
        base = "bert." if "bert" in names else ""
        sites = _bert_sites(base, config.num_hidden_layers)
    elif family == "gpt2":
        base = "transformer." if "transformer" in names else ""
        sites = _gpt2_sites(base, config.n_layer)
    elif family in DECODER_FAMILIES:
        base = "model." if "model" in names else ""
        sites = _decoder_sites(base, config.num_hidden_layers, {n for n, _ in model.named_parameters()})
    else:
        known = ", ".join(repr(f) for f in ("bert", "gpt2", *DECODER_FAMILIES))
        raise ValueError(f"model: guided dropout has site maps for {known} models, got model_type {family!r}")
    params = dict(model.named_parameters())
    for site in sites:
        missing = [p for p in site.params if p not in params]
        owner = site.name.rpartition(".")[0] if site.inserted else site.name
        if owner not in names or missing:
            raise ValueError(f"model: site {site.name} not found as expected (missing {missing or site.name})")
    return sites


def site_scores(sites: list[Site], fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per site: the unweighted mean of the per-tensor Fisher means of its feeding parameters."""
    missing = sorted({p for s in sites for p in s.params} - fisher.keys())
    if missing:
        raise ValueError(f"fisher: no entries for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return torch.stack([torch.stack([fisher[p].double().mean() for p in s.params]).mean() for s in sites])


def rates_by_rank(scores: torch.Tensor, p_max: float) -> torch.Tensor:
    """Rates linearly spaced from ``p_max`` (lowest score) to 0 (highest): ``p_k = p_max (K-1-rank_k)/(K-1)``."""
    if not 0.0 <= p_max < 1.0:
        raise ValueError(f"p_max: expected a value in [0, 1), got {p_max}")
    k = scores.numel()
    rank = torch.empty(k, dtype=torch.long)
    rank[torch.argsort(scores, stable=True)] = torch.arange(k)
    if k == 1:
        return torch.full((1,), p_max, dtype=torch.float64)
    return p_max * (k - 1 - rank).double() / (k - 1)


def unit_rates(site_p: float, row_fisher: torch.Tensor) -> torch.Tensor:
    """Per-unit rates inside a site: linear from ``2 p`` (lowest-Fisher unit) to 0, mean ``p`` (capped below 1)."""
    p = rates_by_rank(row_fisher.double(), min(2 * site_p, 0.95))
    return p * (site_p / p.mean()) if p.mean() > 0 else p


def row_fisher(fisher: torch.Tensor, module_weight_is_conv1d: bool) -> torch.Tensor:
    """Mean Fisher per output unit: rows of a Linear weight ``[out, in]``, columns of a GPT-2 Conv1D ``[in, out]``."""
    return fisher.double().mean(0 if module_weight_is_conv1d else 1)


def apply_rates(model: nn.Module, sites: list[Site], rates: list[float | torch.Tensor]) -> None:
    """Set each site's rate: ``p`` of attention-probability dropouts, ``FisherDropout`` modules elsewhere."""
    for site, p in zip(sites, rates, strict=True):
        module = _site_module(model, site)
        if site.kind == "attn_probs":
            if isinstance(p, torch.Tensor) and p.numel() > 1:
                raise ValueError(
                    f"rates: {site.name} drops attention probabilities and takes one rate, not {p.numel()}"
                )
            setattr(module, site.probs_attr, float(p))
        elif isinstance(module, FisherDropout):
            module.set_p(p)
        else:
            dropout = FisherDropout(p, site=keys.site_id(site.name))
            place_site_module(model, site, dropout.to(next(model.parameters()).device))


def _site_module(model: nn.Module, site: Site) -> nn.Module | None:
    """The module at the site; None for an inserted site not placed yet."""
    owner, _, child = site.name.rpartition(".")
    if site.inserted:
        return model.get_submodule(owner)._modules.get(child)
    return model.get_submodule(site.name)


def place_site_module(model: nn.Module, site: Site, module: nn.Module) -> nn.Module:
    """Put ``module`` at the site: in place of the model's dropout module, or inserted where the model has none."""
    return (insert_output_module if site.inserted else replace_module)(model, site.name, module)
