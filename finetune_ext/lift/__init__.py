"""LiFT: bilevel local search with an LP (HiGHS) over weights and per-block L2 strengths."""

from finetune_ext.lift.lp import LPResult, LPSolver, lp_direction

__all__ = ["LPResult", "LPSolver", "lp_direction"]
