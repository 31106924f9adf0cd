"""Helpers shared by the test suite and benchmarks."""

from finetune_ext.testing.tolerances import assert_within_2x_reference, tolerance

__all__ = ["assert_within_2x_reference", "tolerance"]
