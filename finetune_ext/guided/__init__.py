"""Guided dropout: Fisher-information-guided dropout rates (transforms ``--dropout guided|gaussian``)."""

from finetune_ext.guided.fisher import FisherCache, empirical_fisher, mask_tokens
from finetune_ext.guided.parts import GaussianDropoutTransform, GuidedDropout, GuidedOptions, lm_twin
from finetune_ext.guided.sites import Site, apply_rates, find_sites, rates_by_rank, site_scores, unit_rates

__all__ = [
    "FisherCache",
    "GaussianDropoutTransform",
    "GuidedDropout",
    "GuidedOptions",
    "Site",
    "apply_rates",
    "empirical_fisher",
    "find_sites",
    "lm_twin",
    "mask_tokens",
    "rates_by_rank",
    "site_scores",
    "unit_rates",
]
