"""Paired comparisons of two models over the same test users: the paper's question, with statistics
at two levels, named in every sentence.

For models A and B on one dataset, every test user's NDCG@10 and HR@10 come from the trials'
ranks.parquet. Two questions, two levels of evidence:

- **run level**: are *these trained models* different? Each user's value is the mean over the
  model's seeds, and the per-user differences A - B give the mean difference, a 95 % paired
  bootstrap CI over users (`scipy.stats.bootstrap`, percentile, seeded) and a two-sided Wilcoxon
  signed-rank test over users (`scipy.stats.wilcoxon`). With one seed a side this is all there is,
  and it speaks of two runs, not two methods: another seed can move a model by more than the CI.
- **method level**, where each side has at least 2 seeds: is *method* A better than method B?
  A two-level bootstrap resamples seeds within each model and then users (the same users for
  both: paired), so both sources of noise enter its standard error (`method_level`). Its CI is
  the difference ± t * SE and its p-value the matching two-sided t test, with Welch-Satterthwaite
  degrees of freedom from the seeds (the few seeds, not the many users, limit what is known).
  A bootstrap percentile interval over 2 or 3 seeds is far too narrow (it covered a planted
  difference in 84 % of simulations at 3 seeds); the t interval covers it in about 95 %.

Holm's correction runs over each level's tests of a report separately. Each model's standard
deviation over seeds stands beside the CIs, so a reader sees which noise dominates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
class MethodLevel:
    """The method-level statistics of a comparison (`method_level`)."""

    diff: float  # mean over seeds and users of A - B
    low: float  # 95 % CI: diff -/+ t(df) * se
    high: float
    se: float  # the two-level bootstrap's standard error
    df: float  # Welch-Satterthwaite degrees of freedom of the seeds' variance
    p: float  # two-sided t test of diff / se on df
    p_holm: float = float("nan")


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
    method: MethodLevel | None = None  # with at least 2 seeds a side

    @property
    def significant(self) -> bool:
        """At the level the comparison speaks for: the method's where there is one."""
        return (self.method.p_holm if self.method else self.p_holm) < ALPHA

    def sentence(self) -> str:
        """What the comparison says, and at which level: the method level where each side has 2+
        seeds, else the run level, saying so."""
        name = METRICS[self.metric]
        if self.method is not None:
            m = self.method
            level = f"method level, {self.seeds_a} and {self.seeds_b} seeds"
            diff, low, high, p_holm = m.diff, m.low, m.high, m.p_holm
            a, b, verb = self.a, self.b, "beats"
        else:
            level = f"run level only: {_seeds(self.seeds_a, self.seeds_b)}"
            diff, low, high, p_holm = self.diff, self.low, self.high, self.p_holm
            a, b = _runs(self.a, self.seeds_a), _runs(self.b, self.seeds_b)
            verb = ""
        p = "p < 0.001" if p_holm < 0.001 else f"p = {p_holm:.3f}"
        if not self.significant:
            return (
                f"{self.dataset}: {a} vs {b}: no significant difference in {name} "
                f"({diff:+.4f} [{low:+.4f}, {high:+.4f}], {p} (Holm); {level})"
            )
        if diff < 0:
            a, b, diff, low, high = b, a, -diff, -high, -low
        verb = verb or ("beats" if a.startswith("this run") else "beat")
        interval = f"[{low:+.4f}, {high:+.4f}]"
        return f"{self.dataset}: {a} {verb} {b} by {diff:+.4f} {name} {interval}, {p} (Holm; {level})"


def _runs(label: str, seeds: int) -> str:
    return f"this run of {label}" if seeds == 1 else f"these {seeds} runs of {label}"


def _seeds(a: int, b: int) -> str:
    return "1 seed each" if a == b == 1 else f"{a} and {b} seeds, a method-level test needs 2 or more a side"


def user_values(ranks: list[np.ndarray], metric: str) -> np.ndarray:
    """Each user's metric from their target ranks, averaged over seeds (one rank array per seed)."""
    values = [
        metrics_from_ranks(torch.from_numpy(np.asarray(r, dtype=np.int64)))[metric].numpy() for r in ranks
    ]
    return np.mean(values, axis=0)


def method_level(
    values_a: np.ndarray, values_b: np.ndarray, seed: int = 0, resamples: int = RESAMPLES, chunk: int = 100
) -> MethodLevel:
    """A - B at the method level from per-seed, per-user values ([seeds, users] each, the same
    users in the same order). Each bootstrap draw resamples seeds within each model, then users
    (one draw of users for both: paired), as multinomial weights, `chunk` draws at a time. The
    seeds' deviations from their mean are first scaled by sqrt(n / (n - 1)), so that the
    resampled mean of n seeds has the unbiased variance s^2 / n rather than (n - 1) / n of it."""
    (seeds_a, users), seeds_b = values_a.shape, values_b.shape[0]
    if seeds_a < 2 or seeds_b < 2 or values_b.shape[1] != users:
        raise ValueError("a method-level comparison needs 2+ seeds a side, on the same users")
    rng = np.random.default_rng(seed)

    def spread(values: np.ndarray) -> np.ndarray:
        n, mean = len(values), values.mean(0)
        return mean + (values - mean) * np.sqrt(n / (n - 1))

    spread_a, spread_b = spread(values_a), spread(values_b)
    draws = np.empty(resamples)
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        weights_a = rng.multinomial(seeds_a, np.full(seeds_a, 1 / seeds_a), size=r) / seeds_a
        weights_b = rng.multinomial(seeds_b, np.full(seeds_b, 1 / seeds_b), size=r) / seeds_b
        weights_users = rng.multinomial(users, np.full(users, 1 / users), size=r) / users
        draws[start : start + r] = ((weights_a @ spread_a - weights_b @ spread_b) * weights_users).sum(1)
    diff = float(values_a.mean() - values_b.mean())
    se = float(draws.std(ddof=1))
    # The seeds' share of the variance sets the degrees of freedom; users add many more.
    var_a = values_a.mean(1).var(ddof=1) / seeds_a
    var_b = values_b.mean(1).var(ddof=1) / seeds_b
    df = se**4 / (var_a**2 / (seeds_a - 1) + var_b**2 / (seeds_b - 1)) if var_a + var_b > 0 else math.inf
    half = float(stats.t.ppf(0.975, df)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, df)) if se > 0 else float(diff == 0)
    return MethodLevel(diff, diff - half, diff + half, se, float(df), p)


def compare(
    dataset: str,
    a: str,
    b: str,
    ranks_a: list[np.ndarray],
    ranks_b: list[np.ndarray],
    metric: str,
    seed: int = 0,
    resamples: int = RESAMPLES,
    values: Callable[[np.ndarray, str], np.ndarray] | None = None,
) -> Comparison:
    """A against B on the same users (p_holm is filled in by `holm_corrected`). `values(ranks,
    metric)`: each user's metric from one seed's ranks (default: full ranking's; the sampled
    protocols pass their own)."""
    if len({len(r) for r in ranks_a + ranks_b}) != 1:
        raise ValueError(f"{dataset}: {a} and {b} were tested on different numbers of users")
    values = values or (lambda r, m: user_values([r], m))
    per_seed_a, per_seed_b = (np.stack([values(r, metric) for r in ranks]) for ranks in (ranks_a, ranks_b))
    diff = per_seed_a.mean(0) - per_seed_b.mean(0)
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

    def seed_std(per_seed: np.ndarray) -> float:
        return float(per_seed.mean(1).std(ddof=1)) if len(per_seed) > 1 else float("nan")

    both = len(ranks_a) > 1 and len(ranks_b) > 1

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
        seed_std(per_seed_a),
        seed_std(per_seed_b),
        method=method_level(per_seed_a, per_seed_b, seed, resamples) if both else None,
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
    """Holm over the run-level tests, and separately over the method-level ones."""
    for comparison, adjusted in zip(comparisons, holm([c.p for c in comparisons])):
        comparison.p_holm = float(adjusted)
    methods = [c.method for c in comparisons if c.method is not None]
    for method, adjusted in zip(methods, holm([m.p for m in methods])):
        method.p_holm = float(adjusted)
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
