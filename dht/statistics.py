"""Statistics on the test split: the percentile-bootstrap interval of an accuracy, and the paired comparison of
two models on the same test samples (the bootstrap interval of their accuracy difference and McNemar's exact
test).

The paper reports single F1 values without intervals or tests. Definitions (docs/pipeline.md, "Paired
statistics"), for two models A and B evaluated on the same n test samples, with a_i = 1 when A gets sample i
right (0 otherwise) and b_i likewise:

- **Difference**: acc(A) - acc(B) = mean_i (a_i - b_i).
- **Paired bootstrap interval** (95%): each of :data:`BOOTSTRAP_RESAMPLES` resamples draws n sample indices
  with replacement (a fixed seed, so the same predictions give the same interval) and takes *both* models'
  outcomes on those same samples; the interval is the 2.5% and 97.5% quantiles of the resampled differences.
  Resampling the samples rather than each model on its own keeps what the two models share (the samples both
  find easy or hard): two separate accuracy intervals ignore it and are too wide to compare models by.
- **McNemar's exact test**: only the discordant samples say which model is better, n_A = samples A gets right
  and B wrong, n_B the converse. If both models were equally accurate, each discordant sample would be A's with
  probability 1/2: the p-value is the two-sided exact binomial test of n_A successes in n_A + n_B trials
  (:func:`scipy.stats.binomtest`), 1 when there is no discordant sample.

Both describe the test split's sampling noise for the two trained models, not the training seed's noise
(``run.training_seeds`` measures that).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0  # fixed: the same predictions always give the same interval
CONFIDENCE = 0.95
# Draws per chunk of the bootstrap: 1000 resamples of a 70 000-sample test split (DBpedia) at once would take
# 560 MB of indices.
_CHUNK_DRAWS = 4_000_000


def bootstrap_ci(values: Sequence[float] | np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                 level: float = CONFIDENCE, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`, one entry per test sample: whether a model got it
    right (the accuracy's interval) or a_i - b_i (the paired difference's, :func:`paired_difference`).

    Each resample draws len(values) samples with replacement; the interval is the (1 - level)/2 and
    (1 + level)/2 quantiles of the resampled means. Empty input: (nan, nan)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    if not 0 < level < 1:
        raise ValueError(f"level = {level}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, _CHUNK_DRAWS // n)
    for lo in range(0, resamples, step):
        hi = min(lo + step, resamples)
        means[lo:hi] = x[rng.integers(0, n, size=(hi - lo, n))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value from the discordant counts: `only_a` samples model A gets right and B
    wrong, `only_b` the converse (the binomial test of `only_a` in `only_a + only_b` trials at 1/2); 1.0 when
    no sample is discordant."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    if only_a + only_b == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue)


@dataclass(frozen=True)
class PairedDifference:
    """Model A against model B on the same test samples (the module's definitions)."""

    difference: float  # acc(A) - acc(B)
    ci95: tuple[float, float]  # the paired bootstrap interval of the difference
    p_value: float  # McNemar's exact test
    only_a: int  # samples A gets right and B wrong
    only_b: int  # samples B gets right and A wrong
    n: int  # test samples

    @property
    def n_discordant(self) -> int:
        return self.only_a + self.only_b

    @property
    def half_width(self) -> float:
        """Half the interval's width: about the smallest difference these test samples settle."""
        return (self.ci95[1] - self.ci95[0]) / 2

    def as_dict(self) -> dict[str, Any]:
        """paired.json's fields (floats rounded to 6 digits; the interval as two numbers, which `dvc metrics
        show` lists, unlike a list)."""
        return {"difference": round(self.difference, 6), "ci95_lo": round(self.ci95[0], 6),
                "ci95_hi": round(self.ci95[1], 6), "p_value": round(self.p_value, 6),
                "n_discordant": self.n_discordant, "only_model": self.only_a, "only_other": self.only_b, "n": self.n}


def paired_difference(a_correct: Sequence[bool] | np.ndarray, b_correct: Sequence[bool] | np.ndarray,
                      resamples: int = BOOTSTRAP_RESAMPLES, level: float = CONFIDENCE,
                      seed: int = BOOTSTRAP_SEED) -> PairedDifference:
    """Model A against model B from their per-sample correctness on the same test samples, in the same order:
    the accuracy difference, its paired bootstrap interval and McNemar's exact p-value."""
    a = np.asarray(a_correct, dtype=bool).ravel()
    b = np.asarray(b_correct, dtype=bool).ravel()
    if a.size != b.size:
        raise ValueError(f"paired samples must be the same test samples: {a.size} outcomes against {b.size}")
    if a.size == 0:
        raise ValueError("no test samples to compare")
    d = a.astype(np.float64) - b.astype(np.float64)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return PairedDifference(float(d.mean()), bootstrap_ci(d, resamples, level, seed), mcnemar_exact(only_a, only_b),
                            only_a, only_b, int(a.size))
