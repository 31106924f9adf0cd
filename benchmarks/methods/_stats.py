"""The studies' shared statistics: paired differences over seeds with a 95 % t interval, and the verdict."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Paired:
    """``mean(a - b)`` over the seeds both arms ran, with its 95 % Student-t confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    def verdict(self, better: str = "higher") -> str:
        """``better`` / ``worse`` when the interval excludes 0 (``better`` = "higher" or "lower"), else ``tie``."""
        if self.n < 2 or self.low <= 0.0 <= self.high:
            return "tie"
        up = self.low > 0.0
        return "better" if up == (better == "higher") else "worse"

    def text(self, scale: float = 100.0, digits: int = 1) -> str:
        """``+1.2 [-0.3, +2.7] (5)``, the difference and its interval times ``scale``."""
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{scale * self.mean:+.{digits}f} (1 seed)"
        f = lambda v: f"{scale * v:+.{digits}f}"  # noqa: E731
        return f"{f(self.mean)} [{f(self.low)}, {f(self.high)}] ({self.n})"


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    """Paired difference ``a - b`` over the seeds (keys) present in both."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return Paired(math.nan, math.nan, math.nan, 0)
    mean = statistics.mean(diffs)
    if len(diffs) == 1:
        return Paired(mean, math.nan, math.nan, 1)
    half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Paired(mean, mean - half, mean + half, len(diffs))
