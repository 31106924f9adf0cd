"""Guided dropout: Fisher-information-guided dropout rates (transforms ``--dropout guided|gaussian``)."""

from finetune_ext.guided.fisher import FisherCache, empirical_fisher, mask_tokens
from finetune_ext.guided.method import GaussianDropoutTransform, GuidedDropout, GuidedOptions, lm_twin
from finetune_ext.guided.sites import Site, apply_rates, find_sites, linear_schedule, site_scores, unit_rates

__all__ = [
    "FisherCache",
    "GaussianDropoutTransform",
    "GuidedDropout",
    "GuidedOptions",
    "Site",
    "apply_rates",
    "empirical_fisher",
    "find_sites",
    "linear_schedule",
    "lm_twin",
    "mask_tokens",
    "site_scores",
    "unit_rates",
]
