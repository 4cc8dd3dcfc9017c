"""Paired comparisons of two models over the same test users: the paper's question, with statistics.

For models A and B on one dataset, every test user's NDCG@10 and HR@10 come from the trials'
ranks.parquet (a user's value is the mean over the model's seeds), and the comparison is of
the per-user differences A - B:

- the mean difference;
- a 95 % paired bootstrap confidence interval over users (`scipy.stats.bootstrap`, percentile
  method, seeded): users are resampled, each keeping both models' values;
- a two-sided Wilcoxon signed-rank test over users (`scipy.stats.wilcoxon`; users where both
  models do alike drop out), Holm-corrected over all comparisons of a report;
- each model's standard deviation over seeds, beside the CI's half-width, so a reader sees
  whether seeds or users make the larger noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from raysweep.core.metrics import metrics_from_ranks
from raysweep.report.table2 import table2_rows
from raysweep.sweep.rundir import RunDir

METRICS = {"ndcg@10": "NDCG@10", "hr@10": "HR@10"}
ALPHA = 0.05
RESAMPLES = 2000


@dataclass
class Comparison:
    dataset: str
    a: str
    b: str
    metric: str  # a key of METRICS
    diff: float  # mean over users of A - B
    low: float  # 95 % paired bootstrap CI of the mean difference
    high: float
    p: float  # Wilcoxon signed-rank, two-sided
    seeds_a: int
    seeds_b: int
    std_a: float  # std over seeds of the model's mean (nan with one seed)
    std_b: float
    p_holm: float = float("nan")

    @property
    def significant(self) -> bool:
        return self.p_holm < ALPHA

    def sentence(self) -> str:
        name = METRICS[self.metric]
        p = "p < 0.001" if self.p_holm < 0.001 else f"p = {self.p_holm:.3f}"
        if not self.significant:
            return (
                f"{self.dataset}: {self.a} vs {self.b}: no significant difference in {name} "
                f"({self.diff:+.4f} [{self.low:+.4f}, {self.high:+.4f}], {p} (Holm))"
            )
        if self.diff > 0:
            return (
                f"{self.dataset}: {self.a} beats {self.b} by {self.diff:+.4f} {name} "
                f"[{self.low:+.4f}, {self.high:+.4f}], {p} (Holm)"
            )
        return (
            f"{self.dataset}: {self.b} beats {self.a} by {-self.diff:+.4f} {name} "
            f"[{-self.high:+.4f}, {-self.low:+.4f}], {p} (Holm)"
        )


def user_values(ranks: list[np.ndarray], metric: str) -> np.ndarray:
    """Each user's metric from their target ranks, averaged over seeds (one rank array per seed)."""
    values = [
        metrics_from_ranks(torch.from_numpy(np.asarray(r, dtype=np.int64)))[metric].numpy() for r in ranks
    ]
    return np.mean(values, axis=0)


def compare(
    dataset: str,
    a: str,
    b: str,
    ranks_a: list[np.ndarray],
    ranks_b: list[np.ndarray],
    metric: str,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> Comparison:
    """A against B on the same users (p_holm is filled in by `holm_corrected`)."""
    if len({len(r) for r in ranks_a + ranks_b}) != 1:
        raise ValueError(f"{dataset}: {a} and {b} were tested on different numbers of users")
    diff = user_values(ranks_a, metric) - user_values(ranks_b, metric)
    interval = stats.bootstrap(
        (diff,),
        np.mean,
        confidence_level=0.95,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
        batch=100,
    ).confidence_interval
    p = float(stats.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0  # no user differs: no evidence

    def seed_std(ranks: list[np.ndarray]) -> float:
        means = [float(user_values([r], metric).mean()) for r in ranks]
        return float(np.std(means, ddof=1)) if len(means) > 1 else float("nan")

    return Comparison(
        dataset,
        a,
        b,
        metric,
        float(diff.mean()),
        float(interval.low),
        float(interval.high),
        p,
        len(ranks_a),
        len(ranks_b),
        seed_std(ranks_a),
        seed_std(ranks_b),
    )


def holm(p: list[float]) -> np.ndarray:
    """Holm's step-down adjustment of p-values (family-wise error at the nominal level)."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def holm_corrected(comparisons: list[Comparison]) -> list[Comparison]:
    for comparison, adjusted in zip(comparisons, holm([c.p for c in comparisons])):
        comparison.p_holm = float(adjusted)
    return comparisons


def _ranks(run: RunDir, key: str, cache: dict) -> np.ndarray:
    if key not in cache:
        cache[key] = run.ranks(key)
    return cache[key]


def compare_models(
    run: RunDir, results: pd.DataFrame, pairs: list[tuple[str, str]], cache: dict | None = None
) -> tuple[list[Comparison], list[str]]:
    """Every pair of `pairs` (the paper's claims, then the sweep's) on each dataset that has both,
    for NDCG@10 and HR@10, Holm-corrected together. A trial whose ranks.parquet cannot be read
    skips its comparisons, with a note that names the file."""
    cache = {} if cache is None else cache
    ranks_cache, done = cache.setdefault("ranks", {}), cache.setdefault("comparisons", {})
    ok = table2_rows(results)
    items, notes = [], []
    for dataset in dict.fromkeys(ok["dataset"]) if len(ok) else []:
        keys = {
            label: list(group.sort_values("seed")["key"])
            for label, group in ok[ok["dataset"] == dataset].groupby("label")
        }
        for a, b in dict.fromkeys(pairs):
            if a not in keys or b not in keys:
                continue
            try:
                ranks_a = [_ranks(run, k, ranks_cache) for k in keys[a]]
                ranks_b = [_ranks(run, k, ranks_cache) for k in keys[b]]
            except (OSError, ValueError, KeyError) as exc:
                notes.append(f"{dataset}: {a} vs {b} skipped: a trial's ranks.parquet is unreadable ({exc})")
                continue
            for metric in METRICS:
                ident = (dataset, a, b, metric, tuple(keys[a]), tuple(keys[b]))
                if ident not in done:
                    try:
                        done[ident] = compare(dataset, a, b, ranks_a, ranks_b, metric)
                    except ValueError as exc:
                        notes.append(f"{dataset}: {a} vs {b} skipped: {exc}")
                        break
                items.append(done[ident])
    return holm_corrected(items), notes
