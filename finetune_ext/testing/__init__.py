"""Helpers shared by the test suite and benchmarks."""

from finetune_ext.testing.tolerances import tolerance

__all__ = ["tolerance"]
